"""Changes only a kind cluster can make, as context managers that undo them.

``async_by_default(backend)``: config-network's ingress-class becomes the async
class, so Services without an ingress-class annotation (helloworld-sleep-plain)
go through the async component too; restored on exit. Both directions are
class switches of an Ingress the network layer already served: on entry the
controller deletes it (the layer still holds it), releases it, and Serving
re-creates it in the async class; on exit the controller deletes its children
and the layer serves it again.

``redis_stream_source(backend)``: Knative's RedisStreamSource delivers to the
consumer instead of our source, with the producer queueing in the single stream
it reads (QUEUE_MODE=single-stream); the producer's per-Service queues and our
source come back on exit.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import redis

from async_component.controller.resources import (
    ASYNC_INGRESS_CLASS, INGRESS_CLASS_ANNOTATION, LAYER_FINALIZER, PARENT_LABEL,
)
from async_component.dataplane.queues import PER_SERVICE, SINGLE_STREAM
from backend import NAMESPACE, SERVICE_PLAIN

from . import manifests, plan
from .backend import COMPONENTS, KindBackend, poll

INGRESS_RESOURCE = "ingresses.networking.internal.knative.dev"
NEWER_CLASS_ANNOTATION = "networking.knative.dev/ingress-class"
"""Serving also accepts this spelling on a Service; either one keeps it off the default."""
CONFIG_NETWORK = "configmap/config-network"
INGRESS_CLASS_KEY = "ingress-class"
REDIS_STREAM_SOURCE_MANIFEST = "component/config/optional/redis-stream-source.yaml"
SOURCES_NAMESPACE = "knative-sources"
SOURCES_CONTROLLER = "statefulset/redis-controller-manager"
SOURCES_TLS_SECRET = "tls-secret"
DATAPLANE_CONFIG = "configmap/async-dataplane"
QUEUE_MODE_ANNOTATION = "async.knative.dev/queue-mode"
"""On the producer's revision template: changing the ConfigMap alone reaches no running pod."""


def _require_kind(backend: object) -> KindBackend:
    if not isinstance(backend, KindBackend):
        raise TypeError(f"this switch needs a kind backend, not {getattr(backend, 'name', backend)!r}")
    return backend


def ingress_settled(ingress: dict, ingress_class: str) -> bool:
    """The Knative Ingress carries ``ingress_class`` and its layer has made it Ready."""
    meta, status = ingress["metadata"], ingress.get("status") or {}
    if (meta.get("annotations") or {}).get(INGRESS_CLASS_ANNOTATION) != ingress_class:
        return False
    if status.get("observedGeneration") != meta.get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _wait_ingresses(backend: KindBackend, services: tuple[str, ...], ingress_class: str, timeout: float) -> None:
    """Until each Service's Ingress is Ready in ``ingress_class``: async ones without the layer's finalizer, with children; others without children."""
    going_async = ingress_class == ASYNC_INGRESS_CLASS

    def settled() -> bool:
        found = backend.kubectl.json("get", INGRESS_RESOURCE, "-n", NAMESPACE)["items"]
        by_name = {item["metadata"]["name"]: item for item in found}
        if not all(name in by_name and ingress_settled(by_name[name], ingress_class) for name in services):
            return False
        if going_async and any(LAYER_FINALIZER in (by_name[name]["metadata"].get("finalizers") or []) for name in services):
            return False
        parents = {(item["metadata"].get("labels") or {}).get(PARENT_LABEL) for item in found}
        return all((name in parents) == going_async for name in services)

    poll(settled, timeout, f"Knative Ingresses {', '.join(services)} Ready with class {ingress_class}"
         f" and {'with' if going_async else 'without'} children", 2.0)


def _set_ingress_class(backend: KindBackend, value: str | None) -> None:
    patch = {"data": {INGRESS_CLASS_KEY: value}}  # None deletes the key (JSON merge patch)
    backend.kubectl.run("patch", CONFIG_NETWORK, "-n", plan.SYSTEM_NAMESPACE, "--type", "merge", "-p",
                        json.dumps(patch))


def _pin_layer_class(kind: KindBackend, ingress_class: str) -> list[str]:
    """Give the component's own Knative Services the layer's class explicitly; returns those changed.

    Under an async default they would become async themselves, and a request
    carrying ``Prefer: respond-async`` on its way to the producer would be
    routed back to the producer, again and again.
    """
    pinned = []
    for component in ("producer", "consumer"):
        workload = COMPONENTS[component]
        service = kind.kubectl.json("get", "ksvc", workload.name, "-n", workload.namespace)
        annotations = service["metadata"].get("annotations") or {}
        if not {INGRESS_CLASS_ANNOTATION, NEWER_CLASS_ANNOTATION} & set(annotations):
            kind.kubectl.run("annotate", "ksvc", workload.name, "-n", workload.namespace,
                             f"{INGRESS_CLASS_ANNOTATION}={ingress_class}")
            pinned.append(workload.name)
    return pinned


