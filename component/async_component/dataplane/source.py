"""The source: delivers queued requests from the Services' queues fairly, and acknowledges each only once it is handled.

Each Service has its own queue (:mod:`.queues`). The source learns which
queues hold work from the active set and the wake stream the producer signals
on, so an idle Service costs it nothing; it serves the queues with work in
round robin, at most ``MAX_INFLIGHT_PER_SERVICE`` deliveries per Service within
``CONCURRENCY``, so a slow or hung Service holds only its own slots (idle slots
are lent beyond the cap only to Services that answer quickly, and their next
entries are read ahead, so a freed slot is not idle while a read is out). Reading a
queue (:data:`.queues.TAKE`) first moves its due retries to its retry stream,
and reads that before its newer requests. Several sources share every queue
through its consumer group.

Each entry goes either to a consumer over HTTP (``SINK_URL``), as exactly the
CloudEvent Knative's RedisStreamSource sends, or, without a sink URL, to a
replay core in this process (:mod:`.delivery`), which replays it and records
the outcome without another hop. Either way an entry is acknowledged only
after a 2xx answer, and only by the source (:meth:`Source.settle_in`, which the
replay core is handed as its settle hook): until then it stays pending in the consumer group. Entries
left pending by a process that died are reclaimed by any source after
``VISIBILITY_TIMEOUT`` (each active queue's streams are checked every half of it); a source keeps the entries it is still delivering
fresh so they are not reclaimed under it. Delivery is therefore at least once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.crc import key_slot

from .. import logs, probes
from . import heap, hirespack, idempotency, redisconn, targets
from .batching import GroupedBatcher
from .deadletters import add_dead_letter
from .gcpolicy import LargeGarbage, tune as tune_gc
from .notifications import add_notification, notification, sink_for
from .delivery import DeliveryFailed, EntryRef, make_delivery
from .envelope import Envelope, EnvelopeError, as_text, entry_envelope, entry_policy
from .queues import FINISH, PER_SERVICE, SINGLE, Layout, Queue, labels_of, service_tag, slot_of, take_script
from .replay import RECORD_MARGIN, START_FUNCTION, Started, delivery_terms, replay_grace, split_url
from .records import FAILED, Record, finished_channel, record_key, records_of
from .redischeck import RedisCheck
from .redisconn import call_scripts, make_redis, master_of, per_node, register_script, transaction
from .retries import DELIVERED, REJECTED, backoff, sink_verdict, wait_event
from .tallies import CounterFamily
from .envelope import STREAM_FIELD
from ..protocol import dead_letter_entry, policy_of
from ..settings import SourceSettings
from ..logthrottle import LogThrottle

try:  # less CPU per delivery; plain asyncio works too
    from uvloop import new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
    new_event_loop = asyncio.new_event_loop

log = logging.getLogger(__name__)

MAX_BLOCK = 2.0
"""Longest XREAD BLOCK on the wake stream, in seconds: below the Redis client's socket timeout."""
POLL_INTERVAL = 0.2
"""Seconds between looks at the active set for queues whose time came (a retry due, a reclaim check)."""
SCAN_INTERVAL = 5.0
"""Longest time between full scans of the active set (and of the single stream): what a missed wake costs."""
SWEEP_INTERVAL = 60.0
"""On a Redis Cluster, longest time between reads of every slot's active set (a full scan reads the slots known
to hold queues): what a wake-up lost while the subscription was down costs."""
RETRY_BASE = 0.1
RETRY_CAP = 10.0
BORROW_AGE = 1.0
"""Seconds: a Service whose deliveries take at most this long may borrow slots beyond its cap (see ``_grants``)."""
SLOW_READ = 1.0
"""Seconds after which a cluster's read still out (its master slow, or hung until the socket timeout) stops counting
against the entries a source holds: the other masters' Services are read meanwhile, and what it brings, if it
ever does, waits ahead of the slots."""


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
        self.delivered = CounterFamily(
            "async_source_delivered_total",
            "Delivery attempts by outcome: delivered (acked), dead_lettered (sink rejected it), failed (will retry)",
            ["outcome"], registry=registry,
        )
        self.delivered_as = {outcome: self.delivered.labels(outcome)
                             for outcome in ("delivered", "dead_lettered", "failed")}
        self.in_flight = Gauge("async_source_in_flight", "Entries being delivered", registry=registry)
        self.held_bytes = Gauge("async_source_held_bytes",
                                "Bytes of the entries this source holds (being delivered or read ahead), which"
                                " BODY_MEMORY_LIMIT bounds", registry=registry)
        self.reclaimed = Counter("async_source_reclaimed_total", "Entries taken over from another source",
                                 registry=registry)
        labels = ["namespace", "service"]
        self.service_in_flight = Gauge("async_service_in_flight", "Requests being delivered by this source, per Service",
                                       labels, registry=registry)
        self.service_queued = Gauge(
            "async_service_queued", "Requests queued per Service: waiting or waiting for a retry, not in flight"
            " (refreshed every few seconds while the Service has work)", labels, registry=registry)
        self.service_oldest = Gauge(
            "async_service_oldest_queued_age_seconds",
            "Age of the Service's oldest request not yet settled (0 when none)", labels, registry=registry)

    def forget(self, member: str) -> None:
        """An idle Service's series go, so the label sets stay bounded by the Services with work."""
        for gauge in (self.service_in_flight, self.service_queued, self.service_oldest):
            try:
                gauge.remove(*labels_of(member))
            except KeyError:
                pass


class QueueState:
    """What this source knows of one queue: its deliveries in flight (and when each started), its last reclaim,
    its wake-ups, and whether its Service answers quickly enough to borrow idle slots."""

    __slots__ = ("queue", "in_flight", "writing", "ahead", "reclaimed_at", "woken", "started", "quick", "gauges",
                 "entry_bytes", "taking")

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.in_flight = 0
        """Its deliveries the Service has not answered yet: what its cap counts."""
        self.writing = 0
        """Its deliveries the Service answered whose outcome is still being written."""
        self.ahead = 0
        """Its entries read ahead, waiting for a slot (``Source.ahead``)."""
        self.reclaimed_at = 0.0
        self.woken = 0
        self.started: dict[EntryRef, float] = {}
        """Start times of the deliveries in flight, oldest first."""
        self.quick = False
        """Its last delivery took at most BORROW_AGE: it may borrow (until one takes longer, or hangs)."""
        self.gauges: tuple[Any, Any] | None = None
        """Its queued and oldest-age gauges, bound once: a label lookup each time cost ~20 µs, 2,000 of them
        every few seconds with 1,000 Services busy."""
        self.entry_bytes = 0
        """The size of its entries, a running average of those read: how many more fit under BODY_MEMORY_LIMIT."""
        self.taking = False
        """On a cluster: a read of it is out (``Source.reads_out``), so it gets no other grant meanwhile."""

    def may_borrow(self, now: float) -> bool:
        """Answering quickly, with nothing in flight for longer than BORROW_AGE (a Service that just hung)."""
        return self.quick and (not self.started or now - next(iter(self.started.values())) <= BORROW_AGE)


class ReadOut:
    """On a cluster, one master's read of queues still out (``Source._take_round``): what it was granted, held for
    it until it is back, or for SLOW_READ at most."""

    __slots__ = ("states", "entries", "bytes", "since")

    def __init__(self) -> None:
        self.states: list[QueueState] = []
        self.entries = 0
        self.bytes = 0
        self.since = time.monotonic()


