"""Enqueuer against a real redis-server: stream entries written batch by batch, nothing else."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from async_component.dataplane.enqueuer import Enqueuer
from async_component.dataplane.envelope import Envelope


def request(n: int) -> Envelope:
    return Envelope.new("POST", f"http://a.b/{n}", [("X-N", str(n))], bytes([n % 256]) * 10)


async def script_calls(client) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_concurrent_requests_share_a_script_call_and_are_all_stored(redis_client):
    enqueuer = Enqueuer(redis_client, stream="s")
    requests = [request(n) for n in range(100)]
    before = await script_calls(redis_client)
    entry_ids = await asyncio.gather(*(enqueuer.enqueue(e.to_json()) for e in requests))
    assert await script_calls(redis_client) - before <= 2  # the first call may need to load the script
    entries = dict(await redis_client.xrange("s"))
    assert len(set(entry_ids)) == 100
    for entry_id, envelope in zip(entry_ids, requests):
        assert Envelope.from_stream_fields(entries[entry_id]) == envelope
    assert await redis_client.keys("*") == [b"s"]  # no status record at accept time


async def test_a_failing_stream_write_fails_each_request(redis_client):
    await redis_client.set("s", "not a stream")
    enqueuer = Enqueuer(redis_client, stream="s")
    results = await asyncio.gather(*(enqueuer.enqueue(request(n).to_json()) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, aioredis.ResponseError) for r in results), results
    assert await redis_client.keys("*") == [b"s"]


async def test_works_after_the_script_cache_is_flushed(redis_client):
    enqueuer = Enqueuer(redis_client, stream="s")
    await enqueuer.enqueue(request(1).to_json())
    await redis_client.script_flush()
    await enqueuer.enqueue(request(2).to_json())
    assert await redis_client.xlen("s") == 2


async def test_redis_down_fails_each_request(redis_server, redis_client):
    enqueuer = Enqueuer(redis_client, stream="s")
    redis_server.kill()
    with pytest.raises(aioredis.ConnectionError):
        await enqueuer.enqueue(request(1).to_json())
