"""Completion destinations: one CloudEvent per finished request, to the sink its Service's policy names.

The replay core adds a notification to the outbox stream ``<prefix>:notifications``
in the same transaction that writes the request's final record
(:func:`add_notification`), so a finished request is never left without its
notification, nor notified without being finished. Every process running the
replay core drains the outbox (:class:`Notifier`) through one consumer group:
each notification is posted with its own retries and removed once a sink took
it (2xx) or it used up its attempts; one left pending by a process that died is
claimed by another after :data:`RECLAIM_IDLE` seconds, so each is delivered at
least once (the event ``id`` is the same every time: sinks can deduplicate).
A failing sink never changes the request's state; it only shows in the metrics.

On a Redis Cluster the outbox is one stream per slot (the transaction that adds a
notification writes one slot): a process drains the outboxes its own replays
wrote to (:meth:`Notifier.wake`), and reads every slot's outbox length every
:data:`SWEEP_INTERVAL` for those other processes left (one that died, a source
dead-lettering an entry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as aioredis
from cloudevents.v1.conversion import to_binary
from cloudevents.v1.http import CloudEvent
from prometheus_client import CollectorRegistry, Counter
from redis.crc import key_slot
from redis.exceptions import ResponseError

from ..logthrottle import LogThrottle
from ..protocol import STATUS_PATH_PREFIX, DeliveryPolicy
from . import targets
from .envelope import STREAM_FIELD, as_text, encode_body
from .queues import SLOTS, slot_tag
from .redisconn import per_node, sweep, transaction
from .records import EXPIRED, FAILED, SUCCEEDED, RecordedResponse
from .retries import DELIVERED, REJECTED, backoff, sink_verdict, wait_event

log = logging.getLogger(__name__)

EVENT_TYPES = {
    SUCCEEDED: "dev.knative.async.request.succeeded",
    FAILED: "dev.knative.async.request.failed",
    EXPIRED: "dev.knative.async.request.expired",
}
GROUP = "async-notifier"
TRACE_HEADERS = ("traceparent", "tracestate")
"""W3C trace context: taken from the client's request, set on the event (its distributed tracing extension) and
on the POST that carries it."""
RECLAIM_IDLE = 120.0
"""Seconds a notification stays pending before another process claims it: longer than all its attempts take."""
SWEEP_INTERVAL = 60.0
"""On a cluster: seconds between looks at every slot's outbox."""
RETRY_BASE = 0.5
RETRY_CAP = 5.0


def outbox_key(prefix: str, slot: int | None = None) -> str:
    """The outbox; on a Redis Cluster one per slot: that of the final record it is written with."""
    return f"{prefix}:notifications" if slot is None else f"{prefix}:{{{slot_tag(slot)}}}:notifications"


def sink_for(policy: DeliveryPolicy, state: str) -> str | None:
    """The success sink for a succeeded request; the failure sink for a failed or expired one."""
    return policy.on_success_sink if state == SUCCEEDED else policy.on_failure_sink


def notification(*, sink: str, state: str, request_id: str, host: str, attempts: int,
                 response: RecordedResponse | None, error: str | None, request_headers: Sequence[Sequence[str]],
                 body_limit: int, finished_at: float) -> dict[str, str]:
    """The outbox entry's fields: where the event goes and what it says, as JSON (bodies binary-safe)."""
    data: dict[str, Any] = {"service": host, "state": state, "attempts": attempts,
                            "location": f"{STATUS_PATH_PREFIX}{request_id}", "status": None}
    if error is not None:
        data["error"] = error
    if response is not None:
        body = response.body[:body_limit]
        data["status"] = response.status
        data["body"], data["body_encoding"] = encode_body(body)
        data["body_truncated"] = len(body) < len(response.body)
        content_type = next((v for k, v in response.headers if k.lower() == "content-type"), None)
        if content_type is not None:
            data["content_type"] = content_type
    trace = {}
    for name, value in request_headers:
        if name.lower() in TRACE_HEADERS and name.lower() not in trace:
            trace[name.lower()] = value
    doc = {"sink": sink, "type": EVENT_TYPES[state], "id": f"{request_id}.{state}", "subject": request_id,
           "source": f"/async-requests/{host}", "time": finished_at, "trace": trace, "data": data}
    return {STREAM_FIELD: json.dumps(doc, separators=(",", ":"))}


