"""The producer's Redis write: stream entries, batched (with their idempotency keys, :mod:`.idempotency`).

A request is queued by one XADD of its envelope; there is no status record
at accept time (the status resource reads ``queued`` from the stream entry
itself, and the consumer creates the record when it starts the request). All
requests of a batch go to Redis as one Lua script call: one round trip, one
reply. A request whose XADD fails gets its own error; the others of the batch
are unaffected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

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


# KEYS[1] the stream, KEYS[n + 1] the n-th request's idempotency key (the stream when it has none);
# ARGV[1] the stream field, ARGV[2] how long a key is kept (ms), then per request: its envelope, its
# fingerprint ('' without a key), its request id. A request whose key is held by the same fingerprint gets
# {entry id, request id} of the first one and is not written; by another fingerprint, an IDEMPOTENCY error.
ENQUEUE_ONCE_SCRIPT = """
local ids = {}
local n = 0
for i = 3, #ARGV, 3 do
  n = n + 1
  local fingerprint = ARGV[i + 1]
  local held = fingerprint ~= '' and redis.call('GET', KEYS[n + 1])
  if held then
    local first, entry, request = string.match(held, '^(%S+) (%S+) (%S+)$')
    if first == fingerprint then
      ids[n] = {entry, request}
    else
      ids[n] = redis.error_reply('IDEMPOTENCY the key was used for another request')
    end
  else
    local id = redis.pcall('XADD', KEYS[1], '*', ARGV[1], ARGV[i])
    ids[n] = id
    if fingerprint ~= '' and type(id) == 'string' then
      redis.call('SET', KEYS[n + 1], fingerprint .. ' ' .. id .. ' ' .. ARGV[i + 2], 'PX', ARGV[2])
    end
  end
end
return ids
"""


class KeyReused(Exception):
    """The idempotency key was first sent with another request (422)."""


@dataclasses.dataclass(slots=True)
class Keyed:
    """A request with an ``Idempotency-Key``: queued unless its key is held."""

    envelope_json: bytes
    key: str
    """The key's Redis key (:func:`.idempotency.key_name`)."""
    fingerprint: str
    request_id: str


@dataclasses.dataclass(frozen=True)
class Seen:
    """The key was held by the same request: it was queued before, as this entry and request id."""

    entry_id: str
    request_id: str


class Enqueuer:
    def __init__(self, redis: aioredis.Redis, *, stream: str, max_batch: int = 256, key_retention: float = 86400,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        """``on_batch(size, queued, seconds)`` after each batch Redis answered; ``key_retention``: seconds an
        idempotency key is kept."""
        self.keys = [stream]
        self.script = redis.register_script(ENQUEUE_SCRIPT)
        self.once_script = redis.register_script(ENQUEUE_ONCE_SCRIPT)
        self.key_retention_ms = max(1, round(key_retention * 1000))
        self.on_batch = on_batch
        self.batcher: Batcher[bytes | Keyed, bytes | Seen] = Batcher(self._send, max_batch=max_batch)

    def enqueue(self, envelope_json: bytes) -> asyncio.Future[bytes]:
        """Append one envelope (its JSON) to the stream; the future gets its entry id once Redis acknowledged it."""
        return self.batcher.submit(envelope_json)

    def enqueue_once(self, request: Keyed) -> asyncio.Future[bytes | Seen]:
        """Like :meth:`enqueue`, unless the key is held: then :class:`Seen`, or :class:`KeyReused` raised."""
        return self.batcher.submit(request)

    async def close(self) -> None:
        await self.batcher.close()

    async def _send(self, batch: list[bytes | Keyed]) -> list:
        started = time.perf_counter()
        if any(type(item) is Keyed for item in batch):
            ids = [_seen(result) for result in await self._send_keyed(batch)]
        else:
            ids = await self.script(keys=self.keys, args=[STREAM_FIELD, *batch])
        if self.on_batch is not None:
            queued = sum(1 for i in ids if not isinstance(i, (Exception, Seen)))
            self.on_batch(len(batch), queued, time.perf_counter() - started)
        return ids

    async def _send_keyed(self, batch: list[bytes | Keyed]) -> list:
        keys, args = list(self.keys), [STREAM_FIELD, self.key_retention_ms]
        for item in batch:
            if type(item) is Keyed:
                keys.append(item.key)
                args += (item.envelope_json, item.fingerprint, item.request_id)
            else:
                keys.append(self.keys[0])
                args += (item, "", "")
        return await self.once_script(keys=keys, args=args)


def _seen(result):
    if isinstance(result, list):
        return Seen(result[0].decode(), result[1].decode())
    if isinstance(result, ResponseError) and str(result).startswith("IDEMPOTENCY"):
        return KeyReused(str(result).partition(" ")[2])
    return result
