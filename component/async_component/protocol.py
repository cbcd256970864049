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

# --- the status resource

STATUS_PATH_PREFIX = "/.well-known/async-requests/"
"""Requests under this prefix read a queued request's status from the producer."""

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
