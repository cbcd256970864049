"""The replay core: replays a queued request to its Service and records the outcome.

:class:`Replayer` takes one queued request and comes to an :class:`Answer`:
the outcome (the response, a scheduled retry, or a failure with its
dead-letter entry) is written to Redis before the answer is 2xx, so a crash in
between only means a redelivery, never a lost request. Two callers share it:
the consumer's CloudEvents sink (:mod:`.sink`), which answers its events with
the :class:`Answer`; and a source delivering in-process (:mod:`.delivery`),
which hands it stream entries directly. The replay carries
``Prefer: respond-sync`` (before the request's other preferences) and
``Async-Replay: true`` so the network layer routes it to the Service itself,
not back to the producer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httptools
import redis.asyncio as aioredis
from aiohttp import hdrs
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisClusterException, RedisError

from . import http1client, idempotency, redisconn, targets
from .batching import GroupedBatcher
from .deadletters import add_dead_letter, dead_letter_key
from .notifications import Metrics as NotificationMetrics, Notifier, add_notification, notification, sink_for
from .envelope import Envelope, EnvelopeError, as_text, entry_envelope, header_text
from .queues import Layout, Queue, labels_of, service_tag
from .records import (
    CANCELED, EXPIRED, FAILED, FINAL_STATES, PENDING_STATES, RETRYING, RUNNING, SUCCEEDED, Record, RecordedResponse,
    finished_channel, record_json, records_of, retry_key,
)
from .redisconn import by_slot, call_scripts, is_cluster, make_redis, master_of, register_script, transaction
from ..protocol import (
    BACKOFF_LINEAR, HOP_BY_HOP, DeliveryPolicy, ATTEMPT_HEADER, PREFER_HEADER, REPLAY_HEADER, REPLAY_VALUE, REQUEST_ID_HEADER, RESPOND_SYNC, dead_letter_entry,
    is_status_path,
)
from .preferences import replay_preference
from .retries import RetryMover, backoff, replay_retryable, retry_after
from .tallies import CounterFamily, HistogramFamily
from .waiting import wait_preference
from ..settings import ReplaySettings
from ..logthrottle import LogThrottle

log = logging.getLogger(__name__)

FinalWrite = tuple[str, "bytes | str", "str | None", int, "dict[str, str] | None", "str | None", bool]
"""A final record: its key, JSON, the stream entry it settles, its lifetime (ms), the notification it sends,
the idempotency key it renews, whether to announce it (:func:`awaited`)."""

Settle = Callable[..., None]
"""``settle(pipe, *entry_ids)``: add what settles these stream entries to the transaction ``pipe``."""

Started = "tuple[str, str | None] | None"
"""What a source found starting a request as it read its entry (``queues.TAKE``): the record key it marked running
(state None) or found finished (its state); None: not started, the replay core starts it."""

Finish = Callable[[Sequence[tuple[str, Any, Any, int, "str | None", bool]]], list[tuple[list[int], tuple]]]
"""``finish(writes)``: script calls (script, keys, args) that write final records (key, JSON, entry, lifetime in
ms, idempotency key renewed, whether announced) and settle their entries, each with the positions of the writes it covers (the source's
:meth:`~.source.Source.finish_calls`)."""

Answered = Callable[[Any], None]
"""``answered(entry)``: the Service answered (or could not be reached) the replay of this stream entry; only its
outcome is left to write. A source frees the entry's delivery slot then: the Service no longer holds it."""

REPLACED_HEADERS = frozenset({PREFER_HEADER.lower(), REQUEST_ID_HEADER.lower(), ATTEMPT_HEADER.lower(),
                              REPLAY_HEADER.lower(), "host"})
"""Request headers the replay sets itself."""

REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
"""What an unreachable or refusing Redis raises: worth delivering again later, unlike any other error.
redis-py's cluster client raises RedisClusterException, which is no RedisError, when it finds no master
to ask (all of them down)."""

RECORD_MARGIN = 10.0
"""Seconds past REQUEST_TIMEOUT a stopping process gives a replay in flight: to record its outcome and settle it."""

MOVER_INTERVAL = 0.2
ERROR_BODY_LIMIT = 500


