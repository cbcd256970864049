"""Enqueuer against a real redis-server: entries and records written together, batch by batch."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from async_component.enqueuer import Enqueuer
from async_component.envelope import Envelope
from async_component.records import QUEUED, Record, record_key


def request(n: int) -> tuple[Envelope, Record]:
    envelope = Envelope.new("POST", f"http://a.b/{n}", [("X-N", str(n))], bytes([n % 256]) * 10)
    return envelope, Record(state=QUEUED, host="a.b")


async def script_calls(client) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_concurrent_requests_share_a_script_call_and_are_all_stored(redis_client):
    enqueuer = Enqueuer(redis_client, stream="s", key_prefix="p", retention=60)
    requests = [request(n) for n in range(100)]
    before = await script_calls(redis_client)
    entry_ids = await asyncio.gather(*(enqueuer.enqueue(e, r) for e, r in requests))
    assert await script_calls(redis_client) - before <= 2  # the first call may need to load the script
    entries = dict(await redis_client.xrange("s"))
    assert len(set(entry_ids)) == 100
    for entry_id, (envelope, _) in zip(entry_ids, requests):
        assert Envelope.from_stream_fields(entries[entry_id.encode()]) == envelope
        key = record_key("p", envelope.id)
        assert Record.from_json(await redis_client.get(key)).state == QUEUED
        assert 0 < await redis_client.pttl(key) <= 60_000


async def test_a_failing_stream_write_leaves_no_record(redis_client):
    await redis_client.set("s", "not a stream")
    enqueuer = Enqueuer(redis_client, stream="s", key_prefix="p", retention=60)
    results = await asyncio.gather(*(enqueuer.enqueue(*request(n)) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, aioredis.ResponseError) for r in results), results
    assert await redis_client.keys("p:*") == []


async def test_works_after_the_script_cache_is_flushed(redis_client):
    enqueuer = Enqueuer(redis_client, stream="s", key_prefix="p", retention=60)
    await enqueuer.enqueue(*request(1))
    await redis_client.script_flush()
    await enqueuer.enqueue(*request(2))
    assert await redis_client.xlen("s") == 2


async def test_redis_down_fails_each_request(redis_server, redis_client):
    enqueuer = Enqueuer(redis_client, stream="s", key_prefix="p", retention=60)
    redis_server.kill()
    with pytest.raises(aioredis.ConnectionError):
        await enqueuer.enqueue(*request(1))
