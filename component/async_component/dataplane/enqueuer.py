"""The producer's Redis write: stream entries, batched, each in its Service's queue.

A request is queued by one XADD of its envelope to its queue's stream
(:mod:`.queues`); there is no status record at accept time (the status
resource reads ``queued`` from the stream entry itself, and the replay creates
the record when it starts the request). The requests of a batch go to Redis in
one round trip: one script call per queue in the batch (one call in all when
they are for one Service), each of which checks the queue's cap, appends, and
marks the queue active. A request whose XADD fails, or whose queue is full,
gets its own error; the others of the batch are unaffected. A request with an
``Idempotency-Key`` (:mod:`.idempotency`) is checked and its key taken in the
same call; the key is taken without an expiry (the replay gives it the
result's lifetime when the request ends). A request may bring its Service's
own cap (its ``max-queued`` policy); requests of one queue with different ones
(a policy that just changed) go in separate calls.

On a Redis Cluster each master has its own batcher: a batch is the requests
of the Services one master serves, so a master that hangs (unreachable, not
refusing) holds up only its own Services' 202s and 503s, never the next
batch of the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .batching import GroupedBatcher
from .envelope import STREAM_FIELD
from .queues import ENQUEUE, ENQUEUE_CLUSTER, Layout, Queue
from .redisconn import call_scripts, is_cluster, master_of, register_script

DEFAULT_MAX_QUEUED = 100_000
BATCH_BYTES = 4 * 1024 * 1024
"""Envelope bytes in one batch, past its first request: Redis runs a batch's script with every other client
waiting, so a burst of large bodies goes as several short calls (256 bodies of 5 MB in one call took it longer
than its clients' socket timeout)."""


class QueueFull(Exception):
    """The Service's queue holds its cap of requests: nothing was written."""


class KeyReused(Exception):
    """The idempotency key was first sent with another request (422)."""


Keyed = tuple[bytes, str, str, str]
"""A request with an ``Idempotency-Key``, queued unless its key is held: its envelope, the key's Redis key
(:func:`.idempotency.key_name`), its fingerprint (:func:`.idempotency.fingerprint`) and its request id, which
are its arguments to the enqueue script in this order (:data:`.queues.ENQUEUE`). A plain tuple: a named one
costs the producer a Python call per request."""


class Seen(NamedTuple):
    """The key was held by the same request: it was queued before, as this entry and request id."""

    entry_id: str
    request_id: str


class Item(NamedTuple):
    """One request of a batch: its queue, envelope (or keyed envelope) and cap."""

    queue: Queue
    request: bytes | Keyed
    cap: int


class Enqueuer:
    def __init__(self, redis: aioredis.Redis, *, layout: Layout, max_queued: int = DEFAULT_MAX_QUEUED,
                 max_batch: int = 256, max_bytes: int = BATCH_BYTES,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        """``on_batch(size, queued, seconds)`` after each batch Redis answered."""
        self.layout = layout
        self.max_queued = max_queued
        self.redis = redis
        self.script = register_script(redis, ENQUEUE_CLUSTER if layout.cluster else ENQUEUE)
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        self.batcher: GroupedBatcher[Item, bytes | Seen] = GroupedBatcher(
            self._send, (lambda item: master_of(redis, item.queue.stream)) if is_cluster(redis) else None,
            max_batch=max_batch, max_bytes=max_bytes)
        """On a cluster, a batcher per master: one that hangs holds up only its own Services' batches."""

    def enqueue(self, queue: Queue, envelope_json: bytes, max_queued: int | None = None) -> asyncio.Future[bytes]:
        """Append one envelope (its JSON) to ``queue``; the future gets its entry id once Redis acknowledged it.

        Its exception is :class:`QueueFull` when the queue holds ``max_queued`` (None: the producer's
        MAX_QUEUED_PER_SERVICE) requests.
        """
        return self.batcher.submit(
            Item(queue, envelope_json, self.max_queued if max_queued is None else max_queued), len(envelope_json))

    def enqueue_once(self, queue: Queue, request: Keyed, max_queued: int | None = None) -> asyncio.Future[bytes | Seen]:
        """Like :meth:`enqueue`, unless the key is held: then :class:`Seen`, or :class:`KeyReused` raised.

        A new key is kept while the request is pending: it has no expiry until the request ends.
        """
        return self.batcher.submit(
            Item(queue, request, self.max_queued if max_queued is None else max_queued), len(request[0]))

    async def close(self) -> None:
        await self.batcher.close()

    def _call(self, queue: Queue, cap: int, items: list[bytes | Keyed]) -> tuple[list, list]:
        """The keys and arguments of the ENQUEUE call for ``items`` of ``queue``."""
        layout = self.layout
        keys = [queue.stream, queue.retry_stream, queue.retries, layout.active_for(queue), layout.wake_for(queue)]
        if not any(type(item) is tuple for item in items):
            return keys, [STREAM_FIELD, cap, queue.member, 0, *items]
        args = [STREAM_FIELD, cap, queue.member, 1]
        for item in items:
            args += item if type(item) is tuple else (item, "", "", "")
        return keys, args

    async def _send(self, batch: list[Item]) -> list:
        started = time.perf_counter()
        first, _, cap = batch[0]
        if all((item.queue is first or item.queue == first) and item.cap == cap
               for item in batch):  # the usual case: one Service, one policy
            keys, args = self._call(first, cap, [item.request for item in batch])
            results = await self.script(keys=keys, args=args)
        else:
            groups: dict[tuple[Queue, int], list[int]] = {}
            for n, item in enumerate(batch):
                groups.setdefault((item.queue, item.cap), []).append(n)
            calls = [(self.script, *self._call(queue, cap, [batch[n].request for n in members]))
                     for (queue, cap), members in groups.items()]
            replies = await call_scripts(self.redis, calls)  # on a cluster: one round trip per master
            results = [None] * len(batch)
            for members, reply in zip(groups.values(), replies):
                for i, n in enumerate(members):
                    results[n] = reply if isinstance(reply, Exception) else reply[i]
        results = [_result(result) for result in results]
        if self.on_batch is not None:
            queued = sum(1 for i in results if not isinstance(i, (Exception, Seen)))
            self.on_batch(len(batch), queued, time.perf_counter() - started)
        return results


def _result(result):
    if isinstance(result, list):
        return Seen(result[0].decode(), result[1].decode())
    if isinstance(result, ResponseError):
        reason, _, message = str(result).partition(" ")
        if reason == "QUEUEFULL":
            return QueueFull(message)
        if reason == "IDEMPOTENCY":
            return KeyReused(message)
    return result