class Ended(NamedTuple):
    """The request a dead letter of the source ends: its envelope, target host and idempotency key (None: it had
    none), and how long its final record and that key are kept, in ms: its Service's retention, as the replay keeps a
    result (``replay.delivery_terms``)."""

    envelope: Envelope
    host: str
    key: str | None
    retention_ms: int


class Source:
    """One member of every queue's consumer group; :meth:`run` until :meth:`stop`."""

    def __init__(self, settings: SourceSettings, *, redis: aioredis.Redis | None = None,
                 registry: CollectorRegistry | None = None, retry_base: float = RETRY_BASE,
                 retry_cap: float = RETRY_CAP, stop_grace: float | None = None) -> None:
        self.settings = settings
        self.name = consumer_name(settings)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.owns_redis = redis is None
        self.redis = make_redis(settings) if redis is None else redis
        if self.owns_redis:  # a batch of outcomes is ~6 arguments a request: hiredis packs them, not redis-py
            hirespack.packing(self.redis)
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.stop_grace = drain_grace(settings) if stop_grace is None else stop_grace
        self.delivery = make_delivery(settings, self.redis, self.registry, self.settle_in, self.finish_calls,
                                      self._answered)
        self.layout = Layout.of(settings)
        self.per_service_cap = (settings.max_inflight_per_service if settings.queue_mode == PER_SERVICE
                                else settings.concurrency)
        self.batch_slots = max(1, settings.concurrency // 4)
        """Free slots worth a read while deliveries are in flight: under load, entries are read in batches."""
        self.ahead_cap = 3 * self.batch_slots if settings.queue_mode == PER_SERVICE else 0
        """Entries that borrowing queues may have read ahead (``ahead``): three batches, so the next read is out
        while two are left, even when the replays outrun it (2 cores and a busy machine)."""
        self.ahead: collections.deque[tuple[QueueState, EntryRef, Mapping, Started, float]] = collections.deque()
        """Entries of queues that borrow, read before a slot was free for them, oldest first, with when they were
        read: each starts the moment a slot frees (``_start_ahead``), so a Service that answers quickly keeps
        CONCURRENCY replays, not fewer while the next read is out. Refilled a batch at a time, within twice
        CONCURRENCY entries held."""
        self.reserve = self.per_service_cap if settings.queue_mode == PER_SERVICE else 0
        """Slots beyond CONCURRENCY, never lent, for queues under their cap while others hold borrowed slots: a
        Service that gets work while another borrows every free slot starts at once."""
        self.borrow_limit = settings.concurrency if settings.queue_mode == PER_SERVICE else 0
        """The most one borrowing queue holds: every slot of CONCURRENCY (never the reserve)."""
        self.borrowed: set[EntryRef] = set()
        """Deliveries started beyond their queue's cap: while there are any, the reserve is open."""
        self.service_caps: dict[str, int] = {}
        """A Service's own max-inflight (its policy), learned from the requests read from its queue."""
        self.byte_limit = settings.body_memory_limit
        self.held_bytes = 0
        """Bytes of the entries held (in flight or read ahead): past ``byte_limit``, a queue is read only while it
        has nothing held (``_bytes_room``), so large bodies cannot take the process past its memory limit."""
        self.sizes: dict[EntryRef, int] = {}
        self.entry_bytes = 0
        """The size of the entries read, a running average: the guess for a queue not read yet."""
        self.garbage = LargeGarbage(max(1, self.byte_limit // 2))
        """Collects once half of BODY_MEMORY_LIMIT was settled: what cycles still hold of those entries goes."""
        self.bytes_short = False
        """The last round read less than the slots allowed, for BODY_MEMORY_LIMIT: a settled entry may let more in."""
        self.reclaim_interval = settings.visibility_timeout / 2
        self.scan_interval = min(self.reclaim_interval, SCAN_INTERVAL)
        self.queues: dict[str, QueueState] = {}
        self.waiting: dict[str, None] = {}
        """Queues that may have entries to read, in round-robin order."""
        self.next_turn = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.in_flight: dict[EntryRef, asyncio.Task] = {}
        """Every delivery under way, until its outcome is written (stopping waits for them; they are kept fresh)."""
        self.queue_of: dict[EntryRef, QueueState] = {}
        """The queue of each delivery under way."""
        self.writing: set[EntryRef] = set()
        """Those whose Service answered: only the outcome is left to write, and their slots are free again. The
        Service no longer holds them, and the outcomes are written in batches while the next replays run."""
        self.metrics.in_flight.set_function(lambda: self.busy)  # read when scraped, not set per entry
        self.metrics.held_bytes.set_function(lambda: self.held_bytes)
        self.stopping = asyncio.Event()
        self.nudge = asyncio.Event()
        """Set when there may be something to do: a queue woke, a slot freed, stopping."""
        self.rescan = True
        self.busy_slots: set[int] = set()
        """On a cluster: the slots whose active set held queues when last read, or that a wake-up named, and
        after each full scan those of every queue still known."""
        self.next_sweep = 0.0
        self.reads_out: set[ReadOut] = set()
        self.takes: set[asyncio.Task] = set()
        self.scans: dict[str, asyncio.Task] = {}
        """On a cluster, the reads (of queues; of active sets, by master) still out: each master is read apart, so
        one that hangs until the socket timeout holds up only its own Services, never the loop."""
        self.requeueing: asyncio.Task | None = None
        self.redis_throttle = LogThrottle(log)
        self.sink_throttle = LogThrottle(log)
        self.take = register_script(self.redis, take_script(START_FUNCTION))
        self.finish = register_script(self.redis, FINISH)
        self.finished = finished_channel(settings.key_prefix)
        self.acks: GroupedBatcher[EntryRef, None] = GroupedBatcher(
            self._ack_batch, (lambda ref: master_of(self.redis, ref[0])) if self.layout.cluster else None)
        self.redis_check = RedisCheck(self.redis, settings.redis_check_interval, who="source")

    def stop(self) -> None:
        self.stopping.set()
        self.nudge.set()

    @property
    def busy(self) -> int:
        """Slots taken: deliveries waiting for their Service's answer."""
        return len(self.in_flight) - len(self.writing)

    @property
    def open_reserve(self) -> int:
        """The reserve's slots, while slots are borrowed (else none)."""
        return min(self.reserve, len(self.borrowed))

    def free_under_cap(self, busy: int) -> int:
        """Slots for queues under their cap: CONCURRENCY's free ones, and the reserve while slots are borrowed."""
        return self.settings.concurrency + self.open_reserve - busy

    async def ready(self) -> None:
        await redisconn.ping(self.redis)
        self.redis_check.require()

    # --- the loop

    async def run(self) -> None:
        await self.delivery.start()
        await self.redis_check.check()
        drained = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(drained), name="source-heartbeat")
        listener = asyncio.create_task(self._listen(), name="source-wake-listener")
        measuring = asyncio.create_task(self._measuring(drained), name="source-queue-metrics")
        checks = asyncio.create_task(self.redis_check.run(drained), name="redis-check")
        settings = self.settings
        log.info("source %s delivering %s (group %s) %s, %d at a time, at most %d per Service", self.name,
                 "a queue per Service" if settings.queue_mode == PER_SERVICE else f"the stream {settings.stream}",
                 settings.group, self.delivery.description, settings.concurrency, self.per_service_cap)
        try:
            await self._loop()
            if self.takes:  # reads still out (a cluster's): what they read starts, and is drained below; a read a
                # hung master never answers is cut (what it took stays pending, for another source to reclaim)
                await asyncio.wait(set(self.takes), timeout=self.stop_grace)
                for task in self.takes:
                    task.cancel()
            await self._drain()
        finally:
            for task in [*self.scans.values(), *([self.requeueing] if self.requeueing else [])]:
                task.cancel()
            drained.set()
            await heartbeat
            await measuring
            await checks
            listener.cancel()
            await asyncio.wait({listener}, timeout=MAX_BLOCK + 1)  # redis-py may swallow the cancellation
            await self._leave_groups()
            await self.delivery.close()
            if self.owns_redis:
                await self.redis.aclose()
        log.info("source %s stopped", self.name)

    async def _loop(self) -> None:
        failures = 0
        next_scan = next_poll = 0.0
        while not self.stopping.is_set():
            self.nudge.clear()
            try:
                now = time.monotonic()
                if self.rescan or now >= next_scan:
                    self.rescan = False
                    await self._scan(full=True)
                    next_scan, next_poll = now + self.scan_interval, now + POLL_INTERVAL
                elif now >= next_poll:
                    await self._scan(full=False)
                    next_poll = now + POLL_INTERVAL
                    if self.ahead and not self.layout.cluster:
                        await self._requeue_waiting()
                    elif self.ahead and (self.requeueing is None or self.requeueing.done()):
                        self.requeueing = asyncio.create_task(self._requeue_waiting(), name="source-requeue")
                took = await self._take_round()
                failures = 0
            except Exception as exc:  # Redis down or erroring: wait and try again, nothing is lost
                failures += 1
                self.redis_throttle.warning("source %s cannot read the queues: %s: %s", self.name,
                                            type(exc).__name__, exc)
                await self._sleep(backoff(failures, self.retry_base, self.retry_cap))
                continue
            if not took:
                await wait_event(self.nudge, max(0.0, min(next_scan, next_poll) - time.monotonic()))

    def _woke(self, member: str) -> None:
        state = self.queues.get(member)
        if state is None:
            namespace, service = labels_of(member)
            state = self.queues[member] = QueueState(self.layout.member(member))
            # read when scraped, not updated twice per delivery; the series goes with the state (forget)
            self.metrics.service_in_flight.labels(namespace, service).set_function(lambda: state.in_flight)
            # reclaim is for entries a dead source left: not on first sight, when a queue is new and busy
            state.reclaimed_at = time.monotonic() - self.reclaim_interval / 2
            if self.layout.cluster:
                self.busy_slots.add(slot_of(member))
        state.woken += 1
        self.waiting[member] = None
        self.nudge.set()

    async def _listen(self) -> None:
        """Follow the wake stream: the producer names a queue there when it gets work and was not marked."""
        if self.layout.cluster:
            return await self._listen_channels()
        wake = self.layout.wake
        last = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if last is None:
                    newest = await self.redis.xrevrange(wake, count=1)
                    last = as_text(newest[0][0]) if newest else "0-0"
                    self.rescan = True  # what came before the listener started is found by a full scan
                    self.nudge.set()
                reply = await self.redis.xread({wake: last}, count=1000, block=round(MAX_BLOCK * 1000))
                failures = 0
            except Exception as exc:
                failures += 1
                self.redis_throttle.warning("source %s cannot read %s: %s: %s", self.name, wake,
                                            type(exc).__name__, exc)
                await self._sleep(backoff(failures, self.retry_base, self.retry_cap))
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = as_text(entry_id)
                    member = fields.get(b"q")
                    if member is not None:
                        self._woke(as_text(member))

    async def _listen_channels(self) -> None:
        """On a cluster: follow every slot's wake channel through each master. Through one only, a master that hung
        kept the subscription open and silent: the wake-ups of every Service were lost until the read of every slot."""
        def failed(exc: Exception) -> None:
            self.redis_throttle.warning("source %s cannot list the masters of the cluster: %s: %s", self.name,
                                        type(exc).__name__, exc)
        await redisconn.on_every_master(self.redis, self._listen_node, self.stopping, failed, SCAN_INTERVAL)

    async def _listen_node(self, node: Any) -> None:
        failures = 0
        while not self.stopping.is_set():
            pubsub = self.redis.pubsub(node=node, ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.layout.wake_pattern)
                self.rescan = True  # what was published while not subscribed is found by reading every slot
                self.next_sweep = 0.0
                self.nudge.set()
                failures = 0
                while not self.stopping.is_set():
                    message = await pubsub.get_message(timeout=MAX_BLOCK)
                    if message is not None and message.get("type") == "pmessage":
                        self._woke(as_text(message["data"]))
            except Exception as exc:
                failures += 1
                self.redis_throttle.warning("source %s cannot follow %s on %s: %s: %s", self.name,
                                            self.layout.wake_pattern, node.name, type(exc).__name__, exc)
                await self._sleep(backoff(failures, self.retry_base, self.retry_cap))
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # its node is gone already
                    pass

    async def _scan_masters(self, full: bool) -> None:
        """A cluster's active sets, each master's read in a task of its own (``scans``), unless its last read is
        still out: every slot's now and then (one script a master), else those known to hold queues (a full scan:
        all their queues; a poll: those whose time came)."""
        redis = self.redis
        if redis._initialize:
            await redis.initialize()
        sweep = full and time.monotonic() >= self.next_sweep
        if sweep:
            self.next_sweep = time.monotonic() + SWEEP_INTERVAL
        slots_cache = redis.nodes_manager.slots_cache
        by_master: dict[str | None, list[int]] = {}
        for slot in (slots_cache if sweep else sorted(self.busy_slots)):
            nodes = slots_cache.get(slot)
            by_master.setdefault(nodes[0].name if nodes else None, []).append(slot)
        now = time.time()
        woken = {member: state.woken for member, state in self.queues.items()}
        for name, slots in by_master.items():
            if name in self.scans:  # that master has not answered the last read yet
                if sweep:
                    self.next_sweep = time.monotonic() + SCAN_INTERVAL
                continue
            task = asyncio.create_task(self._scanned(name, slots, full, sweep, now, woken),
                                       name=f"source-scan-{name}")
            self.scans[name] = task
            task.add_done_callback(lambda _, name=name: self.scans.pop(name, None))

    async def _scanned(self, name: str | None, slots: list[int], full: bool, sweep: bool, now: float,
                       woken: dict[str, int]) -> None:
        try:
            active, answered = await self._scan_master(name, slots, full, sweep, now)
        except Exception as exc:
            self.redis_throttle.warning("source %s cannot read the active sets of master %s: %s: %s", self.name,
                                        name, type(exc).__name__, exc)
            return
        # a master down: forget nothing of its own; a poll forgets nothing at all
        self._found(active, full and answered, now, woken, set(slots) if full else None)

    async def _scan_master(self, name: str | None, slots: list[int], full: bool, sweep: bool,
                           now: float) -> tuple[dict[str, float], bool]:
        """One master's part of ``_scan_masters``: the active queues of its ``slots``, and whether it answered for
        every slot (if not, its queues are not known to have left)."""
        layout = self.layout
        if sweep:
            found, unread = await redisconn.sweep(self.redis, layout.all_active, "ZRANGE", {name: slots})
            self.busy_slots.difference_update(slots)
            self.busy_slots.update(found, unread)  # an unread slot stays polled
            answered = not unread
            if unread:  # the master is down: read every slot again soon, to find its queues once it is back
                self.next_sweep = min(self.next_sweep, time.monotonic() + SCAN_INTERVAL)
            replies = [(slot, list(zip(flat[::2], map(float, flat[1::2])))) for slot, flat in found.items()]
        else:
            if full:
                read = await per_node(self.redis, slots, layout.slot_active, lambda pipe, slot: pipe.zrange(
                    layout.slot_active(slot), 0, -1, withscores=True))
            else:
                read = await per_node(self.redis, slots, layout.slot_active, lambda pipe, slot: pipe.zrangebyscore(
                    layout.slot_active(slot), "(0", repr(now), withscores=True))
            answered = not any(isinstance(reply, Exception) for reply in read)
            replies = [(slot, reply) for slot, reply in zip(slots, read) if not isinstance(reply, Exception)]
            if full:
                self.busy_slots.difference_update(slot for slot, reply in replies if not reply)
        if not answered:
            self.redis_throttle.warning("source %s cannot read the active sets of master %s of the cluster",
                                        self.name, name)
        return {as_text(member): score for _, reply in replies for member, score in reply}, answered

    async def _scan(self, full: bool) -> None:
        """Wake the queues of the active set whose time came (a due retry, a reclaim check); a full scan also
        those marked "now", the single stream when it holds anything, and forgets the queues that left."""
        layout = self.layout
        single = layout.single
        now = time.time()
        if layout.cluster:
            return await self._scan_masters(full)
        woken = {member: state.woken for member, state in self.queues.items()}
        async with self.redis.pipeline(transaction=False) as pipe:
            if full:
                pipe.zrange(layout.active, 0, -1, withscores=True)
                pipe.xlen(single.stream)
                pipe.zcard(single.retries)
            else:
                pipe.zrangebyscore(layout.active, "(0", repr(now), withscores=True)
            replies = await pipe.execute()
        active = {as_text(member): score for member, score in replies[0]}
        if full and (replies[1] or replies[2]):
            active[SINGLE] = 0.0  # requests queued before per-Service queues, or by a RedisStreamSource install
        self._found(active, full, now, woken)

    def _found(self, active: dict[str, float], full: bool, now: float, woken: dict[str, int],
               slots: set[int] | None = None) -> None:
        """Wake the active queues whose time came; after a full scan, forget the queues that left (on a cluster,
        of the ``slots`` read)."""
        for member, score in active.items():
            if score <= now:
                self._woke(member)
        if full:  # a queue still in the active set keeps its state (when it was last reclaimed)
            for member in [m for m, state in self.queues.items() if m not in active and not state.in_flight
                           and (slots is None or slot_of(m) in slots)
                           and not state.writing and not state.ahead and not state.taking
                           and woken.get(m) == state.woken]:  # not woken while the scan was out
                del self.queues[member]
                self.waiting.pop(member, None)
                self.metrics.forget(member)
            if self.layout.cluster:  # a slot read empty while one of its queues woke: that queue's slot is still
                # polled, or its retries and reclaims would wait for the 60 s sweep (the producer wakes a marked
                # queue only once)
                self.busy_slots.update(slot_of(member) for member in self.queues)

    async def _measuring(self, drained: asyncio.Event) -> None:
        """Refresh the per-Service queue metrics every SCAN_INTERVAL, beside the loop (it never waits for them)."""
        while not await wait_event(drained, SCAN_INTERVAL):
            try:
                await self._measure()
            except Exception as exc:  # Redis down: the loop says so; the gauges keep their last values
                log.debug("source %s cannot measure its queues: %s", self.name, exc)

    async def _measure(self) -> None:
        """Queued requests and the oldest one's age, per known queue: for the metrics."""
        states = list(self.queues.values())
        if not states:
            return
        group = self.settings.group
        commands = []
        for state in states:
            commands.append((state.queue.retries, lambda pipe, key: pipe.zcard(key)))
            for stream in state.queue.streams:
                commands += ((stream, lambda pipe, key: pipe.xlen(key)),
                             (stream, lambda pipe, key: pipe.xpending(key, group)),
                             (stream, lambda pipe, key: pipe.xrange(key, count=1)))
        replies = iter(await per_node(self.redis, commands, lambda command: command[0],
                                      lambda pipe, command: command[1](pipe, command[0])))
        now_ms = time.time() * 1000
        for state in states:
            queued = _number(next(replies))
            oldest = now_ms
            for _ in state.queue.streams:
                length, pending, first = next(replies), next(replies), next(replies)
                queued += _number(length) - (pending["pending"] if isinstance(pending, dict) else 0)
                if isinstance(first, list) and first:
                    oldest = min(oldest, int(as_text(first[0][0]).partition("-")[0]))
            if state.gauges is None:
                labels = labels_of(state.queue.member)
                state.gauges = self.metrics.service_queued.labels(*labels), self.metrics.service_oldest.labels(*labels)
            state.gauges[0].set(max(0, queued))
            state.gauges[1].set(max(0.0, (now_ms - oldest) / 1000))

    def _grants(self) -> list[tuple[QueueState, int]]:
        """Round robin over the ready queues: each as many entries as its free slots allow, within CONCURRENCY;
        then slots nobody else uses, lent to the queues that answer quickly (see ``_borrowing``)."""
        settings = self.settings
        busy = self.busy
        # a source holds at most twice CONCURRENCY entries: replays, answers whose outcome is still being written
        # (a slow Redis), entries read ahead and those a read still out may bring; and the reserve's, while it is
        # open. What such a read brings past the free slots waits ahead (``_can_start``): so a master that hangs
        # with a borrowing Service's read out leaves the other masters' Services their slots.
        out, out_bytes = self._held_for_reads()
        held = 2 * settings.concurrency - len(self.in_flight) - len(self.ahead) - out
        free = min(held + self.open_reserve, self.free_under_cap(busy))
        ahead_room = self.ahead_cap - len(self.ahead)
        if free < self.batch_slots and busy and settings.concurrency - busy + ahead_room < self.batch_slots:
            return []  # under load, read in batches rather than one entry a time
        members = list(self.waiting)
        if not members:
            return []
        start = self.next_turn % len(members)
        order = (self.queues[members[(start + n) % len(members)]] for n in range(len(members)))
        grants: dict[QueueState, int] = {}
        spare = min(held, settings.concurrency - busy)  # for borrowers: what CONCURRENCY leaves, never the reserve
        granted = 0
        left = self.byte_limit - self.held_bytes - out_bytes
        self.bytes_short = False
        # short: a queue under its cap is left without slots it could use; then nothing is read ahead, so every
        # slot that frees goes round the queues again
        short = False
        for n, state in enumerate(order):
            if state.taking:
                continue
            cap = self.cap_of(state)
            if free <= 0:
                if state.in_flight + state.ahead < cap:
                    short = True
                    break
                continue
            min_read = max(1, cap // 2)  # a busy queue is read a few entries at a time, not one per freed slot
            room = min(cap - state.in_flight, free)
            if room <= 0:
                continue
            if room < min_read and state.in_flight:
                short = True
                continue
            room, left = self._bytes_room(state, room, left)
            if room <= 0:
                continue
            grants[state] = room
            free -= room
            spare -= room
            granted += room
            self.next_turn = start + n + 1
        if not short:
            spare += min(ahead_room, held - granted - max(0, spare))  # read ahead, within twice CONCURRENCY
        if spare > 0 and left > 0:
            self._borrowing((self.queues[members[(start + n) % len(members)]] for n in range(len(members))),
                            grants, spare, left)
        return list(grants.items())

    def _bytes_room(self, state: QueueState, room: int, left: int) -> tuple[int, int]:
        """``room`` entries of the queue, fewer if they would not fit in the ``left`` bytes of BODY_MEMORY_LIMIT;
        and the bytes left after them. Past the limit a queue with nothing held still reads one entry: a Service
        is never starved by others' large bodies, and the limit is passed by at most one entry per Service."""
        size = state.entry_bytes or self.entry_bytes
        if room * size > left:
            self.bytes_short = True
            room = left // size if left >= size else int(not (state.in_flight or state.ahead))
        return room, left - room * size

    def _borrowing(self, order: Iterable[QueueState], grants: dict[QueueState, int], spare: int,
                   left: int) -> None:
        """Lend ``spare`` slots (what CONCURRENCY leaves free) to queues past their cap, in turn.

        Work-conserving, without giving up "a slow or hung Service holds only its own slots": only a
        queue whose Service has no max-inflight of its own, whose last delivery took at most BORROW_AGE
        and with nothing in flight for longer, borrows; so a Service that is slow or hangs from the start
        never does. One that turns slow while borrowing keeps what it holds until those replays end (at
        most REQUEST_TIMEOUT), never more than CONCURRENCY; and the reserve (one default cap of slots beyond
        CONCURRENCY, open while anything is borrowed) is never lent, so a Service that gets work meanwhile
        starts at once.
        """
        now = time.monotonic()
        for state in order:
            if spare <= 0:
                break
            if state.taking or not self._may_borrow(state, now):
                continue
            held = state.in_flight + state.ahead + grants.get(state, 0)
            room = min(self.borrow_limit + self.ahead_cap - held, spare)  # every slot of CONCURRENCY, and ahead
            if room < max(1, self.per_service_cap // 2):  # in batches, as above
                continue
            room, left = self._bytes_room(state, room, left)
            if room < max(1, self.per_service_cap // 2):
                break
            grants[state] = grants.get(state, 0) + room
            spare -= room

    async def _take_round(self) -> bool:
        """Read the granted queues (reclaiming first where it is time); whether anything changed: an entry
        started, or a queue found drained (the next round may grant its slots to one that has work).

        On a cluster each master's queues are read in a task of their own (``takes``), which nudges the loop when
        it is done: a master that hangs until the socket timeout holds up its own Services, not the loop.
        """
        grants = self._grants()
        if not grants:
            return False
        if not self.layout.cluster:
            return await self._take(grants, None)
        by_master: dict[str | None, list[tuple[QueueState, int]]] = {}
        for grant in grants:
            by_master.setdefault(master_of(self.redis, grant[0].queue.stream), []).append(grant)
        for part in by_master.values():
            read = ReadOut()
            self._reserve(part, read)
            task = asyncio.create_task(self._take_apart(part, read), name="source-take")
            self.takes.add(task)
            task.add_done_callback(self.takes.discard)
        return False

    async def _take_apart(self, grants: list[tuple[QueueState, int]], read: ReadOut) -> None:
        try:
            took = await self._take(grants, read)
        except Exception as exc:  # the loop's own catch, for this master's queues
            self.redis_throttle.warning("source %s cannot read the queues: %s: %s", self.name, type(exc).__name__,
                                        exc)
            took = False
        finally:
            self._release(read)
        if took:
            self.nudge.set()

    def _reserve(self, grants: list[tuple[QueueState, int]], read: ReadOut) -> None:
        """Hold ``grants`` for ``read`` until it is back (``_release``), and grant their queues nothing else."""
        for state, room in grants:
            state.taking = True
            read.states.append(state)
            read.entries += room
            read.bytes += room * (state.entry_bytes or self.entry_bytes)
        self.reads_out.add(read)

    def _release(self, read: ReadOut | None) -> None:
        if read is None:
            return
        for state in read.states:
            state.taking = False
        read.states.clear()
        read.entries = read.bytes = 0
        self.reads_out.discard(read)

    def _held_for_reads(self) -> tuple[int, int]:
        """The entries and bytes the reads still out (younger than SLOW_READ) may bring."""
        if not self.reads_out:
            return 0, 0
        now = time.monotonic()
        young = [read for read in self.reads_out if now - read.since < SLOW_READ]
        return sum(read.entries for read in young), sum(read.bytes for read in young)

    async def _take(self, grants: list[tuple[QueueState, int]], read: ReadOut | None) -> bool:
        """``_take_round``'s reads; ``read``: on a cluster, what the grants hold until they are back."""
        started = 0
        now = time.monotonic()
        due = [(state, room) for state, room in grants if now - state.reclaimed_at >= self.reclaim_interval]
        if due:
            reclaimed = await self._reclaim(due)
            self._release(read)
            for state, room in due:
                state.reclaimed_at = now
            for state, ref, fields in reclaimed:
                self._start(state, ref, fields)
                started += 1
            free = self.free_under_cap(self.busy)
            left = self.byte_limit - self.held_bytes - self._held_for_reads()[1]
            regrants = []
            for state, _ in grants:  # the reclaimed entries took slots, and bytes of BODY_MEMORY_LIMIT
                room = min(self.cap_of(state) - state.in_flight, free)
                if room > 0:
                    room, left = self._bytes_room(state, room, left)
                if room > 0:
                    regrants.append((state, room))
                    free -= room
            grants = regrants
            if read is not None:
                self._reserve(grants, read)
        if not grants:
            return started > 0
        woken = [state.woken for state, _ in grants]
        wall = repr(time.time())
        settings = self.settings
        calls = [(self.take, [state.queue.stream, state.queue.retry_stream, state.queue.retries,
                              self.layout.active_for(state.queue)],
                  [settings.group, self.name, room, wall, STREAM_FIELD, state.queue.member,
                   settings.visibility_timeout, self._records(state.queue.member)]) for state, room in grants]
        replies = await call_scripts(self.redis, calls)
        self._release(read)
        for (state, _), before, reply in zip(grants, woken, replies):
            member = state.queue.member
            if isinstance(reply, Exception):
                self.redis_throttle.warning("source %s cannot read the queue of %s: %s: %s", self.name, member,
                                            type(reply).__name__, reply)
                self.waiting.pop(member, None)  # the next full scan looks again
                continue
            retried, entries, drained, marks = reply
            if drained and state.woken == before:  # nothing new left, and no wake-up came in while reading
                if self.waiting.pop(member, False) is None:
                    started += not (retried or entries)
            marks = iter(marks)
            for stream, found in zip((state.queue.retry_stream, state.queue.stream), (retried, entries)):
                for entry_id, flat in found:
                    ref, fields, mark = (stream, as_text(entry_id)), _fields(flat), _started(next(marks, 0))
                    if self._can_start(state):
                        self._start(state, ref, fields, mark)
                    else:
                        self._hold(state, ref, fields)
                        self.ahead.append((state, ref, fields, mark, now))
                        state.ahead += 1
                    started += 1
        return started > 0

    def _can_start(self, state: QueueState) -> bool:
        """Whether a slot is free for a delivery of the queue: under its cap, one of CONCURRENCY (or of the reserve,
        while it is open); past it, one of CONCURRENCY, if the queue may still borrow (``_borrowing``)."""
        busy, concurrency, reserve = self.busy, self.settings.concurrency, self.open_reserve
        if len(self.in_flight) >= 2 * concurrency + reserve:
            return False
        if state.in_flight < self.cap_of(state):
            return busy < concurrency + reserve
        return busy < concurrency and state.in_flight < self.borrow_limit and self._may_borrow(state, time.monotonic())

    def _may_borrow(self, state: QueueState, now: float) -> bool:
        """A queue whose Service has no max-inflight of its own and answers quickly (``_borrowing``)."""
        return state.queue.member not in self.service_caps and state.may_borrow(now)

    def _start_ahead(self) -> None:
        """Start the oldest entries read ahead that a slot is free for."""
        ahead = self.ahead
        while ahead:
            refused = set()
            for n, (state, ref, fields, mark, _) in enumerate(ahead):
                if state not in refused:
                    if self._can_start(state):
                        break
                    refused.add(state)
            else:
                return
            del ahead[n]
            state.ahead -= 1
            self._start(state, ref, fields, mark)
            if len(ahead) == self.ahead_cap - self.batch_slots:
                self.nudge.set()  # room for a batch ahead: read it while these run

    def _records(self, member: str) -> str:
        """TAKE's record key start for the queue: '' (start nothing) unless the requests are replayed here."""
        if member == SINGLE or not self.delivery.settles:
            return ""
        return records_of(self.settings.key_prefix, member)

    async def _reclaim(self, due: list[tuple[QueueState, int]]) -> list[tuple[QueueState, EntryRef, Mapping]]:
        """Entries of these queues left pending past the visibility timeout by a source that died."""
        settings = self.settings
        idle = round(settings.visibility_timeout * 1000)
        claims = [(state, stream, room) for state, room in due for stream in state.queue.streams]
        replies = await per_node(self.redis, claims, lambda claim: claim[1], lambda pipe, claim: pipe.xautoclaim(
            claim[1], settings.group, self.name, min_idle_time=idle, start_id="0-0", count=claim[2]))
        found = []
        held = {entry[1] for entry in self.ahead}
        for (state, stream, room), reply in zip(claims, replies):
            if isinstance(reply, Exception):  # NOGROUP: nothing was ever read from it; anything else is news
                if "NOGROUP" not in str(reply):
                    self.redis_throttle.warning("source %s cannot reclaim the entries of %s: %s: %s", self.name,
                                                stream, type(reply).__name__, reply)
                continue
            entries = [(state, (stream, as_text(entry_id)), fields) for entry_id, fields in reply[1]
                       if fields is not None and (stream, as_text(entry_id)) not in self.in_flight
                       and (stream, as_text(entry_id)) not in held]
            if entries:
                entries = await self._without_overdelivered(entries)
            if entries:
                self.metrics.reclaimed.inc(len(entries))
                log.info("source %s reclaimed %d entries of %s left pending past %gs: %s", self.name, len(entries),
                         stream, settings.visibility_timeout, ", ".join(ref[1] for _, ref, _ in entries))
            found += entries
        return found

    async def _without_overdelivered(self, entries: list[tuple[QueueState, EntryRef, Mapping]]
                                     ) -> list[tuple[QueueState, EntryRef, Mapping]]:
        """``entries`` but those delivered more than MAX_DELIVERIES times, which are dead-lettered instead.

        A reclaimed entry was left by a process that died holding it; one that has come back this
        often may be what kills it (too large, or a bug it triggers), so it is not tried again.
        """
        settings = self.settings
        replies = await per_node(self.redis, [ref for _, ref, _ in entries], lambda ref: ref[0], lambda pipe, ref:
                                 pipe.xpending_range(ref[0], settings.group, min=ref[1], max=ref[1], count=1))
        kept = []
        for (state, ref, fields), reply in zip(entries, replies):
            if isinstance(reply, Exception):  # its master went away: it stays pending, to be reclaimed again
                continue
            deliveries = reply[0]["times_delivered"] if reply else 0
            if deliveries <= settings.max_deliveries:
                kept.append((state, ref, fields))
                continue
            reason = (f"delivered {deliveries} times without an outcome (MAX_DELIVERIES is {settings.max_deliveries}):"
                      " the process handling it may have died on it each time")
            self._track(state, ref, self._give_up(state, ref, fields, reason))
        return kept

    async def _give_up(self, state: QueueState, ref: EntryRef, fields: Mapping, reason: str) -> None:
        """Dead-letter the entry and record its request as failed: its `running` record would never expire.

        Its Service's failure sink, if it has one, hears of it as of any other failure.
        """
        failed = notice = None
        ended = self._ended(fields)
        if ended is not None:
            envelope, host = ended.envelope, ended.host
            failed = (record_key(self.settings.key_prefix, envelope.id, host),
                      Record(state=FAILED, host=host, attempts=envelope.attempt + 1, error=reason,
                             idempotency_key=ended.key).to_json())
            sink = sink_for(envelope.delivery_policy, FAILED)
            if sink is not None:
                notice = notification(sink=sink, state=FAILED, request_id=envelope.id, host=host,
                                      attempts=envelope.attempt + 1, response=None, error=reason,
                                      request_headers=envelope.headers,
                                      body_limit=self.settings.notification_body_limit, finished_at=time.time())
        dead = dead_letter_entry(fields, reason, service=self._service(state, ended))
        if await self._settle(ref, dead, ended, failed, notice):
            self.metrics.delivered_as["dead_lettered"].inc()
            log.error("entry %s of %s sent to %s, never delivered again: %s", ref[1], ref[0],
                      self.settings.dead_letter_stream, reason)

    async def _heartbeat(self, drained: asyncio.Event) -> None:
        """Reset the idle time of entries still being delivered, so no other source reclaims them."""
        settings = self.settings
        while not await wait_event(drained, settings.visibility_timeout / 3):
            refs = [*self.in_flight, *(entry[1] for entry in self.ahead)]
            if not refs:
                continue
            try:
                replies = await per_node(self.redis, list(_by_stream(refs).items()), lambda item: item[0],
                                         lambda pipe, item: pipe.xclaim(item[0], settings.group, self.name,
                                                                        min_idle_time=0, message_ids=item[1],
                                                                        justid=True))
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
            except Exception as exc:  # Redis down: the entries may be reclaimed, delivered twice at worst
                self.redis_throttle.warning("source %s cannot refresh %d in-flight entries: %s: %s",
                                            self.name, len(refs), type(exc).__name__, exc)

    async def _drain(self) -> None:
        """Wait up to the grace for the deliveries in flight; the entries read ahead start as their slots free."""
        if not self.in_flight and not self.ahead:
            return
        log.info("source %s stopping: waiting up to %gs for %d deliveries (%d read ahead)", self.name,
                 self.stop_grace, len(self.in_flight), len(self.ahead))
        deadline = time.monotonic() + self.stop_grace
        while self.in_flight and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self.in_flight.values()), timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if self.ahead:  # before the cancels below free slots they would start in
            await self._unstart_ahead()
        late = list(self.in_flight.values())
        for task in late:
            task.cancel()
        if late:  # a cancellation lost inside redis-py must not hold the exit: the wait is bounded
            await asyncio.wait(late, timeout=MAX_BLOCK)
            log.warning("source %s left %d deliveries unfinished; they stay pending for another source",
                        self.name, len(late))

    async def _unstart_ahead(self) -> None:
        """Entries read ahead that never got a slot stay pending for another source (its read marked them running:
        that mark goes, so their status reads ``queued``)."""
        log.warning("source %s left %d entries read ahead undelivered; they stay pending for another source",
                    self.name, len(self.ahead))
        ahead = list(self.ahead)
        self.ahead.clear()
        for _, ref, *_ in ahead:
            self.held_bytes -= self.sizes.pop(ref, 0)
        await self._unmark(ahead, 0.0)

    async def _requeue_waiting(self) -> None:
        """Entries read ahead that have waited longer than BORROW_AGE for a slot (their Service turned slow) read
        ``queued`` again, not ``running``, until they start (the replay core marks each running then)."""
        keys = await self._unmark(self.ahead, BORROW_AGE)
        if keys:
            log.info("source %s: %d requests read ahead waited over %gs for a slot, queued again until they start",
                     self.name, len(keys), BORROW_AGE)

    async def _unmark(self, entries: collections.deque | list, waited: float) -> list[str]:
        """Drop the running records that reading marked on ``entries`` (read ahead, not started) read more than
        ``waited`` seconds ago, and forget those marks: their status reads from their entries. The records' keys."""
        now = time.monotonic()
        keys = []
        for n in range(len(entries)):
            state, ref, fields, mark, read_at = entries[n]
            if mark is not None and mark[1] is None and now - read_at >= waited:
                keys.append(mark[0])
                entries[n] = (state, ref, fields, None, read_at)
        if keys:
            try:  # per_node answers each key's error in its place: a refused DEL raises nothing
                failed = [reply for reply in await per_node(self.redis, keys, str, lambda pipe, key: pipe.delete(key))
                          if isinstance(reply, Exception)]
            except Exception as exc:
                failed = [exc] * len(keys)
            if failed:  # their status reads running until they start or another source takes them
                log.warning("source %s could not mark %d requests read ahead queued again: %s: %s", self.name,
                            len(failed), type(failed[0]).__name__, failed[0])
        return keys

    async def _leave_groups(self) -> None:
        """Drop this process's name from the groups where it holds nothing, so names do not pile up."""
        streams = [stream for state in self.queues.values() for stream in state.queue.streams]
        if not streams:
            return
        group = self.settings.group
        try:
            held = await per_node(self.redis, streams, str, lambda pipe, stream: pipe.xpending_range(
                stream, group, min="-", max="+", count=1, consumername=self.name))
            idle = [stream for stream, pending in zip(streams, held) if pending == []]
            await per_node(self.redis, idle, str, lambda pipe, stream: pipe.xgroup_delconsumer(stream, group, self.name))
        except Exception as exc:  # best effort: a stale name costs nothing but a line in XINFO
            log.debug("source %s could not leave its groups: %s", self.name, exc)

    # --- one entry

    def cap_of(self, state: QueueState) -> int:
        """Deliveries this source may have in flight for the queue's Service."""
        return self.service_caps.get(state.queue.member, self.per_service_cap)

    def _learn_cap(self, state: QueueState, fields: Mapping) -> None:
        """The Service's max-inflight, from the policy its newest request was accepted under."""
        if self.settings.queue_mode != PER_SERVICE:
            return
        try:
            cap = policy_of(entry_policy(fields)).max_inflight
        except ValueError:  # the replay reports the malformed entry
            return
        member = state.queue.member
        if cap is None:
            self.service_caps.pop(member, None)
        elif self.service_caps.get(member) != cap:
            if len(self.service_caps) >= 10_000:
                self.service_caps.clear()
            self.service_caps[member] = cap

    def _start(self, state: QueueState, ref: EntryRef, fields: Mapping, started: Started = None) -> None:
        if ref in self.in_flight:
            return
        self._hold(state, ref, fields)
        self._learn_cap(state, fields)
        self._track(state, ref, self._deliver(state, ref, fields, started))

    def _hold(self, state: QueueState, ref: EntryRef, fields: Mapping) -> None:
        """Count the entry's bytes as held until it is settled (``_finished``), once however it started."""
        if ref in self.sizes:
            return
        size = entry_size(fields)
        self.sizes[ref] = size
        self.held_bytes += size
        state.entry_bytes = (state.entry_bytes + size) // 2 if state.entry_bytes else size
        self.entry_bytes = (3 * self.entry_bytes + size) // 4 if self.entry_bytes else size

    def _track(self, state: QueueState, ref: EntryRef, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` on the entry as an in-flight task (kept fresh, counted against its queue, drained on stop)."""
        loop = self.loop
        if loop is None:  # looked up once: on Python 3.11 every lookup costs a getpid() system call
            loop = self.loop = asyncio.get_running_loop()
        task = loop.create_task(work, name=f"deliver-{ref[1]}")
        self.in_flight[ref] = task
        self.queue_of[ref] = state
        self._occupy(state, ref)
        task.add_done_callback(lambda task: self._finished(state, ref, task))

    def _answered(self, ref: EntryRef) -> None:
        """The Service answered this entry's replay (the in-process core's hook): its slot is free again."""
        state = self.queue_of.get(ref)
        if state is None or ref in self.writing:
            return
        self.writing.add(ref)
        state.writing += 1
        self._freed(state, ref)

    def _finished(self, state: QueueState, ref: EntryRef, task: asyncio.Task) -> None:
        self.in_flight.pop(ref, None)
        self.queue_of.pop(ref, None)
        size = self.sizes.pop(ref, 0)
        self.held_bytes -= size
        self.garbage.let_go(size)
        if self.bytes_short:
            self.nudge.set()  # its bytes may let in what BODY_MEMORY_LIMIT held back
        if ref in self.writing:
            self.writing.discard(ref)
            state.writing -= 1
            if len(self.in_flight) + len(self.ahead) >= 2 * self.settings.concurrency - self.batch_slots:
                self.nudge.set()  # _grants may have held back for the outcomes being written
            if self.ahead:
                self._start_ahead()  # one held back for twice CONCURRENCY may start
        else:
            self._freed(state, ref)
        if not task.cancelled() and task.exception() is not None:
            log.error("entry %s of %s: delivery crashed, it stays pending for reclaim", ref[1], ref[0],
                      exc_info=task.exception())

    def _retaken(self, state: QueueState, ref: EntryRef) -> None:
        """Another attempt at an entry whose Service had answered: it calls the Service again, in a slot."""
        if ref in self.writing:
            self.writing.discard(ref)
            state.writing -= 1
            self._occupy(state, ref)

    def _occupy(self, state: QueueState, ref: EntryRef) -> None:
        """The delivery takes a slot of its queue: a borrowed one when the queue is at its cap already."""
        if state.in_flight >= self.cap_of(state):
            self.borrowed.add(ref)
        state.in_flight += 1
        state.started[ref] = time.monotonic()

    def _freed(self, state: QueueState, ref: EntryRef) -> None:
        self.borrowed.discard(ref)
        state.in_flight -= 1
        state.quick = time.monotonic() - state.started.pop(ref) <= BORROW_AGE
        if self.ahead:
            self._start_ahead()
        busy = self.busy
        if self.settings.concurrency - busy >= self.batch_slots or not busy:
            self.nudge.set()  # else the loop would find too few free slots to read (see _grants): let it sleep

    async def _deliver(self, state: QueueState, ref: EntryRef, fields: Mapping, started: Started = None) -> None:
        attempt = 0
        entry_id = ref[1]
        while True:
            attempt += 1
            try:
                reply = await self.delivery.send(ref, fields, started)
                verdict = sink_verdict(reply.status)
            except DeliveryFailed as exc:
                reply, verdict, reason = None, "retry", str(exc)
            started = None  # another attempt starts the request again (and finds Redis refusing, if it does)
            if verdict == DELIVERED:
                if self.delivery.settles or await self._settle(ref):
                    self.metrics.delivered_as["delivered"].inc()
                    log.debug("entry %s delivered after %d attempt(s)", entry_id, attempt)
                return
            if reply is not None:
                reason = f"sink answered {reply.status}: {reply.text}"
            if verdict == REJECTED:
                ended = self._ended(fields)  # its record is the sink's (or the core's in-process) to end
                if await self._settle(ref, dead_letter_entry(fields, reason, reply.status,
                                                             service=self._service(state, ended)), ended):
                    self.metrics.delivered_as["dead_lettered"].inc()
                    log.warning("entry %s of %s rejected by the sink, sent to %s: %s", entry_id, ref[0],
                                self.settings.dead_letter_stream, reason)
                return
            self.metrics.delivered_as["failed"].inc()
            delay = backoff(attempt, self.retry_base, self.retry_cap)
            self.sink_throttle.warning("entry %s delivery attempt %d failed (%s); retrying in %.2fs",
                                       entry_id, attempt, reason, delay)
            if await self._sleep(delay):
                return  # stopping: the entry stays pending for a source to reclaim
            self._retaken(state, ref)

    async def _settle(self, ref: EntryRef, dead_letter: Mapping | None = None, ended: Ended | None = None,
                      record: tuple[str, str] | None = None, notice: Mapping | None = None) -> bool:
        """Acknowledge and delete the entry (after copying it to the dead-letter stream, and writing for the request
        it ``ended`` its final ``record``, key and JSON, and ``notice``, its completion event, and giving its
        idempotency key, pending until now, the record's lifetime: the Service's retention); False if stopped first."""
        settings = self.settings
        failures = 0
        while True:
            try:
                if dead_letter is None:
                    await self.acks.submit(ref)
                else:
                    async with transaction(self.redis) as pipe:
                        add_dead_letter(pipe, settings, dead_letter)
                        if ended is not None:  # one lifetime, the Service's retention, for record and key
                            if record is not None:
                                pipe.set(record[0], record[1], px=ended.retention_ms)
                                pipe.publish(finished_channel(settings.key_prefix), record[0])  # answers a waiter
                            if ended.key is not None:
                                pipe.pexpire(ended.key, ended.retention_ms)
                        add_notification(pipe, settings, notice, record and record[0])
                        self.settle_in(pipe, ref)
                        await pipe.execute()
                return True
            except Exception as exc:  # Redis down: keep trying; if we stop first, it is delivered again
                failures += 1
                self.redis_throttle.warning("source %s cannot acknowledge entry %s: %s: %s", self.name, ref[1],
                                            type(exc).__name__, exc)
                if await self._sleep(backoff(failures, self.retry_base, self.retry_cap)):
                    return False

    async def _ack_batch(self, refs: list[EntryRef]) -> list[None]:
        """Ack and delete the entries delivered in the same loop pass (or while a batch was out) in one round trip."""
        async with transaction(self.redis) as pipe:  # on a cluster: each slot's entries together
            self.settle_in(pipe, *refs)
            await pipe.execute()
        return [None] * len(refs)

    def settle_in(self, pipe, *refs: EntryRef) -> None:
        """Acknowledge and delete ``refs`` in the transaction ``pipe``: with :meth:`finish_calls` (the same in one
        script, for a batch of outcomes), the only places entries are settled.

        The replay core gets both as its hooks (in-process delivery), so an outcome and its
        entry's ack are written together or not at all.
        """
        for stream, ids in _by_stream(refs).items():
            pipe.xack(stream, self.settings.group, *ids)
            pipe.xdel(stream, *ids)

    def finish_calls(self, writes: Sequence[tuple[str, Any, EntryRef, int, str | None, bool]]
                     ) -> list[tuple[list[int], tuple]]:
        """Final records written with the entries they settle, as one :data:`.queues.FINISH` call: for them all on
        one redis-server, one per queue (hash slot) on a cluster.

        ``writes``: each record's key, JSON, entry, lifetime (ms), the idempotency key it renews (or None) and
        whether to announce it.
        Returns each call with the positions of the writes it covers; on a cluster, writes whose keys are not all
        in their entry's stream's hash slot (the single stream's) are left out, for a transaction.
        """
        groups: dict[int, list[int]] = {}
        if writes and not self.layout.cluster:  # one script may touch any keys: one call (and one reply to parse)
            groups[0] = list(range(len(writes)))
        for i, (key, _, (stream, _), _, renewed, _) in enumerate(writes if self.layout.cluster else ()):
            slot = key_slot(stream.encode())
            if key_slot(key.encode()) == slot and (renewed is None or key_slot(renewed.encode()) == slot):
                groups.setdefault(slot, []).append(i)
        calls = []
        for positions in groups.values():
            streams = {stream: n for n, stream in enumerate(dict.fromkeys(writes[i][2][0] for i in positions), 1)}
            renewed = [writes[i][4] for i in positions if writes[i][4] is not None]
            keys = [*streams, *(writes[i][0] for i in positions), *renewed]
            args: list[Any] = [self.settings.group, self.finished, len(streams)]
            at = len(streams) + len(positions)
            for i in positions:
                key, value, (stream, entry_id), retention_ms, renews, announce = writes[i]
                if renews is not None:
                    at += 1
                args += (value, retention_ms, streams[stream], entry_id, at if renews is not None else 0,
                         1 if announce else 0)
            calls.append((positions, (self.finish, keys, args)))
        return calls

    def _ended(self, fields: Mapping) -> Ended | None:
        """The request an entry dead-lettered here ends (None: the entry cannot be read), decoded once for its
        dead letter, record and idempotency key."""
        try:
            envelope = entry_envelope(fields)
            host, _ = split_url(envelope.url)
        except EnvelopeError:
            return None
        return Ended(envelope, host, idempotency.queued_key_name(self.settings.key_prefix, host, envelope.headers),
                     delivery_terms(self.settings, envelope.delivery_policy).retention_ms)

    @staticmethod
    def _service(state: QueueState, ended: Ended | None) -> str | None:
        """The Service an entry is for, as its dead letter names it (None: an unreadable entry of the single
        stream)."""
        if state.queue.member != SINGLE:
            return state.queue.member
        return None if ended is None else service_tag(ended.host)

    # --- waiting

    async def _sleep(self, delay: float) -> bool:
        """Sleep unless stopping; whether the source is stopping."""
        return await wait_event(self.stopping, delay)


def _by_stream(refs: Iterable[EntryRef]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for stream, entry_id in refs:
        grouped.setdefault(stream, []).append(entry_id)
    return grouped


def entry_size(fields: Mapping) -> int:
    """The bytes of a stream entry's values (its envelope: the request's body and headers, for our queues)."""
    return sum(len(value) for value in fields.values() if isinstance(value, (bytes, str)))


def _fields(flat) -> dict:
    """A stream entry's fields as a script returns them (a flat list) as XREADGROUP's client gives them."""
    return {flat[n]: flat[n + 1] for n in range(0, len(flat) - 1, 2)}


def _started(mark) -> Started:
    """What TAKE's start_entry answered for an entry, as the replay core takes it."""
    if not isinstance(mark, list):
        return None
    key, state = mark
    return as_text(key), None if state is None else as_text(state)


def _number(reply) -> int:
    return reply if isinstance(reply, int) else 0


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


validate = targets.validate
"""For the CLI: an ALLOWED_HOSTS entry that is no host name or suffix is an error at start."""


def run(settings: SourceSettings) -> int:
    logs.configure("source", settings.log_level)
    heap.release_large_blocks()
    tune_gc()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(settings))
    return 0
