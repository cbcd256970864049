"""KindBackend: the scenarios' Backend on a kind cluster made by cluster.py.

The gateway is reached on the host port kind-config.yaml maps to node port
31080; the producer, the consumer and Redis through port-forwards that keep
their local ports while pods come and go.

Redis outage (stop_redis/start_redis) scales the redis Deployment to 0 and back
to 1. Its data lives on a volume claim with an append-only file, so queued
requests, records and consumer groups survive; what is lost are the open
connections (every client reconnects) and, for the outage's duration, any
write: the producer answers 503.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import redis

from async_component.settings import DEFAULT_DEAD_LETTER_STREAM, DEFAULT_GROUP, DEFAULT_KEY_PREFIX, DEFAULT_STREAM
from backend import Backend

from . import manifests, plan
from .cluster import Kubectl, RunningCluster
from .portforward import PortForward

QUEUE_PROXY_PORT = 8012
"""Every Knative pod's queue-proxy; it forwards to the user container whatever its port."""
REDIS_PORT = 6379


@dataclasses.dataclass(frozen=True)
class Workload:
    resource: str  # "deployment" or "ksvc"
    name: str
    namespace: str = plan.SYSTEM_NAMESPACE


COMPONENTS = {
    "source": Workload("deployment", "async-source"),
    "controller": Workload("deployment", "async-controller"),
    "producer": Workload("ksvc", "async-producer"),
    "consumer": Workload("ksvc", "async-consumer"),
}
REDIS = Workload("deployment", plan.REDIS_DEPLOYMENT, plan.REDIS_NAMESPACE)


@dataclasses.dataclass(frozen=True)
class StreamNames:
    stream: str = DEFAULT_STREAM
    dead_letter_stream: str = DEFAULT_DEAD_LETTER_STREAM
    key_prefix: str = DEFAULT_KEY_PREFIX
    group: str = DEFAULT_GROUP


def stream_names(docs: list[manifests.Doc]) -> StreamNames:
    """The names the component's manifests give its stream, dead letters, keys and source group."""
    consumer = manifests.find(docs, "Service", COMPONENTS["consumer"].name) or {}
    source = manifests.find(docs, "Deployment", COMPONENTS["source"].name) or {}
    default = StreamNames()
    return StreamNames(
        stream=manifests.env_value(docs, consumer, "STREAM_NAME") or default.stream,
        dead_letter_stream=manifests.env_value(docs, consumer, "DEAD_LETTER_STREAM") or default.dead_letter_stream,
        key_prefix=manifests.env_value(docs, consumer, "KEY_PREFIX") or default.key_prefix,
        group=manifests.env_value(docs, source, "CONSUMER_GROUP") or default.group,
    )


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def poll(check: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        time.sleep(interval)


class KindBackend(Backend):
    def __init__(self, running: RunningCluster, names: StreamNames) -> None:
        self.name = running.layer
        self.running = running
        self.kubectl: Kubectl = running.kubectl
        self.gateway_url = running.gateway_url
        self.stream = names.stream
        self.dead_letter_stream = names.dead_letter_stream
        self.key_prefix = names.key_prefix
        self.group = names.group
        self._killed: dict[str, set[str]] = {}
        self.forwards = {
            "producer": self._forward(COMPONENTS["producer"].namespace, lambda: self._pod_target("producer"),
                                      QUEUE_PROXY_PORT),
            "consumer": self._forward(COMPONENTS["consumer"].namespace, lambda: self._pod_target("consumer"),
                                      QUEUE_PROXY_PORT),
            "redis": self._forward(REDIS.namespace, lambda: f"svc/{REDIS.name}", REDIS_PORT, scheme="redis"),
        }
        self.producer_url = self.forwards["producer"].url
        self.consumer_url = self.forwards["consumer"].url
        self.redis_url = self.forwards["redis"].url + "/0"

    def _forward(self, namespace: str, target: Callable[[], str], port: int, scheme: str = "http") -> PortForward:
        return PortForward(self.running.kubectl_path, self.running.kubeconfig, namespace, target, port, scheme=scheme)

    def __enter__(self) -> KindBackend:
        for forward in self.forwards.values():
            forward.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for forward in self.forwards.values():
            forward.close()

    # --- pods

    def selector(self, component: str) -> str:
        workload = COMPONENTS[component]
        if workload.resource == "ksvc":
            return f"{plan.KNATIVE_SERVICE_LABEL}={workload.name}"
        labels = self.kubectl.json("get", "deployment", workload.name, "-n", workload.namespace)
        return ",".join(f"{k}={v}" for k, v in labels["spec"]["selector"]["matchLabels"].items())

    def pods(self, component: str) -> list[dict[str, Any]]:
        workload = COMPONENTS[component]
        found = self.kubectl.json("get", "pods", "-n", workload.namespace, "-l", self.selector(component))
        return found["items"]

    def _ready_pods(self, component: str) -> list[str]:
        killed = self._killed.get(component, set())
        return [pod["metadata"]["name"] for pod in self.pods(component)
                if pod_ready(pod) and pod["metadata"]["name"] not in killed]

    def _pod_target(self, component: str) -> str:
        ready = self._ready_pods(component)
        if not ready:
            raise RuntimeError(f"no ready pod of {COMPONENTS[component].name}")
        return f"pod/{ready[0]}"

    # --- Backend

    def kill(self, component: str) -> None:
        """Force-delete the component's pods: no grace period, like a SIGKILL; its controller makes new ones."""
        workload = COMPONENTS[component]
        names = [pod["metadata"]["name"] for pod in self.pods(component)]
        if not names:
            raise RuntimeError(f"{component}: no pod of {workload.resource} {workload.name} to kill")
        self._killed[component] = set(names)
        self.kubectl.run("delete", "pod", *names, "-n", workload.namespace, "--grace-period=0", "--force",
                         "--wait=false")

    def wait_ready(self, component: str, timeout: float = 60.0) -> None:
        started = time.monotonic()
        poll(lambda: bool(self._ready_pods(component)), timeout, f"a ready pod of {COMPONENTS[component].name}")
        self._killed.pop(component, None)
        if component in self.forwards:
            self.forwards[component].restart(max(timeout - (time.monotonic() - started), 10.0))

    def stop_redis(self) -> None:
        self.forwards["redis"].pause()
        self.kubectl.run("scale", f"deployment/{REDIS.name}", "-n", REDIS.namespace, "--replicas=0")
        poll(lambda: not self._redis_pods(), 120, "no Redis pod left")

    def start_redis(self) -> None:
        self.kubectl.run("scale", f"deployment/{REDIS.name}", "-n", REDIS.namespace, "--replicas=1")
        self.kubectl.run("rollout", "status", f"deployment/{REDIS.name}", "-n", REDIS.namespace, "--timeout=180s",
                         timeout=200)
        self.forwards["redis"].restart()
        poll(self._redis_answers, 60, "Redis answering PING through the port-forward")

    def _redis_pods(self) -> list[dict[str, Any]]:
        return self.kubectl.json("get", "pods", "-n", REDIS.namespace, "-l", plan.REDIS_SELECTOR)["items"]

    def _redis_answers(self) -> bool:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