def _unpin(kind: KindBackend, names: list[str]) -> None:
    for name in names:
        kind.kubectl.run("annotate", "ksvc", name, "-n", plan.SYSTEM_NAMESPACE, f"{INGRESS_CLASS_ANNOTATION}-")


@contextlib.contextmanager
def async_by_default(backend: object, *, services: tuple[str, ...] = (SERVICE_PLAIN,),
                     timeout: float = 180.0) -> Iterator[None]:
    """Make the async class Knative's default ingress class while the block runs.

    Waits until the Ingresses of ``services`` (Services without their own class
    annotation) carry the async class, are Ready, no longer carry the layer's
    finalizer and have their child Ingress; on exit until they are back on the
    layer's class, Ready, and their children are gone. The component's own
    Services keep the layer's class throughout (annotated for the duration
    when they have no class).
    """
    kind = _require_kind(backend)
    config = kind.kubectl.json("get", CONFIG_NETWORK, "-n", plan.SYSTEM_NAMESPACE)
    previous = (config.get("data") or {}).get(INGRESS_CLASS_KEY)
    layer_class = previous or plan.INGRESS_CLASS[kind.name]
    pinned = _pin_layer_class(kind, layer_class)
    try:
        _set_ingress_class(kind, ASYNC_INGRESS_CLASS)
        try:
            _wait_ingresses(kind, services, ASYNC_INGRESS_CLASS, timeout)
            yield
        finally:
            _set_ingress_class(kind, previous)
            _wait_ingresses(kind, services, layer_class, timeout)
    finally:
        _unpin(kind, pinned)


def revision_ready(service: dict) -> bool:
    """A Knative Service has made its latest spec its Ready, serving revision."""
    meta, status = service["metadata"], service.get("status") or {}
    return (status.get("observedGeneration") == meta.get("generation")
            and status.get("latestReadyRevisionName") == status.get("latestCreatedRevisionName")
            and any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []))


def set_queue_mode(kind: KindBackend, mode: str, timeout: float) -> None:
    """The producer queues in ``mode``: set in the data plane's ConfigMap, read by a new producer revision.

    component/config/README.md gives the same two changes in prose ("One stream").
    """
    workload = COMPONENTS["producer"]
    kind.kubectl.run("patch", DATAPLANE_CONFIG, "-n", workload.namespace, "--type", "merge", "-p",
                     json.dumps({"data": {"QUEUE_MODE": mode}}))
    kind.kubectl.run("patch", "ksvc", workload.name, "-n", workload.namespace, "--type", "merge", "-p",
                     json.dumps({"spec": {"template": {"metadata": {"annotations": {QUEUE_MODE_ANNOTATION: mode}}}}}))
    poll(lambda: revision_ready(kind.kubectl.json("get", "ksvc", workload.name, "-n", workload.namespace)),
         timeout, f"{workload.name} serving a revision with QUEUE_MODE={mode}")


def group_names(client: redis.Redis, stream: str) -> set[str]:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return set()
    return {g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups}


def stream_readers(client: redis.Redis) -> set[int]:
    """Ids of the connections whose last command was XREADGROUP: sources reading (or blocked on) a stream.

    Group consumers are no proof: Redis may create one only when a read returns entries.
    """
    return {int(c["id"]) for c in client.client_list() if c.get("cmd") == "xreadgroup"}


def move_group_to_end(client: redis.Redis, stream: str, group: str) -> None:
    """Make ``group`` skip what is in the stream now (another source delivered it already)."""
    if group in group_names(client, stream):
        client.xgroup_setid(stream, group, "$")
    else:
        client.xgroup_create(stream, group, "$", mkstream=True)


def _source_replicas(kind: KindBackend) -> int:
    workload = COMPONENTS["source"]
    deployment = kind.kubectl.json("get", "deployment", workload.name, "-n", workload.namespace)
    return int(deployment["spec"].get("replicas", 1))


def _scale_source(kind: KindBackend, replicas: int, timeout: float) -> None:
    workload = COMPONENTS["source"]
    kind.kubectl.run("scale", f"deployment/{workload.name}", "-n", workload.namespace, f"--replicas={replicas}")
    if replicas == 0:
        poll(lambda: not kind.pods("source"), timeout, f"no {workload.name} pod left")
    else:
        kind.kubectl.run("rollout", "status", f"deployment/{workload.name}", "-n", workload.namespace,
                         f"--timeout={int(timeout)}s", timeout=timeout + 15)


