"""The producer: accepts async requests, queues them in Redis, answers 202.

Every request that carries ``Async-Original-Host`` came through an async route
of the network layer, whatever its method and path: a GET or HEAD under
``STATUS_PATH_PREFIX`` reads a queued request's status, a DELETE cancels the
request (:mod:`.cancel`), another method there gets 405 (queued, its replay
would be routed back here), anything else is queued. Requests without that
header only reach the probes. The target host must be on ``ALLOWED_HOSTS``, so
the producer can never be used to reach arbitrary hosts. A 202 is only sent once Redis has stored the stream entry.

No status record is written at accept time: the ``Location`` names both the
stream entry and the request (``<entry id>.<request id>``), and while the
request has no record yet (the consumer creates one when it starts it) the
status resource reports ``queued`` from the entry itself. The request id (144
random bits) is still what grants access: an entry id alone finds nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import signal
import time
from collections.abc import Iterable

import httptools
import redis.asyncio as aioredis
import uvloop
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .. import logs, probes
from . import gcpolicy, heap, hirespack, idempotency, preferences, redisconn, targets
from .enqueuer import Enqueuer, KeyReused, QueueFull, Seen
from .http1 import Request, Response, Server, json_response
from .envelope import Envelope, EnvelopeError, RequestIds, envelope_json, header_text, header_value
from .cancel import DELETED, MISSING, Canceler
from .queues import PER_SERVICE, Layout, Queue, labels_of
from .records import (
    CANCELED, PENDING_STATES, QUEUED, RETRYING, RUNNING, Record, finished_channel, legacy_record_key, record_key,
)
from .prefork import run_workers
from .redischeck import RedisCheck
from .redisconn import make_redis, redis_address
from .targets import BadTarget, target_host
from .waiting import Finished, wait_preference
from ..protocol import (
    HOP_BY_HOP, ORIGINAL_HOST_HEADER, POLICY_HEADER, PREFER_HEADER, policy_of, REPLAY_HEADER, REQUEST_ID_HEADER, RESPOND_ASYNC, STATE_HEADER,
    STATUS_METHODS, STATUS_PATH_PREFIX, is_status_path,
)
from ..logthrottle import LogThrottle
from ..settings import ProducerSettings

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "1"
CANCELED_STATUS = 410
"""A status read of a canceled request: Gone, its response will never exist (with the JSON status)."""
PREFERENCE_APPLIED = ("Preference-Applied", RESPOND_ASYNC)
"""On the accept 202 (RFC 7240): the request was handled asynchronously, as asked (or as the Service always does)."""
QUEUE_FULL_RETRY_AFTER_SECONDS = "10"
"""A full queue drains at its Service's pace: come back later than after an outage blip."""

VERDICT_CACHE_SIZE = 1024
"""Target host verdicts remembered (a few Services send almost every request)."""
_REJECT_REASONS = {400: "bad_request", 403: "forbidden_host"}
REJECT_REASONS = ("forbidden_host", "too_large", "redis_unavailable", "bad_request", "method_not_allowed",
                  "too_many_connections", "replay_loop", "queue_full", "idempotency_key_reused", "body_memory")

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
QUOTED_ID_LIMIT = 100
"""Characters of an unknown request id a 404 quotes back (a status path may be kilobytes long)."""
LOCATION_SEPARATOR = "."
"""Between entry id and request id in a status path: in neither alphabet."""

_PREFER = PREFER_HEADER.lower()
DROPPED_REQUEST_HEADERS = HOP_BY_HOP | {"proxy-connection", ORIGINAL_HOST_HEADER.lower(), REPLAY_HEADER.lower(),
                                        POLICY_HEADER.lower()}