# The check and mark of a request about to start, shared by START_SCRIPT and the source's TAKE (queues.take_script).
# start(record key, running record, attempt about to start) returns the request's state when it is finished, or
# when this attempt already ended in a scheduled retry (a redelivered event); else it marks the request running
# (no expiry: a request in progress never reads 404) and returns false. The states are part of the text.
START_FUNCTION = """
local finished = {%(finished)s}
local function start(key, running, attempt)
  local old = redis.call('GET', key)
  if old then
    local ok, doc = pcall(cjson.decode, old)
    if ok and type(doc) == 'table' then
      local was = doc['state']
      if finished[was] or (was == '%(retrying)s' and (tonumber(doc['attempts']) or 0) >= attempt) then
        return was
      end
    end
  end
  redis.call('SET', key, running)
  return false
end
-- start() for a stream entry's envelope (its JSON) read from the queue named member (a Service's hash tag), whose
-- records are records .. <request id>: {record key, start()'s answer}, or 0 when the envelope is not one to mark
-- here (unreadable, or for another Service's host): the replay core then checks it and starts it itself.
local function start_entry(raw, member, records, now)
  local ok, doc = pcall(cjson.decode, raw or '')
  if not ok or type(doc) ~= 'table' or type(doc['id']) ~= 'string' or type(doc['url']) ~= 'string'
      or type(doc['attempt']) ~= 'number' or type(doc['accepted_at']) ~= 'number' then
    return 0
  end
  local host = string.match(doc['url'], '^[hH][tT][tT][pP][sS]?://([^/?#]+)')
  if not host then
    return 0
  end
  host = string.lower(host)
  local name = string.match(host, '^[^:]*')
  local service, namespace = string.match(name, '^([^.]+)%%.([^.]+)%%.svc%%.')
  if (service and namespace .. '/' .. service or name) ~= member then
    return 0
  end
  local key = records .. doc['id']
  local attempt = doc['attempt'] + 1
  local running = '{"state":"%(running)s","host":' .. cjson.encode(host) .. ',"attempts":' .. attempt ..
    ',"updated_at":' .. now .. ',"accepted_at":' .. string.format('%%.17g', doc['accepted_at']) .. '}'
  return {key, start(key, running, attempt)}
end
""" % {"finished": ", ".join(f"['{state}'] = true" for state in FINAL_STATES), "retrying": RETRYING,
       "running": RUNNING}

# KEYS: the records of requests about to start (all under one Service's hash tag); ARGV: per record, its
# running record and the attempt about to start. One round trip for a batch: start() for each, in order.
START_SCRIPT = START_FUNCTION + """
local states = {}
for i, key in ipairs(KEYS) do
  states[i] = start(key, ARGV[2 * i - 1], tonumber(ARGV[2 * i]))
end
return states
"""

