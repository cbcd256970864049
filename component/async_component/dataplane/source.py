"""The source: delivers queued requests from the Redis stream, and acknowledges each only once it is handled.

Each entry goes either to a consumer over HTTP (``SINK_URL``), as exactly the
CloudEvent Knative's RedisStreamSource sends, or, without a sink URL, to a
replay core in this process (:mod:`.delivery`), which replays it and records
the outcome without another hop. Either way an entry is acknowledged only
after a 2xx answer, and only by the source (:meth:`Source.settle_in`, which the
replay core is handed as its settle hook): until then it stays pending in the consumer group. Entries
left pending by a process that died are reclaimed by any source after
``VISIBILITY_TIMEOUT``; a source keeps the entries it is still delivering
fresh so they are not reclaimed under it. Delivery is therefore at least once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any, TypeVar

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import ResponseError

from .. import logs, probes
from . import targets
from .batching import Batcher
from .deadletters import add_dead_letter
from .delivery import DeliveryFailed, make_delivery
from .replay import RECORD_MARGIN, replay_grace
from .envelope import as_text
from .redischeck import RedisCheck
from .redisconn import make_redis
from .retries import DELIVERED, REJECTED, backoff, sink_verdict, wait_event
from ..protocol import dead_letter_entry
from ..settings import SourceSettings
from ..logthrottle import LogThrottle

try:  # less CPU per delivery; plain asyncio works too
    from uvloop import new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
    new_event_loop = asyncio.new_event_loop

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BLOCK = 2.0
"""Longest XREADGROUP BLOCK, in seconds: below the Redis client's socket timeout."""
RETRY_BASE = 0.1
RETRY_CAP = 10.0


def drain_grace(settings: SourceSettings) -> float:
    """Seconds a stopping source waits for its deliveries in flight: the longest one may take, so none is cut.

    In-process, a replay (REQUEST_TIMEOUT) and its record; with SINK_URL, the consumer's answer
    (DELIVERY_TIMEOUT). The pod's terminationGracePeriodSeconds must be longer (source.yaml).
    """
    return settings.delivery_timeout + RECORD_MARGIN if settings.sink_url else replay_grace(settings)


def consumer_name(settings: SourceSettings) -> str:
    return settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"



class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.delivered = Counter(
            "async_source_delivered_total",
            "Delivery attempts by outcome: delivered (acked), dead_lettered (sink rejected it), failed (will retry)",
            ["outcome"], registry=registry,
        )
        self.delivered_as = {outcome: self.delivered.labels(outcome)
                             for outcome in ("delivered", "dead_lettered", "failed")}
        self.in_flight = Gauge("async_source_in_flight", "Entries being delivered", registry=registry)
        self.reclaimed = Counter("async_source_reclaimed_total", "Entries taken over from another source",
                                 registry=registry)


