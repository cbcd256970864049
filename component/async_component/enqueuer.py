"""The producer's Redis write: stream entry and status record, batched.

Each request needs two writes (XADD of the envelope, SET of its ``queued``
record). All requests of a batch go to Redis as one Lua script call: one round
trip, one reply, and atomic like MULTI/EXEC (nothing else runs in between). A
request whose XADD fails gets no record and its own error; the others of the
batch are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from .batching import Batcher
from .envelope import STREAM_FIELD, Envelope
from .records import Record, record_key

# KEYS[1] the stream, KEYS[n + 1] the record of the n-th request;
# ARGV[1] record lifetime (ms), ARGV[2] the stream field, ARGV[2n + 1] and ARGV[2n + 2]
# the n-th envelope and record
ENQUEUE_SCRIPT = """
local ids = {}
for n = 1, #KEYS - 1 do
  local id = redis.pcall('XADD', KEYS[1], '*', ARGV[2], ARGV[2 * n + 1])
  if type(id) ~= 'table' then
    redis.call('SET', KEYS[n + 1], ARGV[2 * n + 2], 'PX', ARGV[1])
  end
  ids[n] = id
end
return ids
"""


class Enqueuer:
    def __init__(self, redis: aioredis.Redis, *, stream: str, key_prefix: str, retention: float,
                 max_batch: int = 256, on_batch: Callable[[int], None] | None = None) -> None:
        self.stream = stream
        self.key_prefix = key_prefix
        self.retention_ms = str(max(1, round(retention * 1000)))
        self.script = redis.register_script(ENQUEUE_SCRIPT)
        self.on_batch = on_batch
        self.batcher: Batcher[tuple[Envelope, Record], bytes] = Batcher(self._send, max_batch=max_batch)

    async def enqueue(self, envelope: Envelope, record: Record) -> str:
        """Store the request and its record; the stream entry id once Redis acknowledged both."""
        entry_id = await self.batcher.submit((envelope, record))
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def close(self) -> None:
        await self.batcher.close()

    async def _send(self, batch: list[tuple[Envelope, Record]]) -> list:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        keys = [self.stream]
        args = [self.retention_ms, STREAM_FIELD]
        for envelope, record in batch:
            keys.append(record_key(self.key_prefix, envelope.id))
            args.append(envelope.to_stream_fields()[STREAM_FIELD])
            args.append(record.to_json())
        return await self.script(keys=keys, args=args)
