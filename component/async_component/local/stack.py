"""``async-component local``: the whole stack on 127.0.0.1, one OS process each.

Redis, the producer, the source, the consumer, the sample sleep app and the
gateway run as separate processes configured with the environment variables a
Kubernetes manifest would set, so the local stack exercises the same code paths
as a cluster. The gateway routes exactly what the cluster's network layer would
see: the Ingress Knative Serving makes for each sample Service
(:mod:`.serving`) and, for the async ones, the child Ingress and ExternalName
Service the controller makes (:mod:`.resources`). As in the base manifests,
the source replays queued requests in-process; the consumer runs beside it as
the HTTP sink a RedisStreamSource would post to (``consumer_url``).

A supervisor restarts a component that dies, like a Deployment would, so tests
can kill the source or the consumer and check that no accepted request is lost.
:class:`LocalStack` is the Python API the e2e suite drives; :func:`run` is the
command.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import yaml

from .. import logs
from ..controller import resources
from . import knative_serving as serving
from .deathsig import DIE_WITH_PARENT
from .gateway import Routes, service_targets
from .ports import free_port
from .redisserver import RedisServer, RedisServerError
from ..settings import (
    DEFAULT_CLUSTER_DOMAIN, DEFAULT_DEAD_LETTER_STREAM, DEFAULT_KEY_PREFIX, DEFAULT_STREAM, ConsumerSettings,
    ControllerSettings, ProducerSettings, SourceSettings, dns_domain, redis_url as parse_redis_url,
)

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
NAMESPACE = "default"
APP_FILE = "sleep_app.py"
COMPONENTS = ("app", "producer", "consumer", "source", "gateway")
"""Supervised processes, in the order their readiness is awaited (Redis comes first, unsupervised)."""

LOG_TAIL = 200
STOP_GRACE_SECONDS = 5.0

_SETTINGS_ENV = frozenset(
    name
    for cls in (ProducerSettings, ConsumerSettings, SourceSettings, ControllerSettings)
    for field in dataclasses.fields(cls)
    for name in (field.metadata["env"], field.metadata["alias"]) if name
) | {"SLEEP_SECONDS"}
"""Settings a component would otherwise inherit from the caller's shell."""


class StackError(RuntimeError):
    """The stack could not start or cannot do what was asked; the message says why."""


# --- what the cluster would hold


def find_app_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The sample app's directory: ``explicit``, else test/app under the cwd, else under this package's repo."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [Path.cwd() / "test" / "app", Path(__file__).resolve().parents[2] / "test" / "app"]
    for candidate in candidates:
        if (candidate / APP_FILE).is_file():
            return candidate.resolve()
    where = " or ".join(str(c) for c in candidates)
    raise StackError(f"cannot find the sample app ({APP_FILE}) in {where}: run from the repository root or pass --app-dir")