class Source:
    """One member of the consumer group; :meth:`run` until :meth:`stop`."""

    def __init__(self, settings: SourceSettings, *, redis: aioredis.Redis | None = None,
                 registry: CollectorRegistry | None = None, retry_base: float = RETRY_BASE,
                 retry_cap: float = RETRY_CAP, stop_grace: float | None = None) -> None:
        self.settings = settings
        self.name = consumer_name(settings)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.owns_redis = redis is None
        self.redis = make_redis(settings) if redis is None else redis
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.stop_grace = drain_grace(settings) if stop_grace is None else stop_grace
        self.delivery = make_delivery(settings, self.redis, self.registry, self.settle_in)
        self.in_flight: dict[str, asyncio.Task] = {}
        self.metrics.in_flight.set_function(lambda: len(self.in_flight))  # read when scraped, not set per entry
        self.stopping = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self.redis_throttle = LogThrottle(log)
        self.sink_throttle = LogThrottle(log)
        self.reclaim_cursor = "0-0"
        self.acks: Batcher[str, None] = Batcher(self._ack_batch)
        self.redis_check = RedisCheck(self.redis, settings.redis_check_interval, who="source")

    def stop(self) -> None:
        self.stopping.set()

    async def ready(self) -> None:
        await self.redis.ping()
        self.redis_check.require()

    # --- the loop

    async def run(self) -> None:
        await self.delivery.start()
        await self.redis_check.check()
        drained = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(drained), name="source-heartbeat")
        checks = asyncio.create_task(self.redis_check.run(drained), name="redis-check")
        log.info("source %s delivering %s (group %s) %s, %d at a time", self.name, self.settings.stream,
                 self.settings.group, self.delivery.description, self.settings.concurrency)
        try:
            await self._loop()
            await self._drain()
        finally:
            drained.set()
            await heartbeat
            await checks
            await self._leave_group()
            await self.delivery.close()
            if self.owns_redis:
                await self.redis.aclose()
        log.info("source %s stopped", self.name)

    async def _loop(self) -> None:
        settings = self.settings
        reclaim_interval = settings.visibility_timeout / 2
        next_reclaim = 0.0
        failures = 0
        group_ready = False
        min_read = max(1, settings.concurrency // 4)
        while not self.stopping.is_set():
            self.slot_freed.clear()
            free = settings.concurrency - len(self.in_flight)
            if free < min_read and self.in_flight:  # under load, read in batches rather than one entry a time
                await self._unless_stopped(self.slot_freed.wait())
                continue
            try:
                if not group_ready:
                    await self._create_group()
                    group_ready = True
                now = time.monotonic()
                if now >= next_reclaim:
                    entries, done = await self._reclaim(free)
                    if done:
                        next_reclaim = now + reclaim_interval
                else:
                    block = min(next_reclaim - now, MAX_BLOCK)
                    entries = await self._unless_stopped(self._read(free, block)) or []
                failures = 0
            except Exception as exc:  # Redis down or erroring: wait and try again, nothing is lost
                failures += 1
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    group_ready = False
                self.redis_throttle.warning("source %s cannot read %s: %s: %s", self.name, settings.stream,
                                            type(exc).__name__, exc)
                await self._sleep(backoff(failures, self.retry_base, self.retry_cap))
                continue
            for entry_id, fields in entries:
                self._start(entry_id, fields)

    async def _create_group(self) -> None:
        """From id 0, so entries queued before the first source started are delivered too."""
        try:
            await self.redis.xgroup_create(self.settings.stream, self.settings.group, id="0", mkstream=True)
            log.info("created consumer group %s on stream %s", self.settings.group, self.settings.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, count: int, block: float) -> list[tuple[str, Mapping]]:
        reply = await self.redis.xreadgroup(self.settings.group, self.name, {self.settings.stream: ">"},
                                            count=count, block=max(1, round(block * 1000)))
        return [(as_text(entry_id), fields) for _, entries in reply or () for entry_id, fields in entries]

    async def _reclaim(self, count: int) -> tuple[list[tuple[str, Mapping]], bool]:
        """Entries idle past the visibility timeout; and whether the whole pending list was scanned."""
        settings = self.settings
        reply = await self.redis.xautoclaim(settings.stream, settings.group, self.name,
                                            min_idle_time=round(settings.visibility_timeout * 1000),
                                            start_id=self.reclaim_cursor, count=count)
        cursor, claimed = as_text(reply[0]), reply[1]
        self.reclaim_cursor = cursor
        entries = [(as_text(entry_id), fields) for entry_id, fields in claimed
                   if fields is not None and as_text(entry_id) not in self.in_flight]
        if entries:
            entries = await self._without_overdelivered(entries)
        if entries:
            self.metrics.reclaimed.inc(len(entries))
            log.info("source %s reclaimed %d entries left pending past %gs: %s", self.name, len(entries),
                     settings.visibility_timeout, ", ".join(entry_id for entry_id, _ in entries))
        return entries, cursor == "0-0"

    async def _without_overdelivered(self, entries: list[tuple[str, Mapping]]) -> list[tuple[str, Mapping]]:
        """``entries`` but those delivered more than MAX_DELIVERIES times, which are dead-lettered instead.

        A reclaimed entry was left by a process that died holding it; one that has come back this
        often may be what kills it (too large, or a bug it triggers), so it is not tried again.
        """
        settings = self.settings
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(settings.stream, settings.group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        kept = []
        for (entry_id, fields), reply in zip(entries, replies):
            deliveries = reply[0]["times_delivered"] if reply else 0
            if deliveries <= settings.max_deliveries:
                kept.append((entry_id, fields))
                continue
            reason = (f"delivered {deliveries} times without an outcome (MAX_DELIVERIES is {settings.max_deliveries}):"
                      " the process handling it may have died on it each time")
            self._track(entry_id, self._give_up(entry_id, fields, reason))
        return kept

    async def _give_up(self, entry_id: str, fields: Mapping, reason: str) -> None:
        if await self._settle(entry_id, dead_letter_entry(fields, reason)):
            self.metrics.delivered_as["dead_lettered"].inc()
            log.error("entry %s sent to %s, never delivered again: %s", entry_id, self.settings.dead_letter_stream,
                      reason)

    async def _heartbeat(self, drained: asyncio.Event) -> None:
        """Reset the idle time of entries still being delivered, so no other source reclaims them."""
        settings = self.settings
        while not await wait_event(drained, settings.visibility_timeout / 3):
            ids = list(self.in_flight)
            if not ids:
                continue
            try:
                await self.redis.xclaim(settings.stream, settings.group, self.name, min_idle_time=0,
                                        message_ids=ids, justid=True)
            except Exception as exc:  # Redis down: the entries may be reclaimed, delivered twice at worst
                self.redis_throttle.warning("source %s cannot refresh %d in-flight entries: %s: %s",
                                            self.name, len(ids), type(exc).__name__, exc)

    async def _drain(self) -> None:
        tasks = list(self.in_flight.values())
        if not tasks:
            return
        log.info("source %s stopping: waiting up to %gs for %d deliveries", self.name, self.stop_grace, len(tasks))
        _, late = await asyncio.wait(tasks, timeout=self.stop_grace)
        for task in late:
            task.cancel()
        if late:  # a cancellation lost inside redis-py must not hold the exit: the wait is bounded
            await asyncio.wait(late, timeout=MAX_BLOCK)
            log.warning("source %s left %d deliveries unfinished; they stay pending for another source",
                        self.name, len(late))

    async def _leave_group(self) -> None:
        """Drop this process's name from the group when it holds nothing, so names do not pile up."""
        try:
            pending = await self.redis.xpending_range(self.settings.stream, self.settings.group, min="-", max="+",
                                                      count=1, consumername=self.name)
            if not pending:
                await self.redis.xgroup_delconsumer(self.settings.stream, self.settings.group, self.name)
        except Exception as exc:  # best effort: a stale name costs nothing but a line in XINFO
            log.debug("source %s could not leave group: %s", self.name, exc)

    # --- one entry

    def _start(self, entry_id: str, fields: Mapping) -> None:
        if entry_id in self.in_flight:
            return
        self._track(entry_id, self._deliver(entry_id, fields))

    def _track(self, entry_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on the entry as an in-flight task (kept fresh, drained on stop)."""
        task = asyncio.create_task(work, name=f"deliver-{entry_id}")
        self.in_flight[entry_id] = task
        task.add_done_callback(lambda task: self._finished(entry_id, task))

    def _finished(self, entry_id: str, task: asyncio.Task) -> None:
        self.in_flight.pop(entry_id, None)
        self.slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("entry %s: delivery crashed, it stays pending for reclaim", entry_id, exc_info=task.exception())

    async def _deliver(self, entry_id: str, fields: Mapping) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = await self.delivery.send(entry_id, fields)
                verdict = sink_verdict(reply.status)
            except DeliveryFailed as exc:
                reply, verdict, reason = None, "retry", str(exc)
            if verdict == DELIVERED:
                if self.delivery.settles or await self._settle(entry_id):
                    self.metrics.delivered_as["delivered"].inc()
                    log.debug("entry %s delivered after %d attempt(s)", entry_id, attempt)
                return
            if reply is not None:
                reason = f"sink answered {reply.status}: {reply.text}"
            if verdict == REJECTED:
                if await self._settle(entry_id, dead_letter_entry(fields, reason, reply.status)):
                    self.metrics.delivered_as["dead_lettered"].inc()
                    log.warning("entry %s rejected by the sink, sent to %s: %s", entry_id,
                                self.settings.dead_letter_stream, reason)
                return
            self.metrics.delivered_as["failed"].inc()
            delay = backoff(attempt, self.retry_base, self.retry_cap)
            self.sink_throttle.warning("entry %s delivery attempt %d failed (%s); retrying in %.2fs",
                                       entry_id, attempt, reason, delay)
            if await self._sleep(delay):
                return  # stopping: the entry stays pending for a source to reclaim

    async def _settle(self, entry_id: str, dead_letter: Mapping | None = None) -> bool:
        """Acknowledge and delete the entry (after copying it to the dead-letter stream); False if stopped first."""
        settings = self.settings
        failures = 0
        while True:
            try:
                if dead_letter is None:
                    await self.acks.submit(entry_id)
                else:
                    async with self.redis.pipeline(transaction=True) as pipe:
                        add_dead_letter(pipe, settings, dead_letter)
                        self.settle_in(pipe, entry_id)
                        await pipe.execute()
                return True
            except Exception as exc:  # Redis down: keep trying; if we stop first, it is delivered again
                failures += 1
                self.redis_throttle.warning("source %s cannot acknowledge entry %s: %s: %s", self.name, entry_id,
                                            type(exc).__name__, exc)
                if await self._sleep(backoff(failures, self.retry_base, self.retry_cap)):
                    return False

    async def _ack_batch(self, ids: list[str]) -> list[None]:
        """Ack and delete the entries delivered in the same loop pass (or while a batch was out) in one round trip."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.settle_in(pipe, *ids)
            await pipe.execute()
        return [None] * len(ids)

    def settle_in(self, pipe, *entry_ids: str) -> None:
        """Acknowledge and delete ``entry_ids`` in the transaction ``pipe``: the one place entries are settled.

        The replay core gets this as its hook (in-process delivery), so an outcome and its
        entry's ack are written together or not at all.
        """
        pipe.xack(self.settings.stream, self.settings.group, *entry_ids)
        pipe.xdel(self.settings.stream, *entry_ids)

    # --- waiting

    async def _sleep(self, delay: float) -> bool:
        """Sleep unless stopping; whether the source is stopping."""
        return await wait_event(self.stopping, delay)

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> T | None:
        """The result of ``awaitable``, or None if the source stops first (it is then cancelled)."""
        task = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            # redis-py may swallow the cancellation; the read then ends with its BLOCK
            await asyncio.wait({task}, timeout=MAX_BLOCK + 1)
        if not task.done() or task.cancelled():
            return None
        return task.result()


# --- the process


async def start_health_server(source: Source, port: int) -> web.AppRunner:
    app = web.Application()
    probes.add_probe_routes(app, source.registry, source.ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def serve(settings: SourceSettings) -> None:
    source = Source(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, source.stop)
    runner = await start_health_server(source, settings.health_port) if settings.health_port else None
    try:
        await source.run()
    finally:
        if runner is not None:
            await runner.cleanup()


def tune_gc() -> None:
    """Fewer, larger young collections, and the startup objects frozen out of full ones.

    Each delivery allocates many short-lived objects (futures, tasks, headers, JSON); with the
    default thresholds the collector took ~8 % of the source's CPU in a drain (perf/profiling.md).
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


validate = targets.validate
"""For the CLI: an ALLOWED_HOSTS entry that is no host name or suffix is an error at start."""


def run(settings: SourceSettings) -> int:
    logs.configure("source", settings.log_level)
    tune_gc()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings))
    return 0
