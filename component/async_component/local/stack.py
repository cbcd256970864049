"""``async-component local``: the whole stack on 127.0.0.1, one OS process each.

Redis, the producer, the source, the consumer, the sample sleep app and the
gateway run as separate processes configured with the environment variables a
Kubernetes manifest would set, so the local stack exercises the same code paths
as a cluster. The gateway routes what the cluster would (:mod:`.cluster`). As
in the base manifests, the source replays queued requests in-process; the
consumer runs beside it as the HTTP sink a RedisStreamSource would post to
(``consumer_url``).

A supervisor (:mod:`.supervisor`) restarts a component that dies, like a
Deployment would, so tests can kill the source or the consumer and check that
no accepted request is lost. Stopping goes in dependency order: the gateway and
the producer (no new requests), then the source and the consumer (finishing
what they hold), then the app, and Redis last. :class:`LocalStack` is the Python
API the e2e suite drives; :func:`run` is the command.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from .. import logs
from ..controller.policy import ClusterLimits
from ..dataplane.queues import PER_SERVICE, QUEUE_MODES
from ..dataplane.source import drain_grace
from ..settings import (
    DEFAULT_CLUSTER_DOMAIN, DEFAULT_DEAD_LETTER_STREAM, DEFAULT_KEY_PREFIX, DEFAULT_STREAM, ConsumerSettings,
    ControllerSettings, ProducerSettings, ReplaySettings, SettingsError, SourceSettings, dns_domain, flag_name, load,
    redis_url as parse_redis_url,
)
from . import StackError
from . import knative_serving as serving
from .cluster import APP_FILE, cluster_routes, conditional_async, find_app_dir, load_services
from .ports import free_port
from .rediscluster import RedisCluster
from .redisserver import RedisServer, RedisServerError
from .supervisor import STOP_GRACE_SECONDS, Process, Supervisor

__all__ = ["COMPONENTS", "LocalStack", "StackError", "add_arguments", "cluster_routes", "find_app_dir",
           "load_services", "run"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
NAMESPACE = "default"
COMPONENTS = ("app", "producer", "consumer", "source", "gateway")
"""Supervised processes, in the order their readiness is awaited (Redis comes first, unsupervised)."""

def stop_stages(source: SourceSettings) -> tuple[tuple[tuple[str, ...], float], ...]:
    """Dependency order, each stage with its grace seconds: no new requests, then the work in flight, then
    the app it goes to; Redis after all of them. The source (and the consumer) may take its drain grace."""
    return (
        (("gateway", "producer"), STOP_GRACE_SECONDS),
        (("source", "consumer"), drain_grace(source) + STOP_GRACE_SECONDS),
        (("app",), STOP_GRACE_SECONDS),
    )

DELIVERY_DEFAULTS = ("BACKOFF_POLICY", "RETRY_ON", "MAX_AGE", "REQUEST_TIMEOUT", "STATUS_RETENTION_SECONDS")
"""Cluster-wide delivery defaults (the ConfigMap's, in a cluster) that ``async-component local`` takes as flags."""

_SETTINGS_ENV = frozenset(
    name
    for cls in (ProducerSettings, ConsumerSettings, SourceSettings, ControllerSettings)
    for field in dataclasses.fields(cls)
    for name in (field.metadata["env"], field.metadata["alias"]) if name
) | {"SLEEP_SECONDS"}
"""Settings a component would otherwise inherit from the caller's shell."""


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            problem = "is already in use" if exc.errno == errno.EADDRINUSE else "cannot be used"
            raise StackError(f"port {port} on {LOOPBACK} {problem} ({exc.strerror}): pass another --port") from None


class LocalStack:
    """The whole stack on loopback; ``with LocalStack(port=...) as stack:`` starts and stops it.

    URLs and names are known from construction on; :meth:`start` brings every
    process up and returns once each one is ready, or raises :class:`StackError`
    naming what did not come up, with its last log lines. Every method is
    synchronous (call it from a test's thread, not inside a running loop's
    callback if blocking matters).

    Attributes: ``gateway_url`` (send requests here with a Service's Host),
    ``producer_url``, ``consumer_url``, ``app_url``, ``source_url`` (its
    probes and metrics), ``redis_url``, ``stream``,
    ``dead_letter_stream``, ``key_prefix``, ``services`` (names from the
    manifests). Methods: :meth:`host` (a Service's external host),
    :meth:`pid`, :meth:`kill` (the supervisor restarts the component),
    :meth:`wait_ready`, :meth:`restarts`, :meth:`logs`, :meth:`stop_redis` /
    :meth:`start_redis` (same port, data kept), :meth:`stop`. Components:
    :data:`COMPONENTS` ("app", "producer", "consumer", "source", "gateway").

    ``sleep_seconds``, ``max_attempts``, ``retry_delay`` and
    ``visibility_timeout`` become SLEEP_SECONDS, MAX_ATTEMPTS,
    RETRY_BASE_DELAY and VISIBILITY_TIMEOUT of the processes; keep them small
    in tests. ``replay_in_source=False`` gives the source ``SINK_URL``: it then
    posts CloudEvents to the consumer, which replays them; with
    ``queue_mode="single-stream"`` too, that is the RedisStreamSource topology
    (every request in the one stream). ``max_inflight_per_service`` and
    ``max_queued_per_service`` become MAX_INFLIGHT_PER_SERVICE and
    MAX_QUEUED_PER_SERVICE, and ``concurrency`` the source's CONCURRENCY
    (unset: the processes' defaults). ``redis_cluster``: a number of masters to start a Redis Cluster with (:attr:`redis_cluster`)
    instead of one redis-server. ``output``: a text stream that receives every component's log
    lines, prefixed with its name (default: kept only in memory, see
    :meth:`logs`); pass ``sys.stderr`` to watch them.
    """

    def __init__(
        self,
        *,
        port: int = 8080,
        redis_url: str | None = None,
        redis_cluster: int = 0,
        sleep_seconds: float = 10.0,
        max_attempts: int = 3,
        retry_delay: float = 1.0,
        producer_workers: int = 1,
        visibility_timeout: float = 3.0,
        app_dir: str | os.PathLike | None = None,
        log_level: str = "INFO",
        output: TextIO | None = None,
        domain: str = serving.DEFAULT_DOMAIN,
        cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
        stream: str = DEFAULT_STREAM,
        dead_letter_stream: str = DEFAULT_DEAD_LETTER_STREAM,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        startup_timeout: float = 60.0,
        replay_in_source: bool = True,
        queue_mode: str = PER_SERVICE,
        max_inflight_per_service: int | None = None,
        max_queued_per_service: int | None = None,
        concurrency: int | None = None,
        delivery: Mapping[str, str] | None = None,
        app_log_level: str | None = None,
    ) -> None:
        problems = [
            f"{name} {value!r} {rule}" for name, value, ok, rule in [
                ("port", port, isinstance(port, int) and 0 < port < 65536, "must be a TCP port (1-65535)"),
                ("sleep seconds", sleep_seconds, 0 <= sleep_seconds <= 3600, "must be 0-3600"),
                ("max attempts", max_attempts, isinstance(max_attempts, int) and max_attempts > 0, "must be a positive integer"),
                ("retry delay", retry_delay, retry_delay >= 0, "must be >= 0 seconds"),
                ("producer workers", producer_workers, isinstance(producer_workers, int) and producer_workers > 0, "must be a positive integer"),
                ("visibility timeout", visibility_timeout, visibility_timeout > 0, "must be > 0 seconds"),
                ("queue mode", queue_mode, queue_mode in QUEUE_MODES, "must be one of " + ", ".join(QUEUE_MODES)),
                ("max in flight per Service", max_inflight_per_service,
                 max_inflight_per_service is None or max_inflight_per_service > 0, "must be a positive integer"),
                ("max queued per Service", max_queued_per_service,
                 max_queued_per_service is None or max_queued_per_service > 0, "must be a positive integer"),
                ("concurrency", concurrency, concurrency is None or concurrency > 0, "must be a positive integer"),
                ("Redis Cluster masters", redis_cluster,
                 isinstance(redis_cluster, int) and 0 <= redis_cluster <= 16, "must be 0 (one redis-server) to 16"),
            ] if not ok
        ]
        if redis_cluster and redis_url is not None:
            problems.append("a Redis URL and a Redis Cluster to start exclude each other: give one")
        if redis_url is not None:
            try:
                parse_redis_url(redis_url)
            except ValueError as exc:
                problems.append(f"redis URL {redis_url!r} {exc}")
        try:
            cluster_domain = dns_domain(cluster_domain)
        except ValueError as exc:
            problems.append(f"cluster domain {cluster_domain!r} {exc}")
        self.delivery = dict(delivery or {})
        self.request_timeout = 0.0
        """The replays' REQUEST_TIMEOUT: also the longest timeout a Service may ask for (as the controller says)."""
        try:
            self.request_timeout = load(ReplaySettings, {}, self.delivery).request_timeout
        except SettingsError as exc:
            problems.append(str(exc))
        if problems:
            raise StackError("; ".join(problems))

        self.port = port
        self.domain = domain
        self.cluster_domain = cluster_domain
        self.stream = stream
        self.dead_letter_stream = dead_letter_stream
        self.key_prefix = key_prefix
        self.sleep_seconds = sleep_seconds
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.producer_workers = producer_workers
        self.visibility_timeout = visibility_timeout
        self.log_level = log_level.upper()
        self.app_log_level = (app_log_level or log_level).upper()
        """The sample app's LOG_LEVEL (default: every component's): at INFO it logs a line per request."""
        self.output = output
        self.startup_timeout = startup_timeout
        self.replay_in_source = replay_in_source
        self.queue_mode = queue_mode
        self.max_inflight_per_service = max_inflight_per_service
        self.max_queued_per_service = max_queued_per_service
        self.concurrency = concurrency
        self._app_dir_arg = app_dir

        self._redis: RedisServer | RedisCluster | None = (
            None if redis_url else RedisCluster(redis_cluster) if redis_cluster else RedisServer())
        self.redis_url = redis_url or self._redis.url
        self._ports = {name: free_port() for name in ("app", "producer", "consumer", "source")}
        self.gateway_url = f"http://{LOOPBACK}:{port}"
        self.producer_url = f"http://{LOOPBACK}:{self._ports['producer']}"
        self.consumer_url = f"http://{LOOPBACK}:{self._ports['consumer']}"
        self.app_url = f"http://{LOOPBACK}:{self._ports['app']}"
        self.source_url = f"http://{LOOPBACK}:{self._ports['source']}"
        self.services: list[str] = []
        self.example_service = ""
        """A conditionally async Service, for the quick-start hint."""

        self._supervisor: Supervisor | None = None
        self._tmp: Path | None = None
        self._started = False

    # --- public API

    def host(self, service: str, namespace: str = NAMESPACE) -> str:
        """External host of a Service, e.g. ``helloworld-sleep.default.example.com``."""
        return serving.external_host({"metadata": {"name": service, "namespace": namespace}}, self.domain)

    def start(self) -> LocalStack:
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process in dependency order (:func:`stop_stages`), Redis last; remove the temp dirs.

        Each stage gets SIGTERM and its grace period before SIGKILL.
        """
        if not self._started:
            return
        if self._supervisor is not None:
            source = SourceSettings(sink_url=None if self.replay_in_source else self.consumer_url)
            self._supervisor.stop(stop_stages(source))
            self._supervisor = None
        if self._redis is not None:
            self._redis.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._started = False
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pid(self, component: str) -> int:
        """Current process id of ``component`` (one of :data:`COMPONENTS`, or "redis")."""
        if component == "redis":
            if isinstance(self._redis, RedisCluster):
                raise StackError("Redis is a cluster here: see redis_cluster for its masters")
            if self._redis is None or self._redis.process is None:
                raise StackError("Redis is not running here (external, or stopped)")
            return self._redis.process.pid
        process = self._component(component).process
        if process is None:
            raise StackError(f"{component} has not been started")
        return process.pid

    def restarts(self, component: str) -> int:
        return self._component(component).restarts

    def logs(self, component: str) -> list[str]:
        """The component's last log lines (and the supervisor's lines about it)."""
        return list(self._component(component).lines)

    def kill(self, component: str, sig: int = signal.SIGKILL) -> None:
        """Signal the component and wait until it has exited; the supervisor then restarts it."""
        self._component(component)
        self._running().kill(component, sig)

    def wait_ready(self, component: str, timeout: float = 60.0) -> None:
        """Return once the component runs and answers its readiness check."""
        self._component(component)
        self._running().wait_ready(component, timeout)

    @property
    def redis_cluster(self) -> RedisCluster | None:
        """The Redis Cluster this stack started, to kill and restart its masters one by one."""
        return self._redis if isinstance(self._redis, RedisCluster) else None

    def stop_redis(self) -> None:
        """Shut Redis down (every master of a cluster), keeping ports and data for :meth:`start_redis`."""
        redis = self._own_redis()
        for server in redis.nodes if isinstance(redis, RedisCluster) else [redis]:
            server.kill()

    def start_redis(self) -> None:
        try:
            self._own_redis().start()
        except RedisServerError as exc:
            raise StackError(str(exc)) from None

    # --- inside

    def _own_redis(self) -> RedisServer | RedisCluster:
        if self._redis is None:
            raise StackError("Redis was given by URL, so this stack cannot stop or start it")
        return self._redis

    def _running(self) -> Supervisor:
        if self._supervisor is None:
            raise StackError("the stack is not running")
        return self._supervisor

    def _component(self, name: str) -> Process:
        if name not in COMPONENTS:
            raise StackError(f"no component {name!r}: one of {', '.join(COMPONENTS)}")
        return self._running()[name]

    def _start(self) -> None:
        _check_port_free(self.port)
        app_dir = find_app_dir(self._app_dir_arg)
        ksvcs = load_services(app_dir)
        self.services = [k["metadata"]["name"] for k in ksvcs]
        self.example_service = next((k["metadata"]["name"] for k in ksvcs if conditional_async(k)), self.services[0])
        self._tmp = Path(tempfile.mkdtemp(prefix="async-component-local-"))
        routes_file = self._tmp / "routes.json"
        routes_file.write_text(cluster_routes(
            ksvcs, app_address=f"{LOOPBACK}:{self._ports['app']}",
            producer_address=f"{LOOPBACK}:{self._ports['producer']}", domain=self.domain,
            cluster_domain=self.cluster_domain,
            limits=ClusterLimits(max_timeout=self.request_timeout),
        ).to_json())
        if self._redis is not None:
            try:
                self._redis.start()
            except RedisServerError as exc:
                raise StackError(str(exc)) from None

        allowed = [serving.cluster_local_hosts(k, self.cluster_domain)[-1] for k in ksvcs]
        self._supervisor = Supervisor(self._plan(app_dir, routes_file, allowed), output=self.output)
        self._supervisor.start(self.startup_timeout)
        log.info("stack ready: gateway %s, producer %s, consumer %s, redis %s",
                 self.gateway_url, self.producer_url, self.consumer_url, self.redis_url)

    def _plan(self, app_dir: Path, routes_file: Path, allowed_hosts: list[str]) -> list[Process]:
        """Each process with the environment its Kubernetes manifest would give it."""
        base = {k: v for k, v in os.environ.items() if k not in _SETTINGS_ENV}
        base["PYTHONUNBUFFERED"] = "1"
        redis = {"REDIS_URL": self.redis_url, "STREAM_NAME": self.stream, "KEY_PREFIX": self.key_prefix,
                 "DEAD_LETTER_STREAM": self.dead_letter_stream, "LOG_LEVEL": self.log_level,
                 "QUEUE_MODE": self.queue_mode}
        caps = {name: str(value) for name, value in (("MAX_INFLIGHT_PER_SERVICE", self.max_inflight_per_service),
                                                     ("MAX_QUEUED_PER_SERVICE", self.max_queued_per_service),
                                                     ("CONCURRENCY", self.concurrency))
                if value is not None}
        # the producer's target-host policy, which the replays apply again (dataplane-config.yaml)
        targets = {"ALLOWED_HOSTS": ",".join(allowed_hosts)}
        replay = {**targets, "MAX_ATTEMPTS": str(self.max_attempts), "RETRY_BASE_DELAY": f"{self.retry_delay:g}",
                  "TARGET_GATEWAY_URL": self.gateway_url, **self.delivery}
        command = [sys.executable, "-m", "async_component"]
        url = f"http://{LOOPBACK}:{{}}".format
        ports = self._ports
        return [
            Process("app", [sys.executable, str(app_dir / APP_FILE)],
                    {**base, "PORT": str(ports["app"]), "HOST": LOOPBACK, "SLEEP_SECONDS": f"{self.sleep_seconds:g}",
                     "LOG_LEVEL": self.app_log_level},
                    url(ports["app"]) + "/healthz?sleep=0"),
            Process("producer", [*command, "producer"],
                    {**base, **redis, "PORT": str(ports["producer"]), "HOST": LOOPBACK,
                     **targets, "WORKERS": str(self.producer_workers),
                     **{k: v for k, v in caps.items() if k == "MAX_QUEUED_PER_SERVICE"},
                     **{k: v for k, v in self.delivery.items() if k == "STATUS_RETENTION_SECONDS"}},
                    url(ports["producer"]) + "/readyz"),
            Process("consumer", [*command, "consumer"],
                    {**base, **redis, **replay, "PORT": str(ports["consumer"]), "HOST": LOOPBACK},
                    url(ports["consumer"]) + "/readyz"),
            # No SINK_URL: the source replays in-process; the consumer above serves RedisStreamSource-style
            # events (and, with replay_in_source=False, the source's own, as a RedisStreamSource would send them).
            Process("source", [*command, "source"],
                    {**base, **redis, **replay, "HEALTH_PORT": str(ports["source"]),
                     "VISIBILITY_TIMEOUT": f"{self.visibility_timeout:g}",
                     **{k: v for k, v in caps.items() if k in ("MAX_INFLIGHT_PER_SERVICE", "CONCURRENCY")},
                     **({} if self.replay_in_source else {
                         "SINK_URL": self.consumer_url,  # waiting longer than a replay, as source.yaml says
                         "DELIVERY_TIMEOUT": f"{self.request_timeout + 30:g}"})},
                    url(ports["source"]) + "/readyz"),
            Process("gateway", [*command, "gateway", "--routes", str(routes_file), "--port", str(self.port),
                             "--host", LOOPBACK, "--log-level", self.log_level],
                    base, url(self.port) + "/", any_status=True),
        ]



# --- the ``async-component local`` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1")
    parser.add_argument("--redis-url", default=None, help="Redis to use (default: a throwaway redis-server on a free port)")
    parser.add_argument("--redis-cluster", type=int, default=0, metavar="MASTERS",
                        help="start a throwaway Redis Cluster of this many masters (no replicas) on loopback instead of"
                             " one redis-server, and run every component on it (default: 0, one redis-server)")
    parser.add_argument("--sleep-seconds", type=float, default=10.0, help="the sample app's sleep when a request has no ?sleep=")
    parser.add_argument("--max-attempts", type=int, default=3, help="attempts before a request is dead-lettered")
    parser.add_argument("--retry-base-delay", type=float, default=1.0, dest="retry_delay", metavar="SECONDS",
                        help="first retry delay, doubled each attempt (the replaying processes' RETRY_BASE_DELAY)")
    parser.add_argument("--retry-delay", type=float, dest="retry_delay", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # the old spelling, kept working
    replay_fields = {field.metadata["env"]: field.metadata for field in dataclasses.fields(ReplaySettings)}
    for env in DELIVERY_DEFAULTS:
        meta = replay_fields[env]
        parser.add_argument(flag_name(env), dest=env, metavar=env.rpartition("_")[2], default=None,
                            help=f"{meta['help']}; a Service's annotations override it (the replaying processes' "
                                 f"{env}, default: {meta['raw_default'] or 'unset'})")
    parser.add_argument("--producer-workers", type=int, default=1, help="producer worker processes")
    for cls, env, whose in ((SourceSettings, "CONCURRENCY", "the source's"),
                            (SourceSettings, "MAX_INFLIGHT_PER_SERVICE", "the source's"),
                            (ProducerSettings, "MAX_QUEUED_PER_SERVICE", "the producer's")):
        meta = next(field.metadata for field in dataclasses.fields(cls) if field.metadata.get("env") == env)
        parser.add_argument(flag_name(env), type=int, dest=env.lower(), metavar="N", default=None,
                            help=f"{meta['help']} ({whose} {env}, default: {meta['raw_default']})")
    parser.add_argument("--queue-mode", default=PER_SERVICE, choices=QUEUE_MODES,
                        help="per-service: a queue per Service, served fairly; single-stream: one stream for"
                             " every request, as Knative's RedisStreamSource reads (default: per-service)")
    parser.add_argument("--cluster-domain", default=DEFAULT_CLUSTER_DOMAIN,
                        help="the cluster DNS domain the modelled Services live under, <name>.<namespace>.svc.<domain> (default: cluster.local)")
    parser.add_argument("--app-dir", default=None, help="directory of sleep_app.py and the Service manifests (default: test/app)")
    parser.add_argument("--via-consumer", action="store_true",
                        help="the source posts each queued request to the consumer as a CloudEvent (its SINK_URL), and"
                             " the consumer replays it: the RedisStreamSource topology (default: the source replays"
                             " in-process, as the base manifests do)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level of every component")


def run(args: argparse.Namespace) -> int:
    logs.configure("local", args.log_level)
    stop = threading.Event()
    ready = False

    def on_signal(signum: int, frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if first and not ready:
            raise KeyboardInterrupt  # abandon start(), which cleans up after itself

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack = LocalStack(
            port=args.port, redis_url=args.redis_url, redis_cluster=args.redis_cluster, sleep_seconds=args.sleep_seconds, max_attempts=args.max_attempts,
            retry_delay=args.retry_delay, producer_workers=args.producer_workers, app_dir=args.app_dir,
            queue_mode=args.queue_mode, concurrency=args.concurrency,
            max_inflight_per_service=args.max_inflight_per_service,
            max_queued_per_service=args.max_queued_per_service,
            log_level=args.log_level, output=sys.stderr, cluster_domain=args.cluster_domain,
            replay_in_source=not args.via_consumer,
            delivery={env: getattr(args, env) for env in DELIVERY_DEFAULTS if getattr(args, env) is not None},
        )
        stack.start()
        ready = True
        example = stack.host(stack.example_service)
        print(f"async-component local: ready at {stack.gateway_url} (Services: {', '.join(stack.services)}); "
              f"try: curl -H 'Host: {example}' -H 'Prefer: respond-async' {stack.gateway_url}/", flush=True)
        while not stop.wait(0.5):
            pass
        log.info("stopping")
        stack.stop()
        return 0
    except StackError as exc:
        print(f"async-component local: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