# KEYS[1] a canceled request's record, KEYS[2] (optional) its idempotency key, both under its Service's hash tag;
# ARGV[1] its request id, ARGV[2] the result's lifetime (ms: the Service's retention). A cancel leaves the record of a
# pending request without an expiry, so that it outlives any wait for its entry (a record gone before the entry is
# read would let the request be replayed); settling the canceled entry gives it the result's lifetime (a record
# canceled by an older producer keeps the expiry it has). The key, while it still holds this request's claim
# ('<fingerprint> <entry id> <request id>'), is kept as long as the record: the cancel could not name the key of a
# queued request (its grammar is the producer's, in Python). Returns the record's lifetime (ms), 0 when it is gone.
SETTLE_CANCELED = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then
  ttl = tonumber(ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if ttl <= 0 then
  return 0
end
if KEYS[2] then
  local claim = redis.call('GET', KEYS[2])
  if claim and string.sub(claim, -#ARGV[1] - 1) == ' ' .. ARGV[1] then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
return ttl
"""


@dataclasses.dataclass(frozen=True)
class Terms:
    """How one Service's requests are delivered: its policy (``protocol.DeliveryPolicy``) over the cluster's defaults."""

    max_attempts: int
    base_delay: float
    linear: bool
    timeout: float
    retry_on: tuple[str, ...]
    max_age: float | None
    retention_ms: int


def delivery_terms(settings: ReplaySettings, policy: DeliveryPolicy) -> Terms:
    retention = settings.status_retention if policy.retention is None else policy.retention
    return Terms(
        max_attempts=settings.max_attempts if policy.retry is None else policy.retry + 1,
        base_delay=settings.retry_base_delay if policy.backoff_delay is None else policy.backoff_delay,
        linear=(policy.backoff_policy or settings.backoff_policy) == BACKOFF_LINEAR,
        # REQUEST_TIMEOUT is also the most: stopping processes and the consumer's revision allow a replay that long
        timeout=settings.request_timeout if policy.timeout is None else min(policy.timeout, settings.request_timeout),
        retry_on=settings.retry_on if policy.retry_on is None else policy.retry_on,
        max_age=settings.max_age if policy.max_age is None else policy.max_age,
        retention_ms=max(1, round(retention * 1000)),
    )


@dataclasses.dataclass(frozen=True)
class Replayed:
    """What one replay came to: a response, or the error that prevented one."""

    response: RecordedResponse | None = None
    error: str | None = None
    retryable: bool = False
    expired: bool = False
    attempted: bool = True
    """False: ended before this attempt was made (past its max-age, or refused): not counted as one."""

    @property
    def ok(self) -> bool:
        return self.response is not None and 200 <= self.response.status < 400


STREAM_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _pending(recorded: bytes | None) -> bool:
    """Whether a stored record is that of a request queued, running or waiting for a retry."""
    try:
        return recorded is not None and Record.from_json(recorded).state in PENDING_STATES
    except ValueError:
        return False


def split_url(url: str) -> tuple[str, str]:
    """``(host[:port], path?query)`` of a stored URL, the target kept exactly as stored."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise EnvelopeError(f"the queued URL does not parse ({exc}): {url[:200]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EnvelopeError(f"the queued URL is not an http(s) URL: {url!r}")
    rest = url.split("://", 1)[1][len(parts.netloc):]
    return parts.netloc.lower(), (rest if rest.startswith("/") else "/" + rest)


_PREFER = PREFER_HEADER.lower()


def replay_headers(envelope: Envelope, attempt: int, host: str | None) -> list[tuple[str, str]]:
    """The queued headers, with ``respond-sync`` before the request's other preferences, and the replay's own."""
    headers = [(k, v) for k, v in envelope.headers if k.lower() not in REPLACED_HEADERS]
    prefer = [v for k, v in envelope.headers if k.lower() == _PREFER]
    headers += ((PREFER_HEADER, replay_preference(prefer) if prefer else RESPOND_SYNC), (REPLAY_HEADER, REPLAY_VALUE),
                (REQUEST_ID_HEADER, envelope.id), (ATTEMPT_HEADER, str(attempt)))
    if host is not None:
        headers.append((hdrs.HOST, host))
    return headers



def awaited(envelope: Envelope, idempotency_key: str | None) -> bool:
    """Whether a client may be waiting for the request's outcome, so it is announced on the finished channel:
    it asked to (``Prefer: wait``), or a repeat with its ``Idempotency-Key`` may. Announcing every outcome
    woke every producer once per delivery for nothing (~40 µs of a producer's CPU each)."""
    if idempotency_key is not None:
        return True
    return any("wait" in value.lower() and wait_preference([value]) is not None
               for name, value in envelope.headers if name.lower() == _PREFER)


_NAMES: dict[bytes, str | None] = {}
"""A response header's name as read (:func:`.envelope.header_text`), or None for one never recorded: a Service
sends the same few names with every response."""


def recorded_headers(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    """The headers of a response worth recording, read as :func:`.envelope.header_text` reads them, in one pass
    (each delivery records them): hop-by-hop and framing headers are the transport's business."""
    kept = []
    names = _NAMES
    for name, value in pairs:
        try:
            text = names[name]
        except KeyError:
            text = header_text(name)
            if text.lower() in HOP_BY_HOP:
                text = None
            if len(names) >= 1024:
                names.clear()
            names[name] = text
        if text is not None:
            try:
                kept.append((text, value.decode()))
            except UnicodeDecodeError:
                kept.append((text, header_text(value)))
    return tuple(kept)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What handling one queued request came to, as the HTTP consumer answers its event.

    2xx: the outcome is recorded (or was already), the entry can be acknowledged;
    400: not a queued request, it can never succeed; 503: the request store is
    unavailable, deliver it again later.
    """

    status: int
    doc: dict

    @property
    def text(self) -> str:
        """The answer as the sink's body (JSON): for a log line or a dead letter, when it is not 2xx."""
        return json.dumps(self.doc)


def error_answer(status: int, message: str) -> Answer:
    return Answer(status, {"error": message})


def replay_grace(settings: ReplaySettings) -> float:
    """How long a stopping process waits for its replays in flight: the longest one may take, and its record.

    Cut short, a replay stays unsettled and is replayed again by another process: its Service is called twice.
    """
    return settings.request_timeout + RECORD_MARGIN


def replay_route(settings: ReplaySettings) -> str:
    """For the startup log line."""
    return f"through {settings.target_gateway_url}" if settings.target_gateway_url else "directly"


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.replays = CounterFamily("async_consumer_replays_total", "Replays to the Service, by outcome",
                                     ["outcome"], registry=registry)
        self.replays_by = {outcome: self.replays.labels(outcome) for outcome in (SUCCEEDED, RETRYING, FAILED, EXPIRED)}
        self.replay_seconds = HistogramFamily(
            "async_consumer_replay_seconds", "Time from sending the replay to having the Service's full response",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.retries_scheduled = Counter("async_consumer_retries_scheduled_total", "Retries put in the retry set",
                                         registry=registry)
        self.retries_moved = Counter("async_consumer_retries_moved_total", "Due retries moved back to the stream",
                                     registry=registry)
        self.expired = Counter("async_consumer_expired_total", "Requests that ended expired (past their max-age)",
                               registry=registry)
        self.dead_lettered = Counter("async_consumer_dead_lettered_total", "Requests sent to the dead-letter stream",
                                     registry=registry)
        self.events = CounterFamily("async_consumer_events_total", "Events received, by how they were answered",
                                    ["result"], registry=registry)
        self.events_by = {result: self.events.labels(result)
                          for result in ("replayed", "duplicate", "malformed", "refused", "redis_unavailable")}
        self.outcomes = CounterFamily(
            "async_service_outcomes_total",
            "Attempts per Service by outcome: succeeded, failed (finished without success), retried, dead_lettered, "
            "expired",
            ["namespace", "service", "outcome"], registry=registry,
        )
        self.delivery_latency = HistogramFamily(
            "async_service_delivery_latency_seconds",
            "Per Service: from a request's acceptance to the start of its first replay (time spent queued)",
            ["namespace", "service"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
        )
        self._children: dict[tuple, Any] = {}

    def outcome(self, host: str, outcome: str) -> None:
        self._child(self.outcomes, host, outcome).inc()

    def queued_for(self, host: str, seconds: float) -> None:
        self._child(self.delivery_latency, host).observe(seconds)

    def _child(self, metric, host: str, *rest: str):
        """Label lookups take a lock and a dict walk: each child is bound once."""
        key = (metric, host, *rest)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 10_000:
                self._children.clear()
            child = self._children[key] = metric.labels(*labels_of(service_tag(host)), *rest)
        return child


class Replayer:
    """Replays queued requests and records their outcomes; :meth:`start` before use, :meth:`stop` after.

    Uses ``redis`` when given (the caller closes it), else creates its own client. ``settle``: the hook
    of a source delivering in-process (:meth:`handle_entry`); the source owns settling its entries, the
    core only chooses the transaction they are settled in.
    """

    def __init__(self, settings: ReplaySettings, registry: CollectorRegistry, *, redis: aioredis.Redis | None = None,
                 mover_interval: float = MOVER_INTERVAL, settle: Settle | None = None,
                 finish: Finish | None = None, answered: Answered | None = None) -> None:
        self.settings = settings
        self.settle = settle
        self.finish = finish
        self.answered = answered
        self.layout = Layout.of(settings)
        self.metrics = Metrics(registry)
        self.notification_metrics = NotificationMetrics(registry)
        self.redis = redis
        self.owns_redis = False
        self.session: aiohttp.ClientSession | None = None
        """For the completion events (:mod:`.notifications`); replays go through :attr:`client`."""
        self.client = http1client.Client(max_body=settings.response_size_limit)
        self.mover_interval = mover_interval
        self.mover_task: asyncio.Task | None = None
        self.stopping = asyncio.Event()
        self.throttle = LogThrottle(log)
        self._terms: dict[str, Terms] = {}
        self._origins: dict[str, tuple[str, str | None, str]] = {}
        gateway = settings.target_gateway_url
        origin = http1client.split_origin(gateway)[0] if gateway else ""
        self.gateway = (origin, gateway[len(origin):]) if gateway else None
        """TARGET_GATEWAY_URL split once: its origin, and the path (if any) replayed targets go after."""
        self.finished = finished_channel(settings.key_prefix)
        self.start_script = None
        self.settle_canceled = None
        self.starts: GroupedBatcher[tuple[str, list], bytes | None] | None = None
        self.sets: GroupedBatcher[FinalWrite, None] | None = None
        self.notifier: Notifier | None = None
        self.notifier_task: asyncio.Task | None = None

    def terms(self, envelope: Envelope) -> Terms:
        """The request's terms, remembered per policy (a few Services send almost every request)."""
        terms = self._terms.get(envelope.policy)
        if terms is None:
            if len(self._terms) >= 1024:
                self._terms.clear()
            terms = self._terms[envelope.policy] = delivery_terms(self.settings, envelope.delivery_policy)
        return terms

    # --- one queued request

    def handle_entry(self, entry_id: str, fields: Any, *, ref: Any = None, started: Started = None
                     ) -> Awaitable[Answer]:
        """A stream entry's fields, as a source delivering in-process reads them; 2xx once it is settled.

        The transaction that records the outcome also settles the entry, through the ``settle``
        hook (one round trip less per entry, and never an outcome without its ack or the
        reverse); an entry whose request is already finished is settled on its own. ``ref``: what
        the hook is given for this entry (default: ``entry_id``). ``started``: what the source found
        starting the request as it read the entry, if it did.

        A plain function returning the coroutine: one frame less for each delivery's every resumption.
        """
        try:
            envelope = entry_envelope(fields)
        except EnvelopeError as exc:
            return self._unstart(started, self.malformed(entry_id, str(exc)))
        return self.handle(entry_id, envelope, settle=entry_id if ref is None else ref, started=started)

    async def handle(self, event_id: str, envelope: Envelope, *, settle: Any = None,
                     retry_queue: Queue | None = None, started: Started = None) -> Answer:
        """Replay and record; ``settle``: a stream entry to settle (with the hook) with the outcome.

        ``retry_queue``: where a retry waits (default: the request's own queue in this install's layout);
        the sink passes the single stream's for an event read from it, so a retry goes back where
        Knative's RedisStreamSource reads. ``started``: see :data:`Started`.
        """
        try:
            host, origin, target, refused, records = self.origin(envelope.url)
        except EnvelopeError as exc:
            return await self._unstart(started, self.malformed(event_id, str(exc)))
        attempt = envelope.attempt + 1
        key = records + envelope.id  # record_key()
        if started is not None and started[0] != key:  # read differently there: start it here
            await self._unstart(started, None)
            started = None
        never = None
        """Why the request is not replayed but ends failed (after it is started, so a finished one stays as it is)."""
        if refused is not None:
            self.metrics.events_by["refused"].inc()
            log.warning("request %s (ce-id %s) refused, not replayed: %s", envelope.id, event_id, refused)
            if settle is None:  # an event: any pod can post one; only a pending request of ours is recorded
                try:
                    recorded = await self.redis.get(key)
                    ours = _pending(recorded) or (recorded is None and retry_queue is not None
                                                  and await self._queued_as(retry_queue.stream, event_id, envelope))
                except REDIS_ERRORS as exc:
                    return self._unavailable(envelope, "refusing", exc)
                if not ours:
                    return error_answer(400, f"request {envelope.id} is not replayed: {refused}")
            # read from a queue here, or replayed before the policy changed: a client may be polling it
            never = Replayed(error=f"not replayed: {refused}", attempted=False)
        elif is_status_path(target.partition("?")[0]):
            # routed to the producer, not the Service: it would be queued again, without end
            never = Replayed(error=f"the target {target[:200]!r} is the status path: it is never replayed",
                             attempted=False)
        terms = self.terms(envelope)
        now = time.time()
        try:
            if started is not None:  # the source's read started it (queues.TAKE)
                done_state = started[1]
            else:
                running = Record(state=RUNNING, host=host, attempts=attempt, updated_at=now,
                                 accepted_at=envelope.accepted_at)
                done_state = await self.starts.submit((key, [running.to_json(), attempt]))
        except REDIS_ERRORS as exc:  # Redis down: nothing replayed yet; the source delivers again later
            return self._unavailable(envelope, "starting", exc)
        except Exception as exc:  # not Redis: this request would fail the same way every time
            return await self._given_up(key, envelope, attempt - 1, host, event_id, exc)
        if done_state:
            state = as_text(done_state)
            self.metrics.events_by["duplicate"].inc()
            log.info("request %s attempt %d: already %s, not replayed again", envelope.id, attempt, state)
            if state == CANCELED:  # before the settle: a crash in between delivers it again, set again
                renewed = idempotency.queued_key_name(self.settings.key_prefix, host, envelope.headers)
                try:
                    await self.settle_canceled(keys=[key] if renewed is None else [key, renewed],
                                               args=[envelope.id, terms.retention_ms])
                except Exception as exc:
                    return self._unavailable(envelope, "settling the cancel of", exc)
            if settle is not None:
                try:
                    async with transaction(self.redis) as pipe:
                        self._settle(pipe, settle)
                        await pipe.execute()
                except Exception as exc:  # left pending: delivered again, found finished again
                    return self._unavailable(envelope, "settling a duplicate of", exc)
            return Answer(200, {"id": envelope.id, "state": state, "duplicate": True})

        if never is not None:
            return await self._finish(key, envelope, attempt, host, never, settle, retry_queue)
        if attempt == 1:
            self.metrics.queued_for(host, max(0.0, now - envelope.accepted_at))
        if terms.max_age is not None and time.time() >= envelope.accepted_at + terms.max_age:
            expired = Replayed(error=f"not finished within its max-age of {terms.max_age:g}s: never replayed",
                               expired=True, attempted=False)
            return await self._finish(key, envelope, attempt, host, expired, settle, retry_queue)
        replayed = await self.replay(envelope, attempt, host, origin, target)
        if self.answered is not None and settle is not None:
            self.answered(settle)
        return await self._finish(key, envelope, attempt, host, replayed, settle, retry_queue)

    async def _queued_as(self, stream: str, entry_id: str, envelope: Envelope) -> bool:
        """Whether ``stream`` holds entry ``entry_id`` for this very request and URL: a first attempt read by
        Knative's RedisStreamSource (the producer writes no record until then), not an event made up elsewhere."""
        if not STREAM_ENTRY_ID.fullmatch(entry_id):
            return False
        entries = await self.redis.xrange(stream, entry_id, entry_id)
        if not entries:
            return False
        try:
            queued = entry_envelope(entries[0][1])
        except EnvelopeError:
            return False
        return queued.id == envelope.id and queued.url == envelope.url

    async def _unstart(self, started: Started, answer: Answer | None) -> Answer | None:
        """A request the source marked running but the core does not replay: its record goes again (it was
        never called), so it does not read ``running`` for ever; left as it was if the source found it finished."""
        if started is not None and started[1] is None:
            try:
                await self.redis.delete(started[0])
            except REDIS_ERRORS as exc:
                self.throttle.warning("request record %s left running: %s: %s", started[0], type(exc).__name__, exc)
        return answer

    async def _finish(self, key: str, envelope: Envelope, attempt: int, host: str,
                      replayed: Replayed, settle: Any, retry_queue: Queue | None) -> Answer:
        try:
            state = await self._record_outcome(key, envelope, attempt, host, replayed, settle, retry_queue)
        except REDIS_ERRORS as exc:  # the outcome is not durable: let the source deliver again
            return self._unavailable(envelope, "recording the outcome of", exc)
        except Exception as exc:  # not Redis: recording it would fail the same way every time
            return await self._given_up(key, envelope, attempt if replayed.attempted else attempt - 1, host,
                                        envelope.id, exc)
        self.metrics.events_by["replayed"].inc()
        self.metrics.replays_by[state].inc()
        return Answer(200, {"id": envelope.id, "state": state, "attempt": attempt})

    async def _given_up(self, key: str, envelope: Envelope, attempts: int, host: str, event_id: str,
                        exc: BaseException) -> Answer:
        """:meth:`unreplayable`, and the request ends ``failed`` if its record still says it is pending: nothing
        replays it again (its sender takes the 400 for good), so it would read ``running`` for ever. Best effort,
        and only over a pending record: a request something else finished keeps its record."""
        answer = self.unreplayable(event_id, envelope, exc)
        try:
            if _pending(await self.redis.get(key)):
                terms = self.terms(envelope)
                renewed = idempotency.queued_key_name(self.settings.key_prefix, host, envelope.headers)
                record = Record(state=FAILED, host=host, attempts=attempts, updated_at=time.time(),
                                error=f"cannot be replayed: {type(exc).__name__}: {exc}",
                                accepted_at=envelope.accepted_at, idempotency_key=renewed)
                async with transaction(self.redis) as pipe:  # one lifetime for record and key, as a finish gives
                    pipe.set(key, record.to_json(), px=terms.retention_ms)
                    if renewed is not None:
                        pipe.pexpire(renewed, terms.retention_ms)
                    await pipe.execute()
        except Exception as error:  # Redis down too: it reads as it did
            self.throttle.warning("request %s left as it was recorded: %s: %s", envelope.id, type(error).__name__,
                                  error)
        return answer

    def malformed(self, event_id: str, message: str) -> Answer:
        self.metrics.events_by["malformed"].inc()
        if len(message) > ERROR_BODY_LIMIT:  # the SDK quotes the whole body in some of its errors
            message = message[:ERROR_BODY_LIMIT] + "..."
        log.warning("rejected a malformed event (ce-id %s): %s", event_id, message)
        return error_answer(400, message)

    def origin(self, url: str) -> tuple[str, str, str, str | None, str]:
        """:func:`split_url` of a queued URL, its ``scheme://host[:port]`` as written, and for its host the target
        policy's refusal (or None) and the start of its records' keys: worked out once per origin (a few Services
        send almost every request). Raises EnvelopeError as split_url does."""
        origin, target = http1client.split_origin(url)
        known = self._origins.get(origin)
        if known is None:
            host, _ = split_url(url)  # its errors name the whole URL
            if len(self._origins) >= 1024:
                self._origins.clear()
            known = self._origins[origin] = (host, self.target_refusal(host),
                                             records_of(self.settings.key_prefix, service_tag(host)))
        host, refused, records = known
        return host, origin, target if target.startswith("/") else "/" + target, refused, records

    def target_refusal(self, host: str) -> str | None:
        """Why the target-host policy (the producer's) refuses the queued URL's ``host``, or None."""
        try:
            return targets.refusal(targets.target_host(host, "the queued URL's host"), self.settings)
        except targets.BadTarget as exc:
            return str(exc)

    def unreplayable(self, event_id: str, envelope: Envelope, exc: BaseException) -> Answer:
        """A request the core cannot handle (a bug or an input it did not foresee): 400, so it is dead-lettered."""
        log.error("request %s cannot be replayed", envelope.id, exc_info=exc)
        return self.malformed(event_id, f"request {envelope.id} cannot be replayed: {type(exc).__name__}: {exc}")

    def _unavailable(self, envelope: Envelope, what: str, exc: BaseException) -> Answer:
        self.metrics.events_by["redis_unavailable"].inc()
        self.throttle.warning("request %s: Redis unavailable while %s the replay, answering 503: %s: %s",
                              envelope.id, what, type(exc).__name__, exc)
        return error_answer(503, "the request store is unavailable, deliver the event again later")

    async def _start_batch(self, items: list[tuple[str, list]]) -> list:
        """The requests that start in the same loop pass: one start script per hash slot, in one round trip
        (one per node on a cluster)."""
        groups = by_slot(key for key, _ in items)
        replies = await call_scripts(self.redis, [
            (self.start_script, [items[i][0] for i in slots], [arg for i in slots for arg in items[i][1]])
            for slots in groups.values()])
        results: list = [None] * len(items)
        for slots, reply in zip(groups.values(), replies):
            for n, i in enumerate(slots):
                results[i] = reply if isinstance(reply, Exception) else reply[n]
        return results

    async def _set_batch(self, items: list[FinalWrite]) -> list[None]:
        """Final records written in the same loop pass, with the entries they settle, the notifications
        they send and the idempotency keys they renew (kept as long as the record from now on), in one
        round trip: where the settle hook can, in scripts (one, or on a cluster one per queue), else a transaction."""
        results: list = [None] * len(items)
        scripted = [i for i, (_, _, entry, _, notice, _, _) in enumerate(items) if entry is not None and notice is None]
        calls = [] if self.finish is None or not scripted else self.finish(
            [(key, value, entry, ms, renewed, announce)
             for key, value, entry, ms, _, renewed, announce in (items[i] for i in scripted)])
        if calls:
            for (positions, _), reply in zip(calls, await call_scripts(self.redis, [call for _, call in calls])):
                for n in positions:
                    results[scripted[n]] = reply if isinstance(reply, Exception) else None
        covered = {scripted[n] for positions, _ in calls for n in positions}
        rest = [i for i in range(len(items)) if i not in covered]
        if not rest:
            return results
        entries = [items[i][2] for i in rest if items[i][2] is not None]
        notifying = any(items[i][4] is not None for i in rest)
        atomic = bool(entries) or notifying or is_cluster(self.redis)  # a cluster's pipeline cannot PUBLISH
        positions = {}  # of each record's SET among the replies: its own error (on a cluster, its slot's)
        async with (transaction(self.redis) if atomic else self.redis.pipeline(transaction=False)) as pipe:
            for i in rest:
                key, value, _, retention_ms, notice, _, _ = items[i]
                positions[i] = len(pipe)
                pipe.set(key, value, px=retention_ms)
                add_notification(pipe, self.settings, notice, key)
            self._settle(pipe, *entries)
            for i in rest:  # after the records: a woken waiter reads them
                key, _, _, retention_ms, _, idempotency_key, announce = items[i]
                if announce:
                    pipe.publish(self.finished, key)
                if idempotency_key is not None:
                    pipe.pexpire(idempotency_key, retention_ms)
            replies = await pipe.execute(raise_on_error=False)
        if notifying:
            self._notifying(items[i][0] for i in rest if items[i][4] is not None)
        for i in rest:
            results[i] = replies[positions[i]] if isinstance(replies[positions[i]], Exception) else None
        return results

    def _notifying(self, records: Iterable[str]) -> None:
        """Notifications were added with these final records: this process's notifier drains their outboxes."""
        if self.notifier is not None:
            for key in records:
                self.notifier.wake(key)

    def _settle(self, pipe, *entries: str) -> None:
        """Settle ``entries`` in the transaction that records their outcome, through the source's hook.

        All or nothing: a transaction Redis refuses (say, out of memory) writes neither.
        """
        if entries:
            self.settle(pipe, *entries)

    # --- the replay

    async def replay(self, envelope: Envelope, attempt: int, host: str, origin: str, target: str) -> Replayed:
        """Call the Service (through the gateway, when there is one) and read its whole response."""
        gateway = self.gateway
        if gateway is not None:  # the gateway's origin, the target after its path (if it has one)
            origin, target = gateway[0], gateway[1] + target
        headers = replay_headers(envelope, attempt, host if gateway else None)
        terms = self.terms(envelope)
        started = time.perf_counter()
        try:
            raw = await self.client.send(envelope.method, origin, target, headers, envelope.body,
                                         timeout=terms.timeout)
            recorded = RecordedResponse(raw.status, recorded_headers(raw.headers), bytes(raw.body))
        except http1client.InvalidURL as exc:
            return Replayed(error=f"invalid URL {exc}")
        except http1client.ResponseTooLarge as exc:  # the Service did the work: calling it again would not help
            log.warning("request %s attempt %d: %s, over RESPONSE_SIZE_LIMIT: not kept", envelope.id, attempt, exc)
            return Replayed(error=f"{exc}, over RESPONSE_SIZE_LIMIT: not kept")
        except (TimeoutError, OSError, httptools.HttpParserError) as exc:
            error = (f"no answer within {terms.timeout:g}s" if isinstance(exc, TimeoutError)
                     else f"{type(exc).__name__}: {exc}")
            log.info("request %s attempt %d: %s %s%s failed: %s", envelope.id, attempt, envelope.method, origin, target,
                     error)
            return Replayed(error=error, retryable=True)
        except ValueError as exc:  # a method, target or header that cannot be sent as it is
            return Replayed(error=f"cannot send the request: {exc}")
        self.metrics.replay_seconds.observe(time.perf_counter() - started)
        log.info("request %s attempt %d: %s %s%s answered %d", envelope.id, attempt, envelope.method, origin, target,
                 recorded.status)
        error = None if 200 <= recorded.status < 400 else f"the Service answered {recorded.status}"
        return Replayed(response=recorded, error=error, retryable=replay_retryable(recorded.status, terms.retry_on))

    def retry_delay(self, attempt: int, replayed: Replayed, terms: Terms) -> float:
        """The Service's ``Retry-After`` on a 429 or 503, else the request's backoff; capped by RETRY_MAX_DELAY."""
        settings = self.settings
        asked = None if replayed.response is None else retry_after(replayed.response.status,
                                                                    replayed.response.headers)
        if asked is not None:
            return min(asked, settings.retry_max_delay)
        return backoff(attempt, terms.base_delay, settings.retry_max_delay, linear=terms.linear)

    async def _record_outcome(self, key: str, envelope: Envelope, attempt: int, host: str, replayed: Replayed,
                              settle: Any, retry_queue: Queue | None = None) -> str:
        now = time.time()
        entries = () if settle is None else (settle,)
        terms = self.terms(envelope)
        idempotency_key = idempotency.queued_key_name(self.settings.key_prefix, host, envelope.headers)
        if replayed.ok:
            await self.sets.submit((key, record_json(SUCCEEDED, host, attempt, now, response=replayed.response,
                                                     accepted_at=envelope.accepted_at,
                                                     idempotency_key=idempotency_key),
                                    settle, terms.retention_ms,
                                    self._notice(envelope, SUCCEEDED, host, attempt, replayed, now), idempotency_key,
                                    awaited(envelope, idempotency_key)))
            self.metrics.outcome(host, SUCCEEDED)
            return SUCCEEDED
        settings = self.settings
        if replayed.retryable and attempt < terms.max_attempts:
            due = now + self.retry_delay(attempt, replayed, terms)
            if terms.max_age is not None and due >= envelope.accepted_at + terms.max_age:
                replayed = dataclasses.replace(
                    replayed, expired=True, error=f"{replayed.error}; the next attempt would come after its max-age "
                                                  f"of {terms.max_age:g}s: never replayed")
        if replayed.expired:
            attempts = attempt if replayed.attempted else attempt - 1
            await self.sets.submit((key, Record(state=EXPIRED, host=host, attempts=attempts, updated_at=now,
                                                error=replayed.error, response=replayed.response,
                                                accepted_at=envelope.accepted_at,
                                                idempotency_key=idempotency_key).to_json(),
                                    settle, terms.retention_ms,
                                    self._notice(envelope, EXPIRED, host, attempts, replayed, now), idempotency_key,
                                    awaited(envelope, idempotency_key)))
            self.metrics.expired.inc()
            self.metrics.outcome(host, EXPIRED)
            log.warning("request %s expired: %s", envelope.id, replayed.error)
            return EXPIRED
        if replayed.retryable and attempt < terms.max_attempts:
            record = Record(state=RETRYING, host=host, attempts=attempt, updated_at=now, error=replayed.error,
                            next_attempt_at=due, accepted_at=envelope.accepted_at,
                            idempotency_key=idempotency_key)  # a cancel gives the key the canceled record's lifetime
            queue = retry_queue or self.layout.for_host(host)
            async with transaction(self.redis) as pipe:
                pipe.zadd(queue.retries, {envelope.next_attempt().to_json(): due})
                pipe.zadd(self.layout.active_for(queue), {queue.member: due}, lt=True)  # sources look again when it is due
                pipe.set(key, record.to_json())  # no expiry while the request is pending (nor its key's)
                self._settle(pipe, *entries)
                await pipe.execute()
            self.metrics.retries_scheduled.inc()
            self.metrics.outcome(host, "retried")
            log.info("request %s attempt %d: %s; retry in %.3fs", envelope.id, attempt, replayed.error, due - now)
            return RETRYING
        attempts = attempt if replayed.attempted else attempt - 1
        record = Record(state=FAILED, host=host, attempts=attempts, updated_at=now, error=replayed.error,
                        response=replayed.response, accepted_at=envelope.accepted_at,
                        idempotency_key=idempotency_key)
        dead = dead_letter_entry(envelope.to_stream_fields(), replayed.error or "failed",
                                 None if replayed.response is None else replayed.response.status,
                                 service=service_tag(host))
        notice = self._notice(envelope, FAILED, host, attempts, replayed, now)
        async with transaction(self.redis) as pipe:
            pipe.set(key, record.to_json(), px=terms.retention_ms)
            add_dead_letter(pipe, settings, dead)
            add_notification(pipe, settings, notice, key)
            self._settle(pipe, *entries)
            if awaited(envelope, idempotency_key):
                pipe.publish(self.finished, key)
            if idempotency_key is not None:
                pipe.pexpire(idempotency_key, terms.retention_ms)
            await pipe.execute()
        if notice is not None:
            self._notifying((key,))
        self.metrics.dead_lettered.inc()
        self.metrics.outcome(host, FAILED)
        self.metrics.outcome(host, "dead_lettered")
        log.warning("request %s failed after %d attempt(s): %s; sent to %s", envelope.id, attempts, replayed.error,
                    dead_letter_key(settings, service_tag(host)))
        return FAILED

    def _notice(self, envelope: Envelope, state: str, host: str, attempts: int, replayed: Replayed,
                now: float) -> dict[str, str] | None:
        """The completion event the Service's policy asks for (None: no sink for this outcome)."""
        sink = sink_for(envelope.delivery_policy, state)
        if sink is None:
            return None
        return notification(sink=sink, state=state, request_id=envelope.id, host=host, attempts=attempts,
                            response=replayed.response, error=replayed.error, request_headers=envelope.headers,
                            body_limit=self.settings.notification_body_limit, finished_at=now)

    # --- lifecycle

    async def start(self) -> None:
        if self.redis is None:
            self.redis = make_redis(self.settings)
            self.owns_redis = True
        self.start_script = register_script(self.redis, START_SCRIPT)
        self.settle_canceled = register_script(self.redis, SETTLE_CANCELED)
        # on a cluster a batch per master (by the record's key): one that hangs holds up only its own Services
        of_master = (lambda item: master_of(self.redis, item[0])) if is_cluster(self.redis) else None
        self.starts = GroupedBatcher(self._start_batch, of_master)
        self.sets = GroupedBatcher(self._set_batch, of_master)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one sink's cookies into another's event
            skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE),
        )
        # The single stream's retries: its reader may be Knative's RedisStreamSource, which moves none itself
        # (and in the per-Service layout, retries scheduled before the upgrade). Per-Service retries are moved
        # by the source that reads their queue (queues.TAKE).
        if not self.settings.cluster:  # a cluster has no single stream
            mover = RetryMover(self.redis, retry_set=retry_key(self.settings.key_prefix),
                               stream=self.settings.stream, on_moved=self.metrics.retries_moved.inc)
            self.mover_task = asyncio.create_task(mover.run(self.mover_interval, self.stopping), name="retry-mover")
        notifier = self.notifier = Notifier(
            self.redis, self.session, self.notification_metrics, prefix=self.settings.key_prefix,
            attempts=self.settings.notification_attempts, timeout=self.settings.notification_timeout,
            cluster=self.settings.cluster, allowed_hosts=self.settings.notification_allowed_hosts)
        self.notifier_task = asyncio.create_task(notifier.run(self.stopping), name="notifier")

    async def stop(self) -> None:
        self.stopping.set()
        if self.mover_task is not None:
            await self.mover_task
        if self.notifier_task is not None:
            await self.notifier_task
        if self.session is not None:
            await self.session.close()
        await self.client.close()
        if self.owns_redis:
            await self.redis.aclose()

    async def ready(self) -> None:
        await redisconn.ping(self.redis)