_DROPPED_RAW = frozenset(name.encode("latin-1") for name in DROPPED_REQUEST_HEADERS)
_REPLAY_RAW = REPLAY_HEADER.lower().encode("latin-1")
_PREFER_RAW = _PREFER.encode("latin-1")
_ORIGINAL_HOST_RAW = ORIGINAL_HOST_HEADER.lower().encode("latin-1")
_POLICY_RAW = POLICY_HEADER.lower().encode("latin-1")
_IDEMPOTENCY_RAW = idempotency.HEADER.lower().encode("latin-1")
_READS = ("GET", "HEAD")
_ALLOW = ("Allow", ", ".join(STATUS_METHODS))
_NOT_REPLAYED = HOP_BY_HOP | {"date", STATE_HEADER.lower(), REQUEST_ID_HEADER.lower()}
"""Recorded response headers the status resource does not repeat (it writes its own)."""


class BadRequest(Exception):
    """The request cannot be queued as sent (400)."""


class ReplayLoop(Exception):
    """A replay was routed here instead of to its Service (508): queued, it would come back again and again."""


# --- what a request says


def without_respond_async(value: str) -> str:
    """``Prefer`` without the ``respond-async`` preference ('' when nothing else is left)."""
    return preferences.without(value, RESPOND_ASYNC)


def forwarded_headers(raw_headers: Iterable[tuple[bytes, bytes]],
                      connection: Iterable[str] | None = ()) -> list[tuple[str, str]]:
    """Request headers to replay: order and repeats kept, transport and routing headers left out.

    ``connection``: the Connection header's values, which name more headers meant for this hop only.
    """
    dropped = _DROPPED_RAW.union(
        token.strip().lower().encode("latin-1") for value in connection for token in value.split(",")
    ) if connection else _DROPPED_RAW
    result = []
    for raw_name, raw_value in raw_headers:
        lower = raw_name.lower()
        if lower in dropped:
            if lower == _REPLAY_RAW:
                raise ReplayLoop(f"a replay ({REPLAY_HEADER}) reached the producer instead of its Service: "
                                 "check the network layer's routes")
            continue
        if lower == _PREFER_RAW:
            if raw_value == b"respond-async":  # what almost every async request says: nothing left
                continue
            value = without_respond_async(header_value(raw_value))
            if not value:
                continue
        else:
            value = header_value(raw_value)  # the bytes sent, whatever they are: the replay sends them back
        result.append((raw_name.decode("latin-1"), value))  # a name is a token: ASCII
    return result



def request_policy(values: list[bytes]) -> str:
    """The Service's delivery policy the route appended ('' when none: the cluster's defaults); raises BadRequest.

    Decoded only to check it (remembered per value); the envelope keeps the text.
    """
    if not values:
        return ""
    if len(values) > 1:
        raise BadRequest(f"{POLICY_HEADER} must appear once")
    text = header_text(values[0])
    try:
        policy_of(text)
    except ValueError as exc:  # a controller newer than this producer, or a hand-made route
        raise BadRequest(str(exc)) from None
    return text


def _queued_record(entries: list, request_id: str, host: str, retention: float | None) -> Record | None:
    """``queued`` when a stream entry holds this request for this host, else None.

    ``retention``: in the single-stream layout an entry older than the status retention says
    nothing, as Knative's RedisStreamSource leaves delivered entries behind; our sources delete
    each entry once its outcome is recorded, so in the per-Service layout (None) an entry means
    the request is still queued, however long it has waited.
    """
    envelope = None
    for found in entries:
        if not found:
            continue
        try:
            candidate = Envelope.from_stream_fields(found[0][1])
        except EnvelopeError:
            continue
        if candidate.id == request_id and candidate.url.startswith(f"http://{host}/"):
            envelope = candidate
            break
    if envelope is None:  # another request's entry, or another Service's request: do not confirm it exists
        return None
    if retention is not None and envelope.accepted_at + retention < time.time():
        return None
    return Record(state=QUEUED, host=host, attempts=0, updated_at=envelope.accepted_at,
                  accepted_at=envelope.accepted_at)


