"""The contract between the control plane and the data plane.

The controller writes routes that set these headers and send these paths to the
producer; the producer, the replay and the network layer all read them. Each
name is defined here once, so the two sides cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

# --- headers

PREFER_HEADER = "Prefer"
RESPOND_ASYNC = "respond-async"
"""The client's ``Prefer`` value asking for a 202; the child Ingress routes on it."""
RESPOND_SYNC = "respond-sync"
"""Sent with every replay (and routed past the producer), so a replay never comes back to be queued."""
ORIGINAL_HOST_HEADER = "Async-Original-Host"
"""Appended by the child Ingress: the Service a request routed to the producer is meant for."""
REQUEST_ID_HEADER = "Async-Request-Id"
"""On the 202 and on every replay."""
ATTEMPT_HEADER = "Async-Attempt"
"""On every replay: 1 for the first."""
STATE_HEADER = "Async-Request-State"
"""On a status answer: the request's state."""
DELIVERY_TIMEOUT_HEADER = "Async-Delivery-Timeout"
"""On each event our source posts to the consumer: the seconds it waits for the answer (``DELIVERY_TIMEOUT``).
An event that waited in the consumer for room so long that its replay could outlast that is answered 503 unreplayed,
since the source would post it again while the replay ran (Knative's RedisStreamSource sends none: its events wait)."""
REPLAY_HEADER = "Async-Replay"
REPLAY_VALUE = "true"
"""Every replay carries ``Async-Replay: true``: always-mode routes send it to the Service whatever else its
``Prefer`` says (``respond-sync, return=minimal`` does not match ``respond-sync`` exactly), and a producer that
gets one anyway refuses it (508) instead of queueing the request again."""

# --- the status resource

STATUS_PATH_PREFIX = "/.well-known/async-requests/"
"""Requests under this prefix read a queued request's status from the producer."""
STATUS_METHODS = ("GET", "HEAD", "DELETE")
"""What the status path answers (DELETE cancels the request); anything else there gets 405 and is never queued."""

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def is_status_path(path: str) -> bool:
    """Whether a network layer may route ``path`` (no query) to the status path.

    Envoy may normalise a path before matching it (percent-decoding unreserved characters,
    removing dot segments, merging slashes), so the check is made on that form too: a
    request queued under any spelling of the prefix would be replayed back to the producer.
    """
    if path.startswith(STATUS_PATH_PREFIX):
        return True
    if "%" not in path and "/." not in path and "//" not in path:
        return False
    return normalized_path(path).startswith(STATUS_PATH_PREFIX)


def normalized_path(path: str) -> str:
    """``path`` with unreserved characters percent-decoded, slashes merged and dot segments removed."""
    parts = path.split("%")
    decoded = [parts[0]]
    for part in parts[1:]:
        try:
            char = chr(int(part[:2], 16)) if len(part) >= 2 else ""
        except ValueError:
            char = ""
        decoded.append(char + part[2:] if char in _UNRESERVED and char else "%" + part)
    segments: list[str] = []
    for segment in "".join(decoded).split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    trailing = "/" if path.endswith(("/", "/.", "/..")) and segments else ""
    return "/" + "/".join(segments) + trailing

# --- headers of one hop only

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "content-length", "host",
})
"""Transport and framing headers: never queued, replayed or recorded."""

# --- the dead-letter stream

DEAD_LETTER_ERROR_FIELD = "error"
"""Why the request ended here."""
DEAD_LETTER_STATUS_FIELD = "status"
"""The last HTTP status, when there was one."""
DEAD_LETTER_SERVICE_FIELD = "service"
"""The target Service, ``<namespace>/<name>`` (or the target host when it is not a Service's), when known."""


def dead_letter_entry(fields: Mapping[Any, Any], error: str, status: int | None = None,
                      service: str | None = None) -> dict[Any, Any]:
    """A dead-letter stream entry: the queued entry's own fields, plus why it failed, its last status, its Service."""
    entry = {**fields, DEAD_LETTER_ERROR_FIELD: error}
    if status is not None:
        entry[DEAD_LETTER_STATUS_FIELD] = str(status)
    if service:
        entry[DEAD_LETTER_SERVICE_FIELD] = service
    return entry

# --- the delivery policy of a Service

POLICY_HEADER = "Async-Policy"
"""Appended by the child Ingress's producer routes: the Service's delivery policy (:class:`DeliveryPolicy`).

An appended header replaces whatever a client sent, so the policy comes from the Service's annotations only.
"""
POLICY_VERSION = "v1"

BACKOFF_EXPONENTIAL = "exponential"
BACKOFF_LINEAR = "linear"
BACKOFF_POLICIES = (BACKOFF_EXPONENTIAL, BACKOFF_LINEAR)

