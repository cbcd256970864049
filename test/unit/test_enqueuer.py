"""Enqueuer against a real redis-server: stream entries written batch by batch, each in its Service's queue."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from async_component.dataplane.enqueuer import Enqueuer, QueueFull
from async_component.dataplane.envelope import Envelope
from async_component.dataplane.queues import Layout

LAYOUT = Layout("p", "p-single")
A = LAYOUT.for_host("a.ns.svc.cluster.local")
B = LAYOUT.for_host("b.ns.svc.cluster.local")


def request(n: int, host: str = "a.ns.svc.cluster.local") -> Envelope:
    return Envelope.new("POST", f"http://{host}/{n}", [("X-N", str(n))], bytes([n % 256]) * 10)


async def script_calls(client) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_concurrent_requests_share_a_script_call_and_are_all_stored(redis_client):
    enqueuer = Enqueuer(redis_client, layout=LAYOUT)
    requests = [request(n) for n in range(100)]
    before = await script_calls(redis_client)
    entry_ids = await asyncio.gather(*(enqueuer.enqueue(A, e.to_json()) for e in requests))
    assert await script_calls(redis_client) - before <= 2  # the first call may need to load the script
    entries = dict(await redis_client.xrange(A.stream))
    assert len(set(entry_ids)) == 100
    for entry_id, envelope in zip(entry_ids, requests):
        assert Envelope.from_stream_fields(entries[entry_id]) == envelope
    # no status record at accept time: the queue, its place in the active set and one wake-up
    assert sorted(await redis_client.keys("*")) == sorted([A.stream.encode(), b"p:active", b"p:wake"])
    assert A.stream == "p:{ns/a}:q"
    assert await redis_client.zrange("p:active", 0, -1, withscores=True) == [(b"ns/a", 0.0)]
    assert await redis_client.xlen("p:wake") == 1


async def test_a_batch_for_several_services_writes_each_queue_in_one_round_trip(redis_client):
    enqueuer = Enqueuer(redis_client, layout=LAYOUT)
    jobs = [(A if n % 2 else B, request(n)) for n in range(10)]
    entry_ids = await asyncio.gather(*(enqueuer.enqueue(queue, e.to_json()) for queue, e in jobs))
    assert await redis_client.xlen(A.stream) == 5 and await redis_client.xlen(B.stream) == 5
    for entry_id, (queue, envelope) in zip(entry_ids, jobs):
        [(_, fields)] = await redis_client.xrange(queue.stream, entry_id, entry_id)
        assert Envelope.from_stream_fields(fields) == envelope
    assert sorted(await redis_client.zrange("p:active", 0, -1)) == [b"ns/a", b"ns/b"]


async def test_a_full_queue_refuses_and_writes_nothing_while_another_service_is_served(redis_client):
    enqueuer = Enqueuer(redis_client, layout=LAYOUT, max_queued=3)
    results = await asyncio.gather(*(enqueuer.enqueue(A, request(n).to_json()) for n in range(5)),
                                   enqueuer.enqueue(B, request(9).to_json()), return_exceptions=True)
    assert [isinstance(r, bytes) for r in results] == [True, True, True, False, False, True]
    assert all(isinstance(r, QueueFull) for r in results[3:5])
    assert "3 requests queued" in str(results[3])
    assert await redis_client.xlen(A.stream) == 3 and await redis_client.xlen(B.stream) == 1
    # retries waiting count too
    await redis_client.xdel(A.stream, results[0])
    await redis_client.zadd(A.retries, {"a retry": 1.0})
    with pytest.raises(QueueFull):
        await enqueuer.enqueue(A, request(7).to_json())


async def test_the_wake_stream_hears_of_a_queue_only_when_it_was_not_marked_active(redis_client):
    enqueuer = Enqueuer(redis_client, layout=LAYOUT)
    for n in range(3):
        await enqueuer.enqueue(A, request(n).to_json())
    assert await redis_client.xlen("p:wake") == 1
    await redis_client.zadd("p:active", {"ns/a": 123.0})  # a source found nothing new and looks again later
    await enqueuer.enqueue(A, request(4).to_json())
    assert await redis_client.xlen("p:wake") == 2
    assert await redis_client.zscore("p:active", "ns/a") == 0


async def test_a_failing_stream_write_fails_each_request(redis_client):
    await redis_client.set(A.stream, "not a stream")
    enqueuer = Enqueuer(redis_client, layout=LAYOUT)
    results = await asyncio.gather(*(enqueuer.enqueue(A, request(n).to_json()) for n in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, aioredis.ResponseError) for r in results), results
    assert await redis_client.keys("*") == [A.stream.encode()]


async def test_works_after_the_script_cache_is_flushed(redis_client):
    enqueuer = Enqueuer(redis_client, layout=LAYOUT)
    await enqueuer.enqueue(A, request(1).to_json())
    await redis_client.script_flush()
    await enqueuer.enqueue(A, request(2).to_json())
    await redis_client.script_flush()
    await asyncio.gather(enqueuer.enqueue(A, request(3).to_json()), enqueuer.enqueue(B, request(4).to_json()))
    assert await redis_client.xlen(A.stream) == 3


async def test_redis_down_fails_each_request(redis_server, redis_client):
    enqueuer = Enqueuer(redis_client, layout=LAYOUT)
    redis_server.kill()
    with pytest.raises(aioredis.ConnectionError):
        await enqueuer.enqueue(A, request(1).to_json())