def request_target(target: str) -> str:
    """Path and query exactly as the client sent them (of an absolute-form target too)."""
    if target.startswith("/"):
        return target
    try:
        url = httptools.parse_url(target.encode("latin-1"))
    except httptools.HttpParserInvalidURLError:
        url = None
    if url is None or not (url.path or b"").startswith(b"/"):
        raise BadRequest(f"request target {target[:200]!r} is not a path")
    query = b"?" + url.query if url.query is not None else b""
    return (url.path + query).decode("latin-1")


def error_response(status: int, message: str, *headers: tuple[str, str]) -> Response:
    return json_response(status, {"error": message}, headers)


# --- the application


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter("async_producer_accepted_total", "Requests queued (acknowledged by Redis)", registry=registry)
        self.rejected = Counter(
            "async_producer_rejected_total", "Async requests not queued, by reason", ["reason"], registry=registry
        )
        # label lookups take a lock and a dict walk: bind the children once
        self.rejected_for = {reason: self.rejected.labels(reason)
                             for reason in REJECT_REASONS}
        self.queue_full = Counter(
            "async_producer_queue_full_total", "Requests refused with 503 because their Service's queue was full",
            ["namespace", "service"], registry=registry,
        )
        self.batch_seconds = Histogram(
            "async_producer_batch_seconds", "Time from a batch of writes being sent to Redis acknowledging it",
            registry=registry, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.batch_size = Histogram(
            "async_producer_batch_size", "Requests written to Redis in one round trip",
            registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.status_reads = Counter(
            "async_producer_status_reads_total", "Status reads, by what they found", ["result"], registry=registry
        )
        self.waits = Counter("async_producer_waits_total",
                             "Prefer: wait requests, by how they were answered (answered: the recorded response; "
                             "accepted: the 202)", ["result"], registry=registry)
        self.repeats = Counter("async_producer_idempotent_repeats_total",
                               "Requests not queued because their Idempotency-Key named an earlier one",
                               registry=registry)
        self.cancels = Counter("async_producer_cancels_total", "DELETEs of a Location, by the state found",
                               ["found"], registry=registry)


    def batch_written(self, size: int, queued: int, seconds: float) -> None:
        """Counted per batch, not per request: less work on the hot path."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.accepted.inc(queued)


class Producer:
    def __init__(self, settings: ProducerSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.redis_throttle = LogThrottle(log)
        self.redis: aioredis.Redis | None = None
        self.owns_redis = False
        self.enqueuer: Enqueuer | None = None
        self._verdicts: dict[str, tuple[str, int, str]] = {}
        self.layout = Layout.of(settings)
        self._queues: dict[str, Queue] = {}
        self.registry = registry
        self.new_request_id = RequestIds()
        self.redis_check: RedisCheck | None = None
        self.stopping = asyncio.Event()
        self.check_task: asyncio.Task | None = None
        self.finished: Finished | None = None
        self.canceler: Canceler | None = None
        self.finished_task: asyncio.Task | None = None
        self.retry_after = ("Retry-After", str(settings.poll_interval))
        """On every 202: the suggested polling interval."""

    # routing

    async def respond(self, request: Request) -> Response:
        """Every request: with ``Async-Original-Host`` an async request whatever its path, else a probe."""
        values = request.values(_ORIGINAL_HOST_RAW)
        if not values:
            return await self.probe(request)
        host, status, message = self._verdict(header_text(values[0])) if len(values) == 1 else (
            "", 400, f"{ORIGINAL_HOST_HEADER} must appear once")
        if status:
            self.metrics.rejected_for[_REJECT_REASONS[status]].inc()
            return error_response(status, message)
        if is_status_path(request.path):
            if request.method in _READS:
                return await self.status(request, host)
            if request.method == "DELETE":
                return await self.cancel(request, host)
            # never queued: its replay would come back here and be queued again, without end
            self.metrics.rejected_for["method_not_allowed"].inc()
            return error_response(405, f"{request.method} is not allowed on the status path", _ALLOW)
        return await self.enqueue(request, host)

    async def probe(self, request: Request) -> Response:
        path = request.path if request.method in _READS else ""
        if path == "/healthz":
            return json_response(200, probes.LIVE)
        if path == "/readyz":
            status, document = await probes.readiness(self.ready)
            return json_response(status, document)
        if path == "/metrics":
            return Response(200, probes.metrics_text(self.registry), [("Content-Type", probes.METRICS_CONTENT_TYPE)])
        return error_response(
            400, f"missing {ORIGINAL_HOST_HEADER}: only async routes of the network layer reach this producer")

    def _verdict(self, value: str) -> tuple[str, int, str]:
        """(host, 0, "") for an allowed target, else ("", status, message); remembered per header value."""
        verdict = self._verdicts.get(value)
        if verdict is None:
            try:
                host = target_host(value)
            except BadTarget as exc:
                verdict = ("", 400, str(exc))
            else:
                refused = targets.refusal(host, self.settings)
                verdict = ("", 403, f"{refused}: not queued by this producer") if refused else (host, 0, "")
            if len(self._verdicts) >= VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[value] = verdict
        return verdict

    def refused(self, status: int, reason: str = "") -> None:
        """The server answered on its own (oversized, malformed or too slow a request, too many connections or
        too many body bytes held)."""
        if reason:
            self.metrics.rejected_for[reason].inc()
        elif status == 413:
            self.metrics.rejected_for["too_large"].inc()
        elif status == 503:
            self.metrics.rejected_for["too_many_connections"].inc()
        elif status != 408:
            self.metrics.rejected_for["bad_request"].inc()

    # queueing

    async def enqueue(self, request: Request, host: str) -> Response:
        if self.redis_check.evicting is not None:  # a 202 would promise what Redis may not keep
            self.metrics.rejected_for["redis_unavailable"].inc()
            return error_response(503, self.redis_check.evicting, ("Retry-After", RETRY_AFTER_SECONDS))
        try:
            target = request_target(request.target)
        except BadRequest as exc:
            self.metrics.rejected_for["bad_request"].inc()
            return error_response(400, str(exc))
        try:
            policy = request_policy(request.values(_POLICY_RAW))
        except BadRequest as exc:
            log.error("not queued: %s %s for %s: %s", request.method, request.target[:200], host, exc)
            self.metrics.rejected_for["bad_request"].inc()
            return error_response(400, str(exc))
        connection = request.values(b"connection")
        try:
            headers = forwarded_headers(request.headers, [header_text(v) for v in connection] if connection else None)
        except ReplayLoop as exc:
            log.error("not queued: %s %s for %s: %s", request.method, request.target[:200], host, exc)
            self.metrics.rejected_for["replay_loop"].inc()
            return error_response(508, str(exc))
        prefer = request.values(_PREFER_RAW)
        wait = self._wait_seconds(prefer) if prefer else 0
        request_id = self.new_request_id()
        accepted_at = time.time()
        document = envelope_json(request_id, request.method, f"http://{host}{target}", headers, request.body,
                                 accepted_at, 0, policy)
        queue = self._queue(host)
        service_policy = policy_of(policy)
        max_queued = service_policy.max_queued
        idempotency_key = request.values(_IDEMPOTENCY_RAW)
        if idempotency_key:
            try:
                keyed = (document, idempotency.key_name_of(self.settings.key_prefix, host, idempotency_key),
                         idempotency.fingerprint(request.method, target, request.body), request_id)
            except idempotency.BadKey as exc:
                self.metrics.rejected_for["bad_request"].inc()
                return error_response(400, str(exc))
        if wait:  # before it is queued: its outcome cannot be announced before anyone listens
            key = record_key(self.settings.key_prefix, request_id, host)
            waiter = self.finished.register(key)
        try:
            queued = await (self.enqueuer.enqueue_once(queue, keyed, max_queued)
                            if idempotency_key else self.enqueuer.enqueue(queue, document, max_queued))
        except Exception as exc:
            if wait:
                self.finished.unregister(key, waiter)
            if isinstance(exc, KeyReused):
                self.metrics.rejected_for["idempotency_key_reused"].inc()
                return error_response(422, f"{idempotency.HEADER}: {exc}: its method, path, query or body differ")
            if isinstance(exc, QueueFull):
                return self._queue_full(queue, str(exc), max_queued)
            # connection refused, timeout, error reply: the request is not queued
            return self._unavailable("queueing a request", exc)
        if type(queued) is Seen:
            self.metrics.repeats.inc()
            if wait:
                self.finished.unregister(key, waiter)
            return await self._seen(queued, host, accepted_at + wait if wait else 0)
        entry_id = queued.decode()
        if wait:
            await self.finished.wait(key, waiter, accepted_at + wait - time.time())
            answer = await self._outcome_or_accepted(request_id, entry_id, accepted_at, key, host)
            self.metrics.waits.labels("accepted" if answer.status == 202 else "answered").inc()
            return answer
        return self._accepted(request_id, entry_id, accepted_at)

    async def _seen(self, seen: Seen, host: str, deadline: float) -> Response:
        """A request sent again with its key: the first one's 202 (after a wait, if asked) or final response."""
        key = record_key(self.settings.key_prefix, seen.request_id, host)
        waiter = self.finished.register(key) if deadline else None
        answer = await self._first_request(seen, host)
        if waiter is None or answer.status != 202:
            if waiter is not None:
                self.finished.unregister(key, waiter)
            return answer
        await self.finished.wait(key, waiter, deadline - time.time())
        return await self._first_request(seen, host)

    async def _first_request(self, seen: Seen, host: str) -> Response:
        try:
            raw, entries = await self._read_status(seen.request_id, seen.entry_id, host)
            record = None if raw is None else Record.from_json(raw)
        except Exception as exc:
            self._redis_failed("reading the request an idempotency key names", exc)
            return error_response(503, "the request status is unavailable, try again later",
                                  ("Retry-After", RETRY_AFTER_SECONDS))
        if record is None or record.host != host:
            record = _queued_record(entries, seen.request_id, host, self._entry_retention)
        if record is not None and record.finished:
            return self._final(seen.request_id, record)
        location = f"{STATUS_PATH_PREFIX}{seen.entry_id}{LOCATION_SEPARATOR}{seen.request_id}"
        doc = {"id": seen.request_id, "state": QUEUED if record is None else record.state, "status_url": location}
        if record is not None and record.accepted_at is not None:
            doc["accepted_at"] = record.accepted_at
        return json_response(202, doc, [(REQUEST_ID_HEADER, seen.request_id), ("Location", location),
                                        self.retry_after, PREFERENCE_APPLIED])

    def _wait_seconds(self, prefer: list[bytes]) -> float:
        """``Prefer: wait=N`` capped at ``MAX_WAIT``; 0 for the usual bare ``respond-async``."""
        if all(value == b"respond-async" for value in prefer):
            return 0
        asked = wait_preference([header_text(value) for value in prefer])
        return 0 if asked is None else min(asked, self.settings.max_wait)

    async def _outcome_or_accepted(self, request_id: str, entry_id: str, accepted_at: float, key: str,
                                   host: str) -> Response:
        """After a wait: the recorded response if the request finished, else the usual 202 (it stays queued)."""
        try:
            raw = await self.redis.get(key)
            record = None if raw is None else Record.from_json(raw)
        except Exception as exc:  # the request is queued all the same: the client polls
            self._redis_failed("reading the outcome of a waiting request", exc)
            record = None
        if record is not None and record.finished and record.host == host:
            return self._final(request_id, record)
        return self._accepted(request_id, entry_id, accepted_at)

    def _accepted(self, request_id: str, entry_id: str, accepted_at: float) -> Response:
        location = f"{STATUS_PATH_PREFIX}{entry_id}{LOCATION_SEPARATOR}{request_id}"
        # ids are URL-safe base64 and entry ids digits and '-': the JSON needs no escaping
        body = (f'{{"id":"{request_id}","state":"{QUEUED}","accepted_at":{accepted_at!r},'
                f'"status_url":"{location}"}}').encode()
        return Response(202, body, [("Content-Type", "application/json"), (REQUEST_ID_HEADER, request_id),
                                    ("Location", location), self.retry_after, PREFERENCE_APPLIED])

    def _queue(self, host: str) -> Queue:
        queue = self._queues.get(host)
        if queue is None:
            if len(self._queues) >= VERDICT_CACHE_SIZE:
                self._queues.clear()
            queue = self._queues[host] = self.layout.for_host(host)
        return queue

    def _queue_full(self, queue: Queue, detail: str, cap: int | None) -> Response:
        namespace, service = labels_of(queue.member)
        self.metrics.rejected_for["queue_full"].inc()
        self.metrics.queue_full.labels(namespace, service).inc()
        self.redis_throttle.warning("queue of %s is full (%s), answering 503", queue.member, detail)
        return error_response(
            503, f"the queue of Service {queue.member} is full ({detail}; at most"
                 f" {self.settings.max_queued_per_service if cap is None else cap}): nothing was queued, try again later",
            ("Retry-After", QUEUE_FULL_RETRY_AFTER_SECONDS))

    def _unavailable(self, what: str, exc: BaseException) -> Response:
        self.metrics.rejected_for["redis_unavailable"].inc()
        self._redis_failed(what, exc)
        return error_response(503, "the request queue is unavailable, try again later", ("Retry-After", RETRY_AFTER_SECONDS))

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        self.redis_throttle.warning("Redis unavailable while %s, answering 503: %s: %s", what, type(exc).__name__, exc)

    # status

    async def status(self, request: Request, host: str) -> Response:
        """``<entry id>.<request id>`` (what ``Location`` says) or ``<request id>`` alone (record only)."""
        entry_id, request_id = self._status_ids(request.path)
        if request_id is None:
            return self._not_found(request.path[len(STATUS_PATH_PREFIX):])
        try:
            raw, entries = await self._read_status(request_id, entry_id, host)
        except Exception as exc:  # Redis down: the status is unknown, not absent
            self.metrics.status_reads.labels("redis_unavailable").inc()
            self._redis_failed("reading a status", exc)
            return error_response(503, "the request status is unavailable, try again later",
                                  ("Retry-After", RETRY_AFTER_SECONDS))
        if raw is None:
            record = _queued_record(entries, request_id, host, self._entry_retention)
            if record is None:
                return self._not_found(request_id)
            return self._pending(request_id, record, request.path)
        try:
            record = Record.from_json(raw)
        except ValueError as exc:
            log.error("request %s: %s", request_id, exc)
            self.metrics.status_reads.labels("unreadable").inc()
            return error_response(500, f"the status of request {request_id} cannot be read")
        if record.host != host:  # another Service's request: do not even confirm it exists
            return self._not_found(request_id)
        if record.state in PENDING_STATES:
            return self._pending(request_id, record, request.path)
        self.metrics.status_reads.labels(record.state).inc()
        return self._final(request_id, record)

    async def cancel(self, request: Request, host: str) -> Response:
        """``DELETE <Location>``: 200 canceled (queued or retrying), 409 running, 204 finished (forgotten)."""
        entry_id, request_id = self._status_ids(request.path)
        if request_id is None:
            return self._not_found("")
        try:
            outcome = await self.canceler.cancel(record_key(self.settings.key_prefix, request_id, host),
                                                 self._queue(host).stream, entry_id, request_id, host, time.time())
        except Exception as exc:
            self._redis_failed("canceling a request", exc)
            return error_response(503, "the request status is unavailable, try again later",
                                  ("Retry-After", RETRY_AFTER_SECONDS))
        self.metrics.cancels.labels(outcome.found).inc()
        if outcome.found == MISSING:
            return self._not_found(request_id)
        if outcome.found == DELETED:
            log.info("request %s: its %s outcome deleted by the client", request_id, outcome.record.state)
            return Response(204, b"", [(STATE_HEADER, outcome.record.state)])
        if outcome.found == RUNNING:
            return json_response(409, {**self._status_document(request_id, outcome.record, request.path),
                                       "error": "the request is running: it cannot be recalled"},
                                 [(STATE_HEADER, RUNNING)])
        if outcome.found != CANCELED:
            log.info("request %s: canceled by the client while %s", request_id, outcome.found)
        return json_response(200, self._status_document(request_id, outcome.record, request.path),
                             [(STATE_HEADER, CANCELED)])

    @staticmethod
    def _final(request_id: str, record: Record) -> Response:
        """The Service's recorded response, with the request's state and id."""
        own = [(STATE_HEADER, record.state), (REQUEST_ID_HEADER, request_id)]
        if record.state == CANCELED:  # never replayed: there is no response, and there will be none
            return json_response(CANCELED_STATUS, {"id": request_id, "state": CANCELED, "attempts": record.attempts,
                                                   "updated_at": record.updated_at}, own)
        response = record.response
        if response is None or not 200 <= response.status <= 599:
            message = record.error or f"request finished as {record.state} without a response"
            return json_response(502, {"id": request_id, "error": message}, own)
        headers = [(k, v) for k, v in response.headers if k.lower() not in _NOT_REPLAYED]
        headers.extend(own)
        return Response(response.status, response.body, headers)

    @staticmethod
    def _status_ids(path: str) -> tuple[str, str | None]:
        """``(entry id or '', request id)`` of a status path, the request id None when it is not one."""
        entry_id, _, request_id = path[len(STATUS_PATH_PREFIX):].rpartition(LOCATION_SEPARATOR)
        if not _REQUEST_ID.fullmatch(request_id) or (entry_id and not _ENTRY_ID.fullmatch(entry_id)):
            return "", None
        return entry_id, request_id

    @property
    def _entry_retention(self) -> float | None:
        """How long a stream entry alone says its request is queued (see :func:`_queued_record`)."""
        return None if self.layout.mode == PER_SERVICE else self.settings.status_retention

    async def _read_status(self, request_id: str, entry_id: str, host: str) -> tuple[bytes | None, list]:
        """The record, and the stream entry when ``entry_id`` is given, in one round trip.

        The entry is read first: the replay writes the ``running`` record before the
        source deletes the entry, so an entry found missing here means the record (if
        the request exists) was already there for the GET that follows. The single
        stream and the records' old keys are read too: what was queued before an
        upgrade to per-Service queues does not vanish.
        """
        prefix = self.settings.key_prefix
        upgraded = not self.layout.cluster  # a cluster starts afresh: no single stream, no records' old keys
        streams = [self._queue(host).stream] if entry_id else []
        if entry_id and self.layout.mode == PER_SERVICE and upgraded:
            streams.append(self.layout.single_stream)
        async with self.redis.pipeline(transaction=False) as pipe:  # on a cluster: the Service's node only
            for stream in streams:
                pipe.xrange(stream, entry_id, entry_id)
            pipe.get(record_key(prefix, request_id, host))
            if upgraded:
                pipe.get(legacy_record_key(prefix, request_id))
            replies = await pipe.execute()
        if not upgraded:
            replies.append(None)
        *entries, raw, legacy = replies
        return (raw if raw is not None else legacy), entries

    def _pending(self, request_id: str, record: Record, location: str) -> Response:
        """202 with what a poller needs: the state, its attempts, when to look again and where."""
        self.metrics.status_reads.labels(record.state).inc()
        return json_response(202, self._status_document(request_id, record, location),
                             [(STATE_HEADER, record.state), ("Location", location), self.retry_after])

    @staticmethod
    def _status_document(request_id: str, record: Record, location: str) -> dict:
        doc = {"id": request_id, "state": record.state, "attempts": record.attempts, "updated_at": record.updated_at}
        if record.accepted_at is not None:
            doc["accepted_at"] = record.accepted_at
        if record.state == RETRYING and record.next_attempt_at is not None:
            doc["next_attempt_at"] = record.next_attempt_at
        if record.error is not None:
            doc["error"] = record.error
        doc["status_url"] = location
        return doc

    def _not_found(self, request_id: str) -> Response:
        self.metrics.status_reads.labels("not_found").inc()
        shown = request_id if len(request_id) <= QUOTED_ID_LIMIT else request_id[:QUOTED_ID_LIMIT] + "..."
        return error_response(404, f"no request {shown!r} for this host")

    # lifecycle

    async def start(self) -> None:
        if self.redis is None:
            self.redis = make_redis(self.settings)
            hirespack.packing(self.redis)  # the batch script's arguments: about 1 µs per request less
            # one attempt per batch: a retried write could queue a request twice,
            # and a quick 503 is the client's cue to retry
            self.redis.set_retry(Retry(NoBackoff(), 0))
            self.owns_redis = True
        self.enqueuer = Enqueuer(self.redis, layout=self.layout, max_queued=self.settings.max_queued_per_service,
                                 on_batch=self.metrics.batch_written)
        self.redis_check = RedisCheck(self.redis, self.settings.redis_check_interval, who="producer")
        await self.redis_check.check()
        self.check_task = asyncio.create_task(self.redis_check.run(self.stopping), name="redis-check")
        self.finished = Finished(self.redis, finished_channel(self.settings.key_prefix))
        self.canceler = Canceler(self.redis, channel=self.finished.channel)
        self.finished_task = asyncio.create_task(self.finished.run(self.stopping), name="finished-subscription")

    async def stop(self) -> None:
        self.stopping.set()
        if self.check_task is not None:
            await self.check_task
        if self.finished_task is not None:
            await self.finished_task
        if self.enqueuer is not None:
            await self.enqueuer.close()
        if self.owns_redis:
            await self.redis.aclose()

    async def ready(self) -> None:
        await redisconn.ping(self.redis)
        self.redis_check.require()

    def release_waiters(self) -> None:
        """Stopping: requests waiting for their outcome answer now, with a 202 unless they finished."""
        if self.finished is not None:
            self.finished.release_all()


def make_server(settings: ProducerSettings, *, redis: aioredis.Redis | None = None) -> Server:
    """The producer; creates its Redis client on startup unless ``redis`` is given (then the caller closes it)."""
    producer = Producer(settings, CollectorRegistry())
    producer.redis = redis
    server = Server(producer.respond, max_body=settings.request_size_limit, header_timeout=settings.header_timeout,
                    body_min_rate=settings.body_min_rate, max_connections=settings.max_connections,
                    max_held=settings.body_memory_limit, on_refused=producer.refused)
    server.on_startup.append(producer.start)
    server.on_closing.append(producer.release_waiters)
    server.on_cleanup.append(producer.stop)
    return server


# --- processes


def validate(settings: ProducerSettings) -> ProducerSettings:
    return targets.validate(settings)


def serve(settings: ProducerSettings, *, reuse_port: bool = False) -> int:
    """Serve one producer process until SIGTERM or SIGINT (on uvloop: much less CPU per request)."""
    logs.configure("producer", settings.log_level)
    heap.release_large_blocks()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings, reuse_port))


async def _serve(settings: ProducerSettings, reuse_port: bool) -> int:
    server = make_server(settings)
    try:
        await server.start(settings.host, settings.port, reuse_port=reuse_port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    gcpolicy.tune()  # in each worker, once its server and Redis client exist
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("stopping: answering the requests in progress")
    await server.close()
    return 0


def run(settings: ProducerSettings) -> int:
    logs.configure("producer", settings.log_level)
    queues = (f"a queue per Service (at most {settings.max_queued_per_service} requests each)"
              if settings.queue_mode == PER_SERVICE else f"the single stream {settings.stream}")
    log.info("producer listening on %s:%d with %d worker(s), queueing in %s, redis %s, allowed hosts %s",
             settings.host, settings.port, settings.workers, queues, redis_address(settings),
             ",".join(settings.allowed_hosts))
    if settings.workers == 1:
        return serve(settings)
    return run_workers(functools.partial(serve, settings, reuse_port=True), settings.workers, "producer")
