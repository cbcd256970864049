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

import aiohttp
import redis.asyncio as aioredis
from cloudevents.v1.conversion import to_binary
from cloudevents.v1.http import CloudEvent
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import ResponseError

from ..logthrottle import LogThrottle
from ..protocol import STATUS_PATH_PREFIX, DeliveryPolicy
from .envelope import STREAM_FIELD, as_text, encode_body
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
RETRY_BASE = 0.5
RETRY_CAP = 5.0


def outbox_key(prefix: str) -> str:
    return f"{prefix}:notifications"


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


def add_notification(pipe, prefix: str, fields: Mapping[str, str] | None) -> None:
    """Queue ``fields`` (from :func:`notification`) in the caller's transaction; None: nothing to send."""
    if fields is not None:
        pipe.xadd(outbox_key(prefix), fields)


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


class Notifier:
    """Drains the outbox: posts each notification to its sink, with retries, then removes it."""

    def __init__(self, redis: aioredis.Redis, session: aiohttp.ClientSession, metrics: Metrics, *,
                 prefix: str, attempts: int, timeout: float, concurrency: int = 16,
                 reclaim_idle: float = RECLAIM_IDLE) -> None:
        self.redis = redis
        self.session = session
        self.metrics = metrics
        self.key = outbox_key(prefix)
        self.attempts = attempts
        self.timeout = timeout
        self.slots = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency
        self.reclaim_idle = reclaim_idle
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.tasks: set[asyncio.Task] = set()
        self.throttle = LogThrottle(log)

    async def run(self, stop: asyncio.Event, poll: float = 0.2) -> None:
        """Until ``stop`` is set; a Redis outage is logged (rate-limited) and waited out."""
        last_claim = 0.0
        while not stop.is_set():
            try:
                await self._ensure_group()
                if time.monotonic() - last_claim > self.reclaim_idle / 4:
                    last_claim = time.monotonic()
                    _, claimed, *_ = await self.redis.xautoclaim(self.key, GROUP, self.consumer,
                                                                 int(self.reclaim_idle * 1000), count=100)
                    self._spawn(claimed)
                free = self.concurrency - len(self.tasks)
                if free <= 0:
                    await wait_event(stop, poll)
                    continue
                read = await self.redis.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=free, block=200)
                for _, entries in read or []:
                    self._spawn(entries)
                if not read:
                    await wait_event(stop, poll)
            except Exception as exc:  # Redis down or erroring: notifications wait in the outbox
                self.throttle.warning("cannot read the notification outbox %s: %s: %s", self.key,
                                      type(exc).__name__, exc)
                await wait_event(stop, poll * 5)
        for task in list(self.tasks):
            task.cancel()  # left pending: claimed again later
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _ensure_group(self) -> None:
        if getattr(self, "_grouped", False):
            return
        try:
            await self.redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._grouped = True

    def _spawn(self, entries: list) -> None:
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending
                continue
            task = asyncio.create_task(self._deliver(as_text(entry_id), fields))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _deliver(self, entry_id: str, fields: Mapping[Any, Any]) -> None:
        try:
            doc = json.loads({as_text(k): v for k, v in fields.items()}[STREAM_FIELD])
            sink = doc["sink"]
            headers, body = event_request(doc)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("notification %s is unreadable (%s): dropped", entry_id, exc)
            self.metrics.failed.inc()
            await self._done(entry_id)
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
        await self._done(entry_id)

    async def _done(self, entry_id: str) -> None:
        """Acknowledge and delete; on a Redis error it stays pending and is claimed (and sent) again later."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.key, GROUP, entry_id)
                pipe.xdel(self.key, entry_id)
                await pipe.execute()
        except Exception as exc:
            self.throttle.warning("cannot remove notification %s from the outbox: %s: %s", entry_id,
                                  type(exc).__name__, exc)