def add_notification(pipe, settings, fields: Mapping[str, str] | None, record: str | None) -> None:
    """Queue ``fields`` (from :func:`notification`) in the caller's transaction, which writes the final ``record``
    (its key); None: nothing to send."""
    if fields is not None:
        pipe.xadd(outbox_key(settings.key_prefix, key_slot(record.encode()) if settings.cluster else None), fields)


def event_request(doc: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    """Headers and body of the binary-mode CloudEvent a notification is posted as."""
    attributes = {"type": doc["type"], "source": doc["source"], "id": doc["id"], "subject": doc["subject"],
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(doc["time"])),
                  "datacontenttype": "application/json", **doc["trace"]}
    headers, body = to_binary(CloudEvent(attributes, doc["data"]))
    headers = dict(headers)
    headers.update(doc["trace"])  # the POST itself continues the client's trace
    return headers, body


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notifications = Counter("async_notifications_total", "Completion events, by how their delivery ended",
                                     ["result"], registry=registry)
        self.sent = self.notifications.labels("sent")
        self.failed = self.notifications.labels("failed")
        self.retried = Counter("async_notification_retries_total", "Completion events posted again after a failure",
                               registry=registry)


def _sink_allowed(sink: str, allowed: tuple[str, ...]) -> bool:
    """Whether the sink URL's host is on NOTIFICATION_ALLOWED_HOSTS: a Service's owner names the sink, and the
    operator may not want the data plane posting wherever a Service points it (inside the cluster network)."""
    try:
        host = urlsplit(sink).hostname
    except ValueError:
        return False
    return bool(host) and targets.host_allowed(host, allowed)


