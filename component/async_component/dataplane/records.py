"""Request records: what the status resource reports, shared by producer and consumer.

One Redis string per request, ``<prefix>:{<namespace>/<service>}:req:<id>``
(under its Service's hash tag, :mod:`.queues`), holding a small JSON document.
The producer writes none: a request without a record is ``queued`` as long as
its stream entry exists (the producer's status resource checks). The replay
creates it as ``running``, then moves it to ``retrying``, ``succeeded`` or
``failed`` with the Service's recorded response, or ``expired`` past its
Service's max-age; the producer moves a request that has not started (or is
waiting for a retry) to ``canceled`` (:mod:`.cancel`). A record of a request
still running or retrying never expires, however long the request waits; a
finished (or canceled) one expires one retention period later.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import orjson

from .envelope import EnvelopeError, decode_body, encode_body
from .queues import service_tag

QUEUED = "queued"
RUNNING = "running"
RETRYING = "retrying"
SUCCEEDED = "succeeded"
FAILED = "failed"
EXPIRED = "expired"
"""Not finished within its Service's max-age: never replayed after that."""
CANCELED = "canceled"
"""Canceled by the client (``DELETE <Location>``) before it ran, or before its next attempt: never replayed."""
PENDING_STATES = (QUEUED, RUNNING, RETRYING)
FINAL_STATES = (SUCCEEDED, FAILED, EXPIRED, CANCELED)


def record_key(prefix: str, request_id: str, host: str) -> str:
    """The record of a request for ``host`` (the target host, any port)."""
    return records_of(prefix, service_tag(host)) + request_id


def records_of(prefix: str, tag: str) -> str:
    """What the record keys of a Service (its tag, :func:`.queues.service_tag`) start with."""
    return f"{prefix}:{{{tag}}}:req:"


def legacy_record_key(prefix: str, request_id: str) -> str:
    """Where records were kept before per-Service queues: still read, so they do not vanish on upgrade."""
    return f"{prefix}:req:{request_id}"


def finished_channel(prefix: str) -> str:
    """Pub/sub channel on which the replay announces the record key of a request that finished and that a client
    may wait for (``Prefer: wait``, an ``Idempotency-Key``)."""
    return f"{prefix}:finished"


def retry_key(prefix: str) -> str:
    """The single stream's sorted set of envelopes waiting for their next attempt, scored by due time."""
    return f"{prefix}:retries"


@dataclasses.dataclass(frozen=True)
class RecordedResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclasses.dataclass(frozen=True)
class Record:
    state: str
    host: str
    """Target host: the status is only shown through the same Service's routes."""
    attempts: int = 0
    updated_at: float = 0.0
    error: str | None = None
    next_attempt_at: float | None = None
    response: RecordedResponse | None = None
    accepted_at: float | None = None
    """When the producer accepted the request (None in records written before it was kept)."""
    idempotency_key: str | None = None
    """The Redis key of the request's ``Idempotency-Key``, in a final record (deleted with it) and a retrying one (a
    cancel gives the key the canceled record's lifetime)."""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> str:
        return record_json(self.state, self.host, self.attempts, self.updated_at, error=self.error,
                           next_attempt_at=self.next_attempt_at, response=self.response,
                           accepted_at=self.accepted_at, idempotency_key=self.idempotency_key)

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        try:
            doc = json.loads(text)
            response = doc.get("response")
            return cls(
                state=doc["state"],
                host=doc["host"],
                attempts=int(doc.get("attempts", 0)),
                updated_at=float(doc.get("updated_at", 0.0)),
                error=doc.get("error"),
                next_attempt_at=doc.get("next_attempt_at"),
                accepted_at=doc.get("accepted_at"),
                idempotency_key=doc.get("idempotency_key"),
                response=None if response is None else RecordedResponse(
                    status=int(response["status"]),
                    headers=tuple((str(k), str(v)) for k, v in response["headers"]),
                    body=decode_body(response["body"], response["body_encoding"]),
                ),
            )
        except (ValueError, KeyError, TypeError, EnvelopeError) as exc:
            raise ValueError(f"unreadable request record: {exc}") from None


def record_json(state: str, host: str, attempts: int, updated_at: float, *, error: str | None = None,
                next_attempt_at: float | None = None, response: RecordedResponse | None = None,
                accepted_at: float | None = None, idempotency_key: str | None = None) -> str:
    """:meth:`Record.to_json` without building the Record: each delivery writes one."""
    doc: dict[str, Any] = {"state": state, "host": host, "attempts": attempts, "updated_at": updated_at or time.time()}
    if error is not None:
        doc["error"] = error
    if next_attempt_at is not None:
        doc["next_attempt_at"] = next_attempt_at
    if accepted_at is not None:
        doc["accepted_at"] = accepted_at
    if idempotency_key is not None:
        doc["idempotency_key"] = idempotency_key
    if response is not None:
        body, encoding = encode_body(response.body)
        doc["response"] = {"status": response.status,
                           "headers": response.headers,  # orjson writes a tuple as an array
                           "body": body, "body_encoding": encoding}
    return orjson.dumps(doc).decode()  # json.dumps with options builds an encoder per call
