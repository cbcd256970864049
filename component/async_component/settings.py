"""Typed settings for each process, read once from the environment (and flags).

Every field names the environment variable a Kubernetes manifest sets; the CLI
derives a flag from it (``REQUEST_SIZE_LIMIT`` -> ``--request-size-limit``), and
a flag wins over the environment. A bad value raises :class:`SettingsError`
with a one-line message, which the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .hostlists import entry_error
from .protocol import BACKOFF_POLICIES, status_set

T = TypeVar("T")

DEFAULT_STREAM = "async-requests"
DEFAULT_GROUP = "async-source"
DEFAULT_DEAD_LETTER_STREAM = "async-requests-dead"
DEFAULT_KEY_PREFIX = "async"
DEFAULT_SYSTEM_NAMESPACE = "knative-serving"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
PRODUCER_SERVICE_NAME = "async-producer"

INGRESS_CLASSES = (
    "kourier.ingress.networking.knative.dev",
    "istio.ingress.networking.knative.dev",
)


class SettingsError(ValueError):
    """A setting has a value the process cannot start with."""


# --- parsers: each takes the raw string and returns the typed value or raises ValueError


def _number(kind: type, raw: str, message: str):
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(message) from None


def positive_int(raw: str) -> int:
    value = _number(int, raw, "must be a positive integer")
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def non_negative_float(raw: str) -> float:
    value = _number(float, raw, "must be a non-negative number of seconds")
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a non-negative number of seconds")
    return value


def positive_float(raw: str) -> float:
    value = non_negative_float(raw)
    if value == 0:
        raise ValueError("must be a positive number of seconds")
    return value


def port(raw: str) -> int:
    value = _number(int, raw, "must be a TCP port number (0-65535)")
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port number (0-65535)")
    return value


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
"""A Redis Cluster: ``redis+cluster://host:port[,host:port...]`` (any of its nodes; rediss+cluster for TLS)."""


def redis_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme in CLUSTER_SCHEMES:
        nodes = [node.strip() for node in parts.netloc.rpartition("@")[2].split(",")]
        if not all(nodes) or parts.path.strip("/") not in ("", "0"):
            raise ValueError("must look like redis+cluster://host:6379[,host:6379...] (a cluster has database 0 only)")
        return raw
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("must look like redis://host:6379/0, rediss://host:6380/0 or redis+cluster://host:6379")
    return raw


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", ""):
        raise ValueError("must be true or false")
    return value in ("true", "1", "yes")


def http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return raw.rstrip("/")


def optional(parser: Callable[[str], T]) -> Callable[[str], T | None]:
    def parse(raw: str) -> T | None:
        return parser(raw) if raw.strip() else None

    return parse