def load_services(app_dir: Path) -> list[dict[str, Any]]:
    """The Knative Services (serving.knative.dev/v1) in the app dir's manifests."""
    found = []
    for path in sorted(app_dir.glob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise StackError(f"cannot read {path}: {exc}") from None
        found += [d for d in docs if isinstance(d, dict) and d.get("kind") == "Service"
                  and str(d.get("apiVersion", "")).startswith("serving.knative.dev/")]
    if not found:
        raise StackError(f"no Knative Service manifests (*.yml) in {app_dir}")
    return found


def cluster_routes(ksvcs: list[dict[str, Any]], *, app_address: str, producer_address: str,
                   domain: str = serving.DEFAULT_DOMAIN, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> Routes:
    """What the network layer would route: Serving's Ingresses plus the controller's children and Services."""
    controller = ControllerSettings(cluster_domain=cluster_domain)
    ingresses: list[dict[str, Any]] = []
    services: dict[tuple[str, str], str] = {}
    for ksvc in ksvcs:
        parent = serving.ingress_for_service(ksvc, domain=domain, default_class=controller.ingress_class,
                                             cluster_domain=cluster_domain)
        ingresses.append(parent)
        services[(serving.namespace(ksvc), serving.revision_name(ksvc))] = app_address
        if resources.is_async_ingress(parent):
            ingresses.append(resources.make_child_ingress(
                parent, ingress_class=controller.ingress_class, producer_host=controller.producer_host,
                cluster_domain=cluster_domain))
            services.update(service_targets([resources.make_async_service(parent, producer_host=controller.producer_host)]))
    return Routes(tuple(ingresses), services, {controller.producer_host: producer_address},
                  ingress_class=controller.ingress_class)


def _conditional_async(ksvc: dict[str, Any]) -> bool:
    annotations = ksvc["metadata"].get("annotations") or {}
    return (serving.ingress_class(ksvc) == resources.ASYNC_INGRESS_CLASS
            and annotations.get(resources.MODE_ANNOTATION, resources.MODE_CONDITIONAL) == resources.MODE_CONDITIONAL)


# --- supervised processes




def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the child's process group, so workers it forked go too."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass(eq=False)
class _Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    any_status: bool = False
    """Ready as soon as it answers HTTP at all (the gateway has no health route of its own)."""
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_due: float | None = None
    lines: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL))
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, count: int = 15) -> str:
        lines = list(self.lines)[-count:]
        return "\n".join("    " + line for line in lines) if lines else "    (no output)"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str, any_status: bool) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=1.0) as response:
            return 200 <= response.status < 300 or any_status
    except urllib.error.HTTPError as exc:
        exc.close()
        return any_status
    except (OSError, ValueError):
        return False


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
    ``producer_url``, ``consumer_url``, ``app_url``, ``redis_url``, ``stream``,
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
    posts CloudEvents to the consumer, which replays them (the RedisStreamSource
    topology). ``output``: a text stream that receives every component's log
    lines, prefixed with its name (default: kept only in memory, see
    :meth:`logs`); pass ``sys.stderr`` to watch them.
    """

    def __init__(
        self,
        *,
        port: int = 8080,
        redis_url: str | None = None,
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
    ) -> None:
        problems = [
            f"{name} {value!r} {rule}" for name, value, ok, rule in [
                ("port", port, isinstance(port, int) and 0 < port < 65536, "must be a TCP port (1-65535)"),
                ("sleep seconds", sleep_seconds, 0 <= sleep_seconds <= 3600, "must be 0-3600"),
                ("max attempts", max_attempts, isinstance(max_attempts, int) and max_attempts > 0, "must be a positive integer"),
                ("retry delay", retry_delay, retry_delay >= 0, "must be >= 0 seconds"),
                ("producer workers", producer_workers, isinstance(producer_workers, int) and producer_workers > 0, "must be a positive integer"),
                ("visibility timeout", visibility_timeout, visibility_timeout > 0, "must be > 0 seconds"),
            ] if not ok
        ]
        if redis_url is not None:
            try:
                parse_redis_url(redis_url)
            except ValueError as exc:
                problems.append(f"redis URL {redis_url!r} {exc}")
        try:
            cluster_domain = dns_domain(cluster_domain)
        except ValueError as exc:
            problems.append(f"cluster domain {cluster_domain!r} {exc}")
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
        self.output = output
        self.startup_timeout = startup_timeout
        self.replay_in_source = replay_in_source
        self._app_dir_arg = app_dir

        self._redis = None if redis_url else RedisServer()
        self.redis_url = redis_url or self._redis.url
        self._ports = {name: free_port() for name in ("app", "producer", "consumer", "source")}
        self.gateway_url = f"http://{LOOPBACK}:{port}"
        self.producer_url = f"http://{LOOPBACK}:{self._ports['producer']}"
        self.consumer_url = f"http://{LOOPBACK}:{self._ports['consumer']}"
        self.app_url = f"http://{LOOPBACK}:{self._ports['app']}"
        self.services: list[str] = []
        self.example_service = ""
        """A conditionally async Service, for the quick-start hint."""

        self._components: dict[str, _Component] = {}
        self._tmp: Path | None = None
        self._spawner: ThreadPoolExecutor | None = None
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._output_lock = threading.Lock()
        self._started = False

    # --- public API

    def host(self, service: str, namespace: str = NAMESPACE) -> str:
        """External host of a Service, e.g. ``helloworld-sleep.default.example.com``."""
        return serving.external_host({"metadata": {"name": service, "namespace": namespace}}, self.domain)

    def start(self) -> LocalStack:
        if self._started:
            return self
        self._started = True
        self._stopping.clear()
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after a grace period) and remove the temp dirs."""
        if not self._started:
            return
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        running = [c for c in self._components.values() if c.alive()]
        for component in running:
            _signal_group(component.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for component in running:
            try:
                component.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", component.name, STOP_GRACE_SECONDS)
        for component in self._components.values():
            if component.process is not None:
                _signal_group(component.process, signal.SIGKILL)  # stragglers and any workers left behind
                component.process.wait()
        if self._spawner is not None:
            self._spawner.shutdown(wait=True)
            self._spawner = None
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
        entry = self._component(component)
        process = entry.process
        if process is None or process.poll() is not None:
            raise StackError(f"{component} is not running")
        _signal_group(process, sig)
        try:
            process.wait(STOP_GRACE_SECONDS * 2)
        except subprocess.TimeoutExpired:
            raise StackError(f"{component} (pid {process.pid}) is still running after signal {sig}") from None

    def wait_ready(self, component: str, timeout: float = 60.0) -> None:
        """Return once the component runs and answers its readiness check."""
        entry = self._component(component)
        deadline = time.monotonic() + timeout
        while not (entry.alive() and _answers(entry.ready_url, entry.any_status)):
            if time.monotonic() > deadline:
                raise StackError(f"{component} is not ready after {timeout:g}s ({entry.ready_url}); last log lines:\n{entry.tail()}")
            time.sleep(0.05)

    def stop_redis(self) -> None:
        """Shut Redis down, keeping its port and data for :meth:`start_redis`."""
        self._own_redis().kill()

    def start_redis(self) -> None:
        try:
            self._own_redis().start()
        except RedisServerError as exc:
            raise StackError(str(exc)) from None

    # --- inside

    def _own_redis(self) -> RedisServer:
        if self._redis is None:
            raise StackError("Redis was given by URL, so this stack cannot stop or start it")
        return self._redis

    def _component(self, name: str) -> _Component:
        try:
            return self._components[name]
        except KeyError:
            raise StackError(f"no component {name!r}: one of {', '.join(COMPONENTS)}") from None

    def _start(self) -> None:
        _check_port_free(self.port)
        app_dir = find_app_dir(self._app_dir_arg)
        ksvcs = load_services(app_dir)
        self.services = [k["metadata"]["name"] for k in ksvcs]
        self.example_service = next((k["metadata"]["name"] for k in ksvcs if _conditional_async(k)), self.services[0])
        self._tmp = Path(tempfile.mkdtemp(prefix="async-component-local-"))
        routes_file = self._tmp / "routes.json"
        routes_file.write_text(cluster_routes(
            ksvcs, app_address=f"{LOOPBACK}:{self._ports['app']}",
            producer_address=f"{LOOPBACK}:{self._ports['producer']}", domain=self.domain,
            cluster_domain=self.cluster_domain,
        ).to_json())
        if self._redis is not None:
            try:
                self._redis.start()
            except RedisServerError as exc:
                raise StackError(str(exc)) from None

        allowed = [serving.cluster_local_hosts(k, self.cluster_domain)[-1] for k in ksvcs]
        self._components = {c.name: c for c in self._plan(app_dir, routes_file, allowed)}
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-spawner")
        for component in self._components.values():
            self._spawn(component)
        deadline = time.monotonic() + self.startup_timeout
        for name in COMPONENTS:
            self._await_first_start(self._components[name], deadline)
        self._supervisor = threading.Thread(target=self._supervise, name="local-supervisor", daemon=True)
        self._supervisor.start()
        log.info("stack ready: gateway %s, producer %s, consumer %s, redis %s",
                 self.gateway_url, self.producer_url, self.consumer_url, self.redis_url)

    def _plan(self, app_dir: Path, routes_file: Path, allowed_hosts: list[str]) -> list[_Component]:
        """Each process with the environment its Kubernetes manifest would give it."""
        base = {k: v for k, v in os.environ.items() if k not in _SETTINGS_ENV}
        base["PYTHONUNBUFFERED"] = "1"
        redis = {"REDIS_URL": self.redis_url, "STREAM_NAME": self.stream, "KEY_PREFIX": self.key_prefix,
                 "DEAD_LETTER_STREAM": self.dead_letter_stream, "LOG_LEVEL": self.log_level}
        replay = {"MAX_ATTEMPTS": str(self.max_attempts), "RETRY_BASE_DELAY": f"{self.retry_delay:g}",
                  "TARGET_GATEWAY_URL": self.gateway_url}
        command = [sys.executable, "-m", "async_component"]
        url = f"http://{LOOPBACK}:{{}}".format
        ports = self._ports
        return [
            _Component("app", [sys.executable, str(app_dir / APP_FILE)],
                       {**base, "PORT": str(ports["app"]), "HOST": LOOPBACK, "SLEEP_SECONDS": f"{self.sleep_seconds:g}"},
                       url(ports["app"]) + "/healthz?sleep=0"),
            _Component("producer", [*command, "producer"],
                       {**base, **redis, "PORT": str(ports["producer"]), "HOST": LOOPBACK,
                        "ALLOWED_HOSTS": ",".join(allowed_hosts), "WORKERS": str(self.producer_workers)},
                       url(ports["producer"]) + "/readyz"),
            _Component("consumer", [*command, "consumer"],
                       {**base, **redis, **replay, "PORT": str(ports["consumer"]), "HOST": LOOPBACK},
                       url(ports["consumer"]) + "/readyz"),
            # No SINK_URL: the source replays in-process; the consumer above serves RedisStreamSource-style
            # events (and, with replay_in_source=False, the source's own, as a RedisStreamSource would send them).
            _Component("source", [*command, "source"],
                       {**base, **redis, **replay, "HEALTH_PORT": str(ports["source"]),
                        "VISIBILITY_TIMEOUT": f"{self.visibility_timeout:g}",
                        **({} if self.replay_in_source else {"SINK_URL": self.consumer_url})},
                       url(ports["source"]) + "/readyz"),
            _Component("gateway", [*command, "gateway", "--routes", str(routes_file), "--port", str(self.port),
                                   "--host", LOOPBACK, "--log-level", self.log_level],
                       base, url(self.port) + "/", any_status=True),
        ]

    def _spawn(self, component: _Component) -> None:
        # One long-lived thread starts every child, so Linux's parent-death signal
        # (tied to the starting thread) fires only when the stack itself goes away.
        self._spawner.submit(self._popen, component).result()

    def _popen(self, component: _Component) -> None:
        process = subprocess.Popen(
            component.argv, env=component.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, process_group=0, preexec_fn=DIE_WITH_PARENT,
        )
        component.process = process
        component.started_at = time.monotonic()
        threading.Thread(target=self._pump, args=(component, process), name=f"local-log-{component.name}",
                         daemon=True).start()

    def _pump(self, component: _Component, process: subprocess.Popen) -> None:
        """Copy the child's output, line by line, to the tail buffer and ``output``."""
        with process.stdout:
            for raw in process.stdout:
                self._line(component, raw.decode("utf-8", "replace").rstrip("\n"))

    def _line(self, component: _Component, line: str) -> None:
        component.lines.append(line)
        if self.output is not None:
            with self._output_lock:
                try:
                    self.output.write(f"{component.name:<8} | {line}\n")
                    self.output.flush()
                except (OSError, ValueError):
                    pass

    def _await_first_start(self, component: _Component, deadline: float) -> None:
        while not _answers(component.ready_url, component.any_status):
            code = component.process.poll()
            if code is not None:
                component.process.wait()
                time.sleep(0.1)  # let the output pump catch the last lines
                raise StackError(f"{component.name} exited while starting ({describe_exit(code)}); "
                                 f"last log lines:\n{component.tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"{component.name} did not become ready within {self.startup_timeout:g}s "
                                 f"({component.ready_url}); last log lines:\n{component.tail()}")
            time.sleep(0.05)

    def _supervise(self) -> None:
        """Restart components that die, like a Deployment: quickly, backing off if they keep dying."""
        while not self._stopping.wait(0.1):
            for component in self._components.values():
                try:
                    self._check(component)
                except Exception:  # the supervisor must outlive any one failure
                    log.exception("supervising %s failed", component.name)

    def _check(self, component: _Component) -> None:
        with component.lock:
            if self._stopping.is_set() or component.process is None:
                return
            code = component.process.poll()
            if code is None:
                return
            now = time.monotonic()
            if component.restart_due is None:
                _signal_group(component.process, signal.SIGKILL)  # workers it may have left behind
                component.restarts += 1
                lived = now - component.started_at
                component.backoff = 0.1 if lived > 10 else min(max(component.backoff * 2, 0.1), 5.0)
                component.restart_due = now + component.backoff
                message = (f"{component.name} (pid {component.process.pid}) exited: {describe_exit(code)}; "
                           f"restarting in {component.backoff:.1f}s (restart {component.restarts})")
                log.warning("%s", message)
                component.lines.append(f"local: {message}")
            elif now >= component.restart_due:
                component.restart_due = None
                self._spawn(component)
                log.info("%s restarted (pid %d)", component.name, component.process.pid)


# --- the ``async-component local`` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting a throwaway redis-server")
    parser.add_argument("--sleep-seconds", type=float, default=10.0, help="the sample app's default sleep")
    parser.add_argument("--max-attempts", type=int, default=3, help="attempts before a request is dead-lettered")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="first retry delay in seconds (doubled each attempt)")
    parser.add_argument("--producer-workers", type=int, default=1, help="producer worker processes")
    parser.add_argument("--cluster-domain", default=DEFAULT_CLUSTER_DOMAIN,
                        help="the cluster DNS domain the modelled Services live under, <name>.<namespace>.svc.<domain> (default: cluster.local)")
    parser.add_argument("--app-dir", default=None, help="directory of sleep_app.py and the Service manifests (default: test/app)")
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
            port=args.port, redis_url=args.redis_url, sleep_seconds=args.sleep_seconds, max_attempts=args.max_attempts,
            retry_delay=args.retry_delay, producer_workers=args.producer_workers, app_dir=args.app_dir,
            log_level=args.log_level, output=sys.stderr, cluster_domain=args.cluster_domain,
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