class Notifier:
    """Drains the outbox: posts each notification to its sink, with retries, then removes it."""

    def __init__(self, redis: aioredis.Redis, session: aiohttp.ClientSession, metrics: Metrics, *,
                 prefix: str, attempts: int, timeout: float, concurrency: int = 16,
                 reclaim_idle: float = RECLAIM_IDLE, cluster: bool = False,
                 allowed_hosts: tuple[str, ...] | None = None) -> None:
        self.redis = redis
        self.allowed_hosts = allowed_hosts
        """NOTIFICATION_ALLOWED_HOSTS: the hosts a sink may name (None: any)."""
        self.session = session
        self.metrics = metrics
        self.prefix = prefix
        self.key = outbox_key(prefix)
        self.cluster = cluster
        self.outboxes: set[str] = set()
        """On a cluster: the slots' outboxes that may hold notifications."""
        self.grouped: set[str] = set()
        self.next_sweep = 0.0
        self.all_outboxes: list[str] | None = None
        self.attempts = attempts
        self.timeout = timeout
        self.slots = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency
        self.reclaim_idle = reclaim_idle
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.tasks: set[asyncio.Task] = set()
        self.throttle = LogThrottle(log)

    def wake(self, record: str) -> None:
        """On a cluster: a notification was added with the final ``record`` (its key); drain that slot's outbox."""
        if self.cluster:
            self.outboxes.add(outbox_key(self.prefix, key_slot(record.encode())))

    async def run(self, stop: asyncio.Event, poll: float = 0.2) -> None:
        """Until ``stop`` is set; a Redis outage is logged (rate-limited) and waited out."""
        last_claim = 0.0
        while not stop.is_set():
            try:
                if self.cluster and time.monotonic() >= self.next_sweep:
                    await self._sweep()
                    last_claim = 0.0
                keys = sorted(self.outboxes) if self.cluster else [self.key]
                await self._ensure_groups(keys)
                if time.monotonic() - last_claim > self.reclaim_idle / 4:
                    last_claim = time.monotonic()
                    for key in keys:
                        _, claimed, *_ = await self.redis.xautoclaim(key, GROUP, self.consumer,
                                                                     int(self.reclaim_idle * 1000), count=100)
                        self._spawn(key, claimed)
                free = self.concurrency - len(self.tasks)
                if free <= 0:
                    await wait_event(stop, poll)
                    continue
                if self.cluster:
                    read = await self._read_outboxes(keys, free)
                else:
                    read = await self.redis.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=free, block=200)
                for key, entries in read or []:
                    self._spawn(as_text(key), entries)
                if not read:
                    await wait_event(stop, poll)
            except Exception as exc:  # Redis down or erroring: notifications wait in the outbox
                self.throttle.warning("cannot read the notification outbox %s: %s: %s", self.key,
                                      type(exc).__name__, exc)
                await wait_event(stop, poll * 5)
        for task in list(self.tasks):
            task.cancel()  # left pending: claimed again later
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _sweep(self) -> None:
        """A cluster's every slot outbox that holds anything (one left by another process, say)."""
        self.next_sweep = time.monotonic() + SWEEP_INTERVAL
        if self.all_outboxes is None:
            self.all_outboxes = [outbox_key(self.prefix, slot) for slot in range(SLOTS)]
        found, _ = await sweep(self.redis, self.all_outboxes, "XLEN")
        self.outboxes.update(self.all_outboxes[slot] for slot in found)

    async def _read_outboxes(self, keys: list[str], free: int) -> list:
        """New notifications of the known outboxes (one round trip per node); an outbox found empty is forgotten."""
        replies = await per_node(self.redis, keys, str,
                                 lambda pipe, key: pipe.xreadgroup(GROUP, self.consumer, {key: ">"}, count=free))
        read = []
        for key, reply in zip(keys, replies):
            if isinstance(reply, Exception):
                continue  # its node is down: looked at again next time
            if reply:
                read += reply
            else:
                self.outboxes.discard(key)
        return read

    async def _ensure_groups(self, keys: list[str]) -> None:
        for key in keys:
            if key in self.grouped:
                continue
            try:
                await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self.grouped.add(key)

    def _spawn(self, key: str, entries: list) -> None:
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending
                continue
            task = asyncio.create_task(self._deliver(key, as_text(entry_id), fields))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _deliver(self, key: str, entry_id: str, fields: Mapping[Any, Any]) -> None:
        try:
            doc = json.loads({as_text(k): v for k, v in fields.items()}[STREAM_FIELD])
            sink = doc["sink"]
            headers, body = event_request(doc)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("notification %s is unreadable (%s): dropped", entry_id, exc)
            self.metrics.failed.inc()
            await self._done(key, entry_id)
            return
        if self.allowed_hosts is not None and not _sink_allowed(sink, self.allowed_hosts):
            log.warning("notification %s (%s) to %s refused: its host is not on NOTIFICATION_ALLOWED_HOSTS; dropped"
                        " (the request keeps its state)", doc.get("id"), doc.get("type"), sink)
            self.metrics.failed.inc()
            await self._done(key, entry_id)
            return
        outcome = "failed"
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                self.metrics.retried.inc()
                await asyncio.sleep(backoff(attempt - 1, RETRY_BASE, RETRY_CAP))
            try:
                async with self.session.post(sink, headers=headers, data=body, allow_redirects=False,
                                             timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                    await resp.read()
                    verdict, why = sink_verdict(resp.status), f"answered {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                verdict, why = "retry", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if verdict == DELIVERED:
                outcome = "sent"
                break
            log.info("notification %s (%s) to %s, attempt %d: %s", doc["id"], doc["type"], sink, attempt, why)
            if verdict == REJECTED:
                break
        if outcome == "sent":
            self.metrics.sent.inc()
            log.info("notified %s of request %s (%s)", sink, doc["subject"], doc["type"])
        else:
            self.metrics.failed.inc()
            log.warning("notification %s (%s) to %s not delivered: %s; dropped (the request keeps its state)",
                        doc["id"], doc["type"], sink, why)
        await self._done(key, entry_id)

    async def _done(self, key: str, entry_id: str) -> None:
        """Acknowledge and delete; on a Redis error it stays pending and is claimed (and sent) again later."""
        try:
            async with transaction(self.redis) as pipe:
                pipe.xack(key, GROUP, entry_id)
                pipe.xdel(key, entry_id)
                await pipe.execute()
        except Exception as exc:
            self.throttle.warning("cannot remove notification %s from the outbox: %s: %s", entry_id,
                                  type(exc).__name__, exc)
