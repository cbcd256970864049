"""The contract between the control plane and the data plane.

The controller writes routes that set these headers and send these paths to the
producer; the producer, the replay and the network layer all read them. Each
name is defined here once, so the two sides cannot drift apart.
"""

from __future__ import annotations

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
