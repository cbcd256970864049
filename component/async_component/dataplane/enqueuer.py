"""The producer's Redis write: stream entries, batched.

A request is queued by one XADD of its envelope; there is no status record
at accept time (the status resource reads ``queued`` from the stream entry
itself, and the consumer creates the record when it starts the request). All
requests of a batch go to Redis as one Lua script call: one round trip, one
reply. A request whose XADD fails gets its own error; the others of the batch
are unaffected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from .batching import Batcher
from .envelope import STREAM_FIELD

# KEYS[1] the stream; ARGV[1] the stream field, ARGV[n + 1] the n-th envelope (JSON)
ENQUEUE_SCRIPT = """
local ids = {}
for n = 2, #ARGV do
  ids[n - 1] = redis.pcall('XADD', KEYS[1], '*', ARGV[1], ARGV[n])
end
return ids
"""


class Enqueuer:
    def __init__(self, redis: aioredis.Redis, *, stream: str, max_batch: int = 256,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        """``on_batch(size, queued, seconds)`` after each batch Redis answered."""
        self.keys = [stream]
        self.script = redis.register_script(ENQUEUE_SCRIPT)
        self.on_batch = on_batch
        self.batcher: Batcher[bytes, bytes] = Batcher(self._send, max_batch=max_batch)

    def enqueue(self, envelope_json: bytes) -> asyncio.Future[bytes]:
        """Append one envelope (its JSON) to the stream; the future gets its entry id once Redis acknowledged it."""
        return self.batcher.submit(envelope_json)

    async def close(self) -> None:
        await self.batcher.close()

    async def _send(self, batch: list[bytes]) -> list:
        started = time.perf_counter()
        ids = await self.script(keys=self.keys, args=[STREAM_FIELD, *batch])
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(1 for i in ids if not isinstance(i, Exception)), time.perf_counter() - started)
        return ids