def redis_stream_source_manifest(repo_root: Path) -> tuple[Path, manifests.Doc]:
    path = repo_root / REDIS_STREAM_SOURCE_MANIFEST
    docs = manifests.load_docs(path.read_text())
    source = next((doc for doc in docs if doc.get("kind") == "RedisStreamSource"), None)
    if source is None:
        raise ValueError(f"{REDIS_STREAM_SOURCE_MANIFEST} holds no RedisStreamSource")
    return path, source


def enable_steps(source: manifests.Doc) -> list[tuple[str, ...]]:
    """The kubectl commands that put the RedisStreamSource in our source's place, in order.

    component/config/README.md and the optional manifest list exactly these
    (a test checks it). eventing-redis ships a placeholder ``tls-secret`` whose
    non-empty value makes its adapter dial TLS and crash on the empty
    certificate; without the secret the adapter uses plain TCP. Its controller
    reads the secret only when it starts, so it is restarted before the
    RedisStreamSource is made. Our source goes first, so one source reads.
    """
    workload = COMPONENTS["source"]
    name = source["metadata"]["name"]
    namespace = source["metadata"].get("namespace", plan.SYSTEM_NAMESPACE)
    return [
        ("delete", "secret", SOURCES_TLS_SECRET, "-n", SOURCES_NAMESPACE, "--ignore-not-found"),
        ("rollout", "restart", SOURCES_CONTROLLER, "-n", SOURCES_NAMESPACE),
        ("rollout", "status", SOURCES_CONTROLLER, "-n", SOURCES_NAMESPACE),
        ("scale", f"deployment/{workload.name}", "-n", workload.namespace, "--replicas=0"),
        ("apply", "-f", REDIS_STREAM_SOURCE_MANIFEST),
        ("wait", "--for=condition=Ready", f"redisstreamsource/{name}", "-n", namespace),
    ]


def _run_step(kind: KindBackend, step: tuple[str, ...], path: Path, timeout: float) -> None:
    if step[:2] == ("apply", "-f"):
        step = ("apply", "-f", str(path))
    if step[:2] == ("rollout", "status") or step[0] == "wait":
        kind.kubectl.run(*step, f"--timeout={int(timeout)}s", timeout=timeout + 15)
    else:
        kind.kubectl.run(*step)
    if step[0] == "scale":
        poll(lambda: not kind.pods("source"), timeout, f"no {COMPONENTS['source'].name} pod left")


@contextlib.contextmanager
def redis_stream_source(backend: object, *, timeout: float = 300.0) -> Iterator[None]:
    """Deliver with Knative's RedisStreamSource instead of our source while the block runs.

    Our source is scaled to 0 first, so only one source reads the stream. A
    RedisStreamSource creates its consumer group at ``$`` when the group does
    not exist yet: this returns only once the source is Ready and its adapter
    reads the stream, so nothing sent inside the block is missed.
    The steps are :func:`enable_steps`, the ones component/config/README.md
    gives. On exit it is deleted (which destroys its group), our source's group
    is moved past what the RedisStreamSource delivered (or created there), and
    our source scaled back. The placeholder TLS secret stays deleted.
    """
    kind = _require_kind(backend)
    path, source = redis_stream_source_manifest(kind.running.repo_root)
    stream = source["spec"].get("stream", kind.stream)
    rss_group = source["spec"].get("group") or kind.group
    replicas = _source_replicas(kind)
    client = redis.Redis.from_url(kind.redis_url, socket_timeout=5)
    steps = enable_steps(source)
    try:
        for step in steps[:4]:  # the tls-secret, its controller, our source scaled to 0
            _run_step(kind, step, path, timeout)
        set_queue_mode(kind, SINGLE_STREAM, timeout)  # the adapter reads one stream
        before = stream_readers(client)
        adapter: set[int] = set()
        try:
            for step in steps[4:]:  # the RedisStreamSource, applied and Ready
                _run_step(kind, step, path, timeout)
            # Our source is gone, so a new XREADGROUP connection is the adapter's.
            poll(lambda: bool(stream_readers(client) - before), timeout,
                 f"the RedisStreamSource adapter reading stream {stream} (group {rss_group})")
            adapter = stream_readers(client) - before
            yield
        finally:
            kind.kubectl.run("delete", "-f", str(path), "--ignore-not-found", "--wait=true", timeout=timeout)
            # The adapter destroys its group as it shuts down: only then can ours be set.
            poll(lambda: not (adapter & {int(c["id"]) for c in client.client_list()}), timeout,
                 "the RedisStreamSource adapter disconnected from Redis")
            move_group_to_end(client, kind.stream, kind.group)
            set_queue_mode(kind, PER_SERVICE, timeout)
            _scale_source(kind, replicas, timeout)
    finally:
        client.close()