_STATUS_CODE = re.compile(r"[1-5][0-9][0-9]")
_STATUS_CLASS = re.compile(r"[1-5]xx")


def status_set(text: str) -> tuple[str, ...]:
    """``429,502`` or ``5xx,429`` as sorted unique tokens; raises ValueError for anything else."""
    tokens = [token.strip().lower() for token in text.split(",")]
    if not tokens or not all(_STATUS_CODE.fullmatch(t) or _STATUS_CLASS.fullmatch(t) for t in tokens):
        raise ValueError("must list status codes (100-599) or classes (1xx-5xx), separated by commas")
    return tuple(sorted(set(tokens)))


def status_matches(tokens: tuple[str, ...], status: int) -> bool:
    return str(status) in tokens or f"{status // 100}xx" in tokens


@dataclasses.dataclass(frozen=True)
class DeliveryPolicy:
    """A Service's own delivery settings; None: the cluster's default. Durations in seconds.

    On the wire (:meth:`encode`): ``v1`` then ``;key=value`` per field set, sink URLs in unpadded
    base64url, so the value holds no ``%`` (Envoy would read it as a format operator), ``;`` or space.
    """

    retry: int | None = None
    backoff_policy: str | None = None
    backoff_delay: float | None = None
    timeout: float | None = None
    retry_on: tuple[str, ...] | None = None
    max_age: float | None = None
    retention: float | None = None
    max_inflight: int | None = None
    max_queued: int | None = None
    on_success_sink: str | None = None
    on_failure_sink: str | None = None

    def encode(self) -> str:
        parts = [POLICY_VERSION]
        for name, key in _WIRE_KEYS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if name in _URL_FIELDS:
                value = base64.urlsafe_b64encode(value.encode()).decode("ascii").rstrip("=")
            elif name == "retry_on":
                value = ",".join(value)
            elif isinstance(value, float):
                value = f"{value:g}" if value == float(f"{value:g}") else repr(value)
            parts.append(f"{key}={value}")
        return ";".join(parts)

    @classmethod
    def decode(cls, text: str) -> DeliveryPolicy:
        """The policy a header value holds; raises ValueError saying what is wrong."""
        version, *parts = text.strip().split(";")
        if version != POLICY_VERSION:
            raise ValueError(f"{POLICY_HEADER} is not a {POLICY_VERSION} policy: {text[:100]!r}")
        fields: dict[str, Any] = {}
        for part in parts:
            key, sep, raw = part.partition("=")
            name = _WIRE_NAMES.get(key)
            if not sep or name is None or name in fields:
                raise ValueError(f"{POLICY_HEADER} has an unknown or repeated part {part[:100]!r}")
            try:
                fields[name] = _FIELD_PARSERS[name](raw)
            except (ValueError, binascii.Error, UnicodeDecodeError):
                raise ValueError(f"{POLICY_HEADER} has an invalid {key}: {raw[:100]!r}") from None
        return cls(**fields)


def _count(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise ValueError(raw)
    return int(raw)


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError(raw)
    return value


def _backoff(raw: str) -> str:
    if raw not in BACKOFF_POLICIES:
        raise ValueError(raw)
    return raw


def _url(raw: str) -> str:
    text = base64.b64decode(raw.translate(_FROM_URLSAFE) + "=" * (-len(raw) % 4), validate=True).decode("utf-8")
    if not text:
        raise ValueError(raw)
    return text


_FROM_URLSAFE = str.maketrans("-_", "+/")


_WIRE_KEYS = {
    "retry": "retry", "backoff_policy": "backoff", "backoff_delay": "delay", "timeout": "timeout",
    "retry_on": "on", "max_age": "age", "retention": "keep", "max_inflight": "inflight", "max_queued": "queued",
    "on_success_sink": "success", "on_failure_sink": "failure",
}
_WIRE_NAMES = {key: name for name, key in _WIRE_KEYS.items()}
_URL_FIELDS = frozenset({"on_success_sink", "on_failure_sink"})
_FIELD_PARSERS = {
    "retry": _count, "backoff_policy": _backoff, "backoff_delay": _seconds, "timeout": _seconds,
    "retry_on": status_set, "max_age": _seconds, "retention": _seconds, "max_inflight": _count,
    "max_queued": _count, "on_success_sink": _url, "on_failure_sink": _url,
}
DEFAULT_POLICY = DeliveryPolicy()


@functools.lru_cache(maxsize=1024)
def policy_of(text: str | None) -> DeliveryPolicy:
    """:meth:`DeliveryPolicy.decode`, remembered per header value (a few Services send almost every request).

    None or '' (a request queued before policies, or by a route without one): the cluster's defaults.
    """
    return DeliveryPolicy.decode(text) if text else DEFAULT_POLICY