def port_list(raw: str) -> tuple[int, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    if not all(item.isascii() and item.isdigit() and 0 < int(item) <= 65535 for item in items):
        raise ValueError("must be comma-separated TCP port numbers (1-65535)")
    return tuple(sorted({int(item) for item in items}))


def host_suffixes(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip().lower() for item in raw.split(",") if item.strip())
    if not items:
        raise ValueError("must list at least one host or host suffix")
    return items


def dns_domain(raw: str) -> str:
    value = raw.strip().strip(".").lower()
    labels = value.split(".")
    if not value or len(value) > 253 or not all(
        0 < len(label) <= 63 and label[0].isalnum() and label[-1].isalnum()
        and all(c.isalnum() or c == "-" for c in label) for label in labels
    ):
        raise ValueError("must be a DNS domain such as cluster.local")
    return value


def ingress_class(raw: str) -> str:
    if raw not in INGRESS_CLASSES:
        raise ValueError("must be one of " + ", ".join(INGRESS_CLASSES))
    return raw


def backoff_policy(raw: str) -> str:
    if raw not in BACKOFF_POLICIES:
        raise ValueError("must be " + " or ".join(BACKOFF_POLICIES))
    return raw


def log_level(raw: str) -> str:
    value = raw.upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value


def queue_mode(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("per-service", "single-stream"):
        raise ValueError("must be per-service or single-stream")
    return value


def setting(env: str, default: str, parse: Callable[[str], Any], help: str, *, alias: str = "",
            secret: bool = False) -> Any:
    """Declare a field read from ``env`` (or ``alias``), with ``default`` as raw text; a secret stays out of repr."""
    return dataclasses.field(
        default=parse(default), repr=not secret,
        metadata={"env": env, "alias": alias, "raw_default": default, "parse": parse, "help": help},
    )


def flag_name(env: str) -> str:
    return "--" + env.lower().replace("_", "-")


S = TypeVar("S")


def load(cls: type[S], environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from ``overrides`` (flags, by env name), then ``environ``, then defaults."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = field.metadata
        env, alias = meta["env"], meta["alias"]
        if env in overrides and overrides[env] is not None:
            raw, origin = overrides[env], flag_name(env)
        elif env in environ:
            raw, origin = environ[env], env
        elif alias and alias in environ:
            raw, origin = environ[alias], alias
        else:
            continue
        try:
            values[field.name] = meta["parse"](str(raw))
        except ValueError as exc:
            raise SettingsError(f"{origin}={raw!r} is invalid: {exc}") from None
    return cls(**values)


# --- the settings of each process


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    redis_url: str = setting(
        "REDIS_URL", "redis://127.0.0.1:6379/0", redis_url,
        "Redis URL (redis:// or rediss:// for TLS; redis+cluster://host:port[,host:port...] for a Redis Cluster)")
    redis_cluster: bool = setting(
        "REDIS_CLUSTER", "false", boolean, "true: REDIS_URL (redis:// or rediss://) names a node of a Redis Cluster")
    redis_username: str | None = setting(
        "REDIS_USERNAME", "", optional(str), "Redis ACL user, when REDIS_URL names none (from the Secret's username key)")
    redis_password: str | None = setting(
        "REDIS_PASSWORD", "", optional(str), "Redis password, when REDIS_URL holds none (from the Secret's password key)",
        secret=True)
    redis_ca_file: str | None = setting("REDIS_CA_FILE", "", optional(str), "PEM file of the CA that signed the Redis server's TLS certificate")
    stream: str = setting(
        "STREAM_NAME", DEFAULT_STREAM, str,
        "the single stream of QUEUE_MODE=single-stream (per-service: still drained, for requests queued before)")
    key_prefix: str = setting("KEY_PREFIX", DEFAULT_KEY_PREFIX, str, "prefix of the status, retry and dead-letter keys")
    queue_mode: str = setting(
        "QUEUE_MODE", "per-service", queue_mode,
        "per-service: one queue per target Service, served fairly; single-stream: every request in STREAM_NAME"
        " (for Knative's RedisStreamSource, which reads one stream)",
    )
    log_level: str = setting("LOG_LEVEL", "INFO", log_level, "log level")

    @property
    def cluster(self) -> bool:
        """Whether Redis is a Redis Cluster (every key of one Service in one slot, :mod:`.dataplane.queues`)."""
        return self.redis_cluster or urlsplit(self.redis_url).scheme in CLUSTER_SCHEMES

    def __post_init__(self) -> None:
        if self.cluster and self.queue_mode != "per-service":
            raise SettingsError("QUEUE_MODE=single-stream needs one Redis server: on a Redis Cluster every Service has "
                                "its own queue (QUEUE_MODE=per-service)")
        if self.cluster and urlsplit(self.redis_url).scheme == "unix":
            raise SettingsError("REDIS_CLUSTER=true needs a redis:// or rediss:// URL, not a unix socket")
        if self.redis_ca_file and not self.redis_url.startswith(("rediss://", "rediss+cluster://")):
            raise SettingsError(
                "REDIS_CA_FILE is set but REDIS_URL does not use TLS: use a rediss:// URL, or unset REDIS_CA_FILE"
            )


def cluster_domain_setting() -> Any:
    """The cluster's DNS domain, as Knative finds it: Services are <name>.<namespace>.svc.<domain>."""
    return setting("CLUSTER_DOMAIN", DEFAULT_CLUSTER_DOMAIN, dns_domain,
                   "the cluster's DNS domain (Services are <name>.<namespace>.svc.<domain>)")


def body_memory_limit_setting(held: str) -> Any:
    """BODY_MEMORY_LIMIT, one ConfigMap key for the producer, the source and the consumer: what each holds (``held``)."""
    return setting("BODY_MEMORY_LIMIT", "67108864", positive_int, held)


def request_timeout_setting(help: str = "seconds to wait for the Service's response; also the longest"
                                        " async.knative.dev/timeout a Service may set") -> Any:
    """REQUEST_TIMEOUT: what the replaying processes wait for one attempt, and the longest a Service may ask for."""
    return setting("REQUEST_TIMEOUT", "300", positive_float, help)


def notification_allowed_hosts_setting() -> Any:
    """NOTIFICATION_ALLOWED_HOSTS: the data plane posts only to these sinks; the controller flags any other."""
    return setting("NOTIFICATION_ALLOWED_HOSTS", "", optional(host_suffixes),
                   "comma-separated hosts a Service's on-success-sink and on-failure-sink may name; an entry starting"
                   " with '.' allows every host ending with it (empty: any host)")


def status_retention_setting() -> Any:
    """Declared by the producer's and the replaying processes' settings alike (one field object per class)."""
    return setting("STATUS_RETENTION_SECONDS", "86400", positive_float, "how long request records are kept, in seconds")


def redis_check_setting() -> Any:
    """Declared by the producer's and the source's settings alike (one field object per class)."""
    return setting("REDIS_CHECK_INTERVAL", "30", positive_float,
                   "seconds between checks that Redis runs with maxmemory-policy noeviction and appendonly yes")


@dataclasses.dataclass(frozen=True)
class ServiceSettings(RedisSettings):
    """What the producer and the consumer share: an HTTP port and the request records."""

    port: int = setting("PORT", "8080", port, "port to listen on")
    host: str = setting("HOST", "0.0.0.0", str, "address to listen on")
    status_retention: float = status_retention_setting()


@dataclasses.dataclass(frozen=True)
class TargetSettings(RedisSettings):
    """Which Services a request may be sent to: checked by the producer, and again by whatever replays it."""

    allowed_hosts: tuple[str, ...] = setting(
        "ALLOWED_HOSTS", "", optional(host_suffixes),
        "comma-separated target hosts; an entry starting with '.' allows every host ending with it"
        " (empty: .svc.<CLUSTER_DOMAIN>, every Service in the cluster)",
    )
    cluster_domain: str = cluster_domain_setting()
    allowed_ports: tuple[int, ...] = setting(
        "ALLOWED_PORTS", "", port_list,
        "comma-separated ports a target host may name besides 80, the port of every Knative Service",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.allowed_hosts:  # frozen: set once, here
            object.__setattr__(self, "allowed_hosts", (f".svc.{self.cluster_domain}",))


@dataclasses.dataclass(frozen=True)
class ProducerSettings(ServiceSettings, TargetSettings):
    request_size_limit: int = setting("REQUEST_SIZE_LIMIT", "6000000", positive_int, "largest accepted body in bytes")
    body_memory_limit: int = body_memory_limit_setting(
        "request body bytes a worker holds at once, received or announced and not yet queued; past it a request"
        " gets 503 with Retry-After (one alone is always taken)",
    )
    workers: int = setting("WORKERS", "1", positive_int, "number of worker processes sharing the port")
    max_queued_per_service: int = setting(
        "MAX_QUEUED_PER_SERVICE", "100000", positive_int,
        "requests queued for one Service (waiting, in flight or retrying) before the producer answers 503",
    )
    header_timeout: float = setting("HEADER_TIMEOUT", "10", positive_float,
                                    "seconds from a request's first byte to the end of its headers (else 408)")
    body_min_rate: int = setting("BODY_MIN_RATE", "1024", positive_int,
                                 "bytes per second a body must average after HEADER_TIMEOUT seconds of grace (else 408)")
    max_connections: int = setting("MAX_CONNECTIONS", "1000", positive_int,
                                   "open connections per worker; more are answered 503 and closed")
    redis_check_interval: float = redis_check_setting()
    poll_interval: int = setting("POLL_INTERVAL", "1", positive_int,
                                 "seconds a client is asked to wait between status reads (Retry-After on every 202)")
    max_wait: float = setting("MAX_WAIT", "30", non_negative_float,
                              "longest Prefer: wait=N honoured, in seconds, before answering 202 (0: never wait)")


@dataclasses.dataclass(frozen=True)
class ReplaySettings(TargetSettings):
    """How a queued request is replayed and its outcome recorded: by the consumer, or by a source delivering in-process."""

    status_retention: float = status_retention_setting()
    max_attempts: int = setting("MAX_ATTEMPTS", "3", positive_int, "attempts before a request is dead-lettered")
    retry_base_delay: float = setting("RETRY_BASE_DELAY", "1", non_negative_float, "first retry delay in seconds (doubled each attempt, with jitter)")
    retry_max_delay: float = setting("RETRY_MAX_DELAY", "300", non_negative_float, "longest retry delay in seconds")
    backoff_policy: str = setting("BACKOFF_POLICY", "exponential", backoff_policy,
                                  "exponential (the delay doubles each retry) or linear (it grows by RETRY_BASE_DELAY)")
    retry_on: tuple[str, ...] = setting("RETRY_ON", "429,502,503,504", status_set,
                                        "Service answers that are retried: status codes and classes such as 5xx")
    max_age: float | None = setting("MAX_AGE", "", optional(positive_float),
                                    "seconds after its acceptance a request not yet finished ends expired (empty: never)")
    request_timeout: float = request_timeout_setting()
    response_size_limit: int = setting(
        "RESPONSE_SIZE_LIMIT", "6000000", positive_int,
        "largest response body kept, in bytes: a longer one is not read, and the request fails with that error",
    )
    notification_body_limit: int = setting(
        "NOTIFICATION_BODY_LIMIT", "65536", positive_int,
        "bytes of the Service's response body a completion event carries (the rest is cut, body_truncated says so)")
    notification_attempts: int = setting("NOTIFICATION_ATTEMPTS", "5", positive_int,
                                         "attempts to post one completion event to its sink before it is dropped")
    notification_timeout: float = setting("NOTIFICATION_TIMEOUT", "10", positive_float,
                                          "seconds a sink may take to answer one completion event")
    notification_allowed_hosts: tuple[str, ...] | None = notification_allowed_hosts_setting()
    dead_letter_stream: str = setting("DEAD_LETTER_STREAM", DEFAULT_DEAD_LETTER_STREAM, str, "stream that receives requests that used up their attempts, or are malformed")
    dead_letter_max_length: int = setting(
        "DEAD_LETTER_MAX_LENGTH", "100000", positive_int,
        "entries the dead-letter stream keeps, the oldest trimmed first (approximately: up to a node of 100 more)",
    )
    target_gateway_url: str | None = setting(
        "TARGET_GATEWAY_URL", "", optional(http_url),
        "send replayed requests to this gateway with the target's Host header instead of resolving the target host",
    )


@dataclasses.dataclass(frozen=True)
class ConsumerSettings(ServiceSettings, ReplaySettings):
    """The HTTP sink for CloudEvents (ours or RedisStreamSource's): a port to listen on, and how to replay."""

    body_memory_limit: int = body_memory_limit_setting(
        "bytes of events (by Content-Length; one without counts as 64 MiB) held at once, being replayed; past it"
        " the next events wait, unread, in arrival order (one alone is always taken)",
    )


@dataclasses.dataclass(frozen=True)
class SourceSettings(ReplaySettings):
    """Without ``SINK_URL`` the source replays each entry itself, with the replay settings (in-process delivery)."""

    sink_url: str | None = setting("SINK_URL", "", optional(http_url), "URL of a consumer to post CloudEvents to (unset: replay in this process)", alias="K_SINK")
    group: str = setting("CONSUMER_GROUP", DEFAULT_GROUP, str, "Redis consumer group shared by all source processes")
    consumer_name: str = setting("CONSUMER_NAME", "", str, "this process's name in the group (unset: its host name and pid)")
    concurrency: int = setting("CONCURRENCY", "32", positive_int,
                               "deliveries in flight at once (and MAX_INFLIGHT_PER_SERVICE more while one Service"
                               " borrows, for the others)")
    max_inflight_per_service: int = setting(
        "MAX_INFLIGHT_PER_SERVICE", "8", positive_int,
        "deliveries in flight at once to one Service (within CONCURRENCY), so a slow or hung Service holds"
        " only its own slots; idle slots are lent beyond it to Services that answer within a second, and"
        " while they are, this many more are kept for a Service that gets work",
    )
    visibility_timeout: float = setting("VISIBILITY_TIMEOUT", "30", positive_float, "seconds before an entry left pending by a dead process is reclaimed")
    delivery_timeout: float = setting("DELIVERY_TIMEOUT", "330", positive_float, "seconds to wait for the sink to answer one event (with SINK_URL)")
    health_port: int = setting("HEALTH_PORT", "8081", port, "port for /healthz, /readyz and /metrics (0: none)")
    max_deliveries: int = setting(
        "MAX_DELIVERIES", "5", positive_int,
        "deliveries of one entry without an outcome (its process died each time) before it is dead-lettered",
    )
    body_memory_limit: int = body_memory_limit_setting(
        "bytes of queued requests a source holds at once, read and not yet settled (up to about four times that"
        " in memory while they are decoded and replayed); past it a Service's queue is read only while it has"
        " nothing in flight",
    )
    redis_check_interval: float = redis_check_setting()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_url and self.delivery_timeout <= self.request_timeout:
            raise SettingsError(
                f"DELIVERY_TIMEOUT ({self.delivery_timeout:g}s) must be longer than REQUEST_TIMEOUT"
                f" ({self.request_timeout:g}s) with SINK_URL: the consumer may take that long to replay an event, and"
                " a source that stops waiting sooner posts it again (its Service is called twice)")


@dataclasses.dataclass(frozen=True)
class ControllerSettings:
    ingress_class: str = setting("INGRESS_CLASS_NAME", INGRESS_CLASSES[0], ingress_class, "class of the child Ingress")
    system_namespace: str = setting("SYSTEM_NAMESPACE", DEFAULT_SYSTEM_NAMESPACE, str, "namespace where the producer runs")
    cluster_domain: str = cluster_domain_setting()
    log_level: str = setting("LOG_LEVEL", "INFO", log_level, "log level")
    health_port: int = setting("HEALTH_PORT", "8081", port, "port for the liveness endpoint /healthz, which says standby or leading (0: none)")
    lease_name: str = setting(
        "LEASE_NAME", "async-controller", str,
        "Lease in SYSTEM_NAMESPACE that elects the one active replica ('': no election, run at once)")
    lease_duration: float = setting("LEASE_DURATION", "15", positive_float,
                                    "seconds a leader's Lease holds without renewal before a standby takes over")
    lease_renew_period: float = setting("LEASE_RENEW_PERIOD", "2", positive_float,
                                        "seconds between a leader's renewals and a standby's attempts")
    identity: str = setting("POD_NAME", "", str, "this replica's name in the Lease (unset: its host name and pid)")
    notification_allowed_hosts: tuple[str, ...] | None = notification_allowed_hosts_setting()
    request_timeout: float = request_timeout_setting(
        "the longest async.knative.dev/timeout a Service may ask for: the data plane's REQUEST_TIMEOUT, in seconds")

    def __post_init__(self) -> None:
        for entry in self.notification_allowed_hosts or ():
            error = entry_error("NOTIFICATION_ALLOWED_HOSTS", entry)
            if error is not None:
                raise SettingsError(error)
        if self.lease_name and self.lease_renew_period * 2 > self.lease_duration:
            raise SettingsError("LEASE_RENEW_PERIOD must be at most half of LEASE_DURATION, or a leader loses its Lease "
                                "between two renewals")

    @property
    def producer_host(self) -> str:
        return f"{PRODUCER_SERVICE_NAME}.{self.system_namespace}.svc.{self.cluster_domain}"
