"""The producer's Redis write: stream entries, batched, each in its Service's queue.

A request is queued by one XADD of its envelope to its queue's stream
(:mod:`.queues`); there is no status record at accept time (the status
resource reads ``queued`` from the stream entry itself, and the replay creates
the record when it starts the request). The requests of a batch go to Redis in
one round trip: one script call per queue in the batch (one call in all when
they are for one Service), each of which checks the queue's cap, appends, and
marks the queue active. A request whose XADD fails, or whose queue is full,
gets its own error; the others of the batch are unaffected. A request may bring
its Service's own cap (its ``max-queued`` policy); requests of one queue with
different caps (a policy that just changed) go in separate calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .batching import Batcher
from .envelope import STREAM_FIELD
from .queues import ENQUEUE, Layout, Queue

DEFAULT_MAX_QUEUED = 100_000


class QueueFull(Exception):
    """The Service's queue holds its cap of requests: nothing was written."""


class Enqueuer:
    def __init__(self, redis: aioredis.Redis, *, layout: Layout, max_queued: int = DEFAULT_MAX_QUEUED,
                 max_batch: int = 256, on_batch: Callable[[int, int, float], None] | None = None) -> None:
        """``on_batch(size, queued, seconds)`` after each batch Redis answered."""
        self.layout = layout
        self.max_queued = max_queued
        self.redis = redis
        self.script = redis.register_script(ENQUEUE)
        self.on_batch = on_batch
        self.batcher: Batcher[tuple[Queue, bytes, int], bytes] = Batcher(self._send, max_batch=max_batch)

    def enqueue(self, queue: Queue, envelope_json: bytes, max_queued: int | None = None) -> asyncio.Future[bytes]:
        """Append one envelope (its JSON) to ``queue``; the future gets its entry id once Redis acknowledged it.

        Its exception is :class:`QueueFull` when the queue holds ``max_queued`` (None: the producer's
        MAX_QUEUED_PER_SERVICE) requests.
        """
        return self.batcher.submit((queue, envelope_json, self.max_queued if max_queued is None else max_queued))

    async def close(self) -> None:
        await self.batcher.close()

    def _call(self, queue: Queue, cap: int, documents: list[bytes], client=None):
        layout = self.layout
        return self.script(keys=[queue.stream, queue.retry_stream, queue.retries, layout.active, layout.wake],
                           args=[STREAM_FIELD, cap, queue.member, *documents], client=client)

    async def _send(self, batch: list[tuple[Queue, bytes, int]]) -> list:
        started = time.perf_counter()
        first, _, cap = batch[0]
        if all((queue is first or queue == first) and limit == cap for queue, _, limit in batch):  # the usual case
            results = await self._call(first, cap, [document for _, document, _ in batch])
        else:
            groups: dict[tuple[Queue, int], list[int]] = {}
            for n, (queue, _, limit) in enumerate(batch):
                groups.setdefault((queue, limit), []).append(n)
            async with self.redis.pipeline(transaction=False) as pipe:
                for (queue, limit), members in groups.items():
                    await self._call(queue, limit, [batch[n][1] for n in members], client=pipe)
                replies = await pipe.execute(raise_on_error=False)
            results = [None] * len(batch)
            for (queue, members), reply in zip(groups.items(), replies):
                for i, n in enumerate(members):
                    results[n] = reply if isinstance(reply, Exception) else reply[i]
        results = [_queue_full(result) for result in results]
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(1 for i in results if not isinstance(i, Exception)),
                          time.perf_counter() - started)
        return results


def _queue_full(result):
    if isinstance(result, ResponseError) and str(result).startswith("QUEUEFULL"):
        return QueueFull(str(result).partition(" ")[2])
    return result
