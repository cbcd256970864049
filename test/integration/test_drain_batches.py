"""The drain's batched Redis work against a real redis-server: what a user sees must not change with it.

A source replaying in-process starts the requests it reads in the script that
reads them (``queues.TAKE``: marks each running, or finds it finished or
canceled), writes the final records of a batch, settles their entries and
renews their idempotency keys in one script (``queues.FINISH``: one call for
a batch on one redis-server, one per Service queue on a cluster), and calls every script by its SHA. Each test queues into
per-Service queues as the producer does.
"""

from __future__ import annotations

import asyncio
import json
import time

import orjson

from async_component.dataplane import idempotency
from async_component.dataplane.cancel import Canceler
from async_component.dataplane.envelope import envelope_json
from async_component.dataplane.records import CANCELED, QUEUED, RUNNING, SUCCEEDED, Record, record_key
from async_component.dataplane.redisconn import call_scripts
from async_component.dataplane.source import Source

from .sourcerun import DEAD, GROUP, eventually, has, running
from .test_queues import (  # noqa: F401 (gateway: the fixture)
    LAYOUT, accept, accept_as, all_in, enqueuer, gateway, host, record, settings_for,
)


async def queued_and_settled(redis_client, services: list[str]) -> int:
    """Entries still in the Services' streams, or pending in their groups."""
    total = 0
    for service in services:
        queue = LAYOUT.for_host(host(service))
        for stream in queue.streams:
            if await redis_client.exists(stream):
                total += await redis_client.xlen(stream)
                groups = await redis_client.xinfo_groups(stream)
                total += sum(group["pending"] for group in groups if group["name"].decode() == GROUP)
    return total


async def test_a_batch_of_outcomes_writes_records_settles_entries_announces_and_renews_keys(
        redis_url, redis_client, gateway):
    keyed = idempotency.key_name("async", host("a"), "order-1")
    await redis_client.set(keyed, "fingerprint 1-0 id")  # as the producer left it: no expiry while pending
    requests = []
    async with enqueuer(redis_client) as enqueue, redis_client.pubsub() as pubsub:
        await pubsub.subscribe("async:finished")
        for n in range(20):
            service = ("a", "b")[n % 2]
            request_id = f"r{n}"
            headers = ([("Idempotency-Key", '"order-1"')] if n == 0 else [("Prefer", "respond-async, wait=5")]
                       if n % 3 == 0 else [])  # only those a client may wait for are announced
            await enqueue.enqueue(LAYOUT.for_host(host(service)), envelope_json(
                request_id, "GET", f"http://{host(service)}/n/{n}", headers, b"", time.time()))
            requests.append((service, request_id))
        async with running(settings_for(redis_url, gateway, max_inflight_per_service=8)):
            assert await eventually(all_in(redis_client, SUCCEEDED, requests))
            announced = set()
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # None: nothing yet, or the subscription
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    announced.add(message["data"].decode())
    assert announced == {record_key("async", f"r{n}", host(("a", "b")[n % 2])) for n in range(0, 20, 3)}
    assert await queued_and_settled(redis_client, ["a", "b"]) == 0
    for service, request_id in requests:
        assert 86_000_000 < await redis_client.pttl(record_key("async", request_id, host(service))) <= 86_400_000
    assert 86_000_000 < await redis_client.pttl(keyed) <= 86_400_000, "the key lasts as long as the result"
    assert sorted(path for _, path, _ in gateway.finished) == sorted(f"/n/{n}" for n in range(20))


async def test_an_outcome_redis_refuses_to_store_leaves_the_services_entry_pending(redis_url, redis_client, gateway):
    """The records, the acks and the deletes of a batch are written together or not at all."""
    gateway.slow = 0.3
    async with enqueuer(redis_client) as enqueue:
        document = envelope_json("refused", "GET", f"http://{host('a')}/slow", [], b"", time.time())
        await enqueue.enqueue(LAYOUT.for_host(host("a")), document)
    async with running(settings_for(redis_url, gateway)) as source:
        assert await eventually(lambda: has(gateway.started))
        await redis_client.config_set("maxmemory", 1)  # from now on Redis refuses writes that need memory (OOM)
        try:
            assert await eventually(lambda: _at_least(source.metrics.delivered.labels("failed").value, 2))
            assert await queued_and_settled(redis_client, ["a"]) == 2  # in the stream, and pending
            assert (await record(redis_client, "a", "refused")).state == "running"
        finally:
            await redis_client.config_set("maxmemory", 0)
        assert await eventually(all_in(redis_client, SUCCEEDED, [("a", "refused")]))
        assert await eventually(lambda: _zero(queued_and_settled(redis_client, ["a"])))
    assert [path for _, path, _ in gateway.started] == ["/slow", "/slow"]  # replayed again: at least once


async def test_redis_losing_its_scripts_mid_drain_loses_and_repeats_nothing(redis_url, redis_client, gateway):
    """A restarted or flushed Redis answers NOSCRIPT: every script is loaded again, nothing runs twice."""
    gateway.slow = 0.01
    async with enqueuer(redis_client) as enqueue:
        requests = [await accept_as(enqueue, f"s{n % 4}", f"r{n}", "/slow") for n in range(200)]
    async with running(settings_for(redis_url, gateway, max_inflight_per_service=4)):
        for _ in range(10):
            await asyncio.sleep(0.05)
            await redis_client.script_flush()
        assert await eventually(all_in(redis_client, SUCCEEDED, requests), 30)
    assert len(gateway.finished) == 200  # each replayed once
    assert await queued_and_settled(redis_client, [f"s{n}" for n in range(4)]) == 0


async def _at_least(value: float, floor: float) -> bool:
    return value >= floor


async def _zero(awaitable) -> bool:
    return await awaitable == 0


async def test_a_request_read_from_its_queue_reads_running_with_its_attempt_and_acceptance_time(
        redis_url, redis_client, gateway):
    accepted_at = 1764528000.123456
    async with enqueuer(redis_client) as enqueue:
        await enqueue.enqueue(LAYOUT.for_host(host("a")), envelope_json(
            "held", "GET", f"http://{host('a').upper()}/hang", [], b"", accepted_at, attempt=2))
    try:
        async with running(settings_for(redis_url, gateway), stop_grace=0.1):
            assert await eventually(lambda: has(gateway.started))
            raw = await redis_client.get(record_key("async", "held", host("a")))
            found = Record.from_json(raw)
            assert (found.state, found.host, found.attempts, found.accepted_at) == (RUNNING, host("a"), 3, accepted_at)
            assert await redis_client.ttl(record_key("async", "held", host("a"))) == -1  # running: no expiry
            assert json.loads(raw)["updated_at"] > accepted_at
    finally:
        gateway.release.set()


async def test_a_request_canceled_while_queued_is_settled_without_a_replay(redis_url, redis_client, gateway):
    async with enqueuer(redis_client) as enqueue:
        request_id = await accept(enqueue, "a", "/never")
    canceled = Record(state=CANCELED, host=host("a"), attempts=0, updated_at=1.0)
    await redis_client.set(record_key("async", request_id, host("a")), canceled.to_json())
    async with running(settings_for(redis_url, gateway)) as source:
        assert await eventually(lambda: _zero(queued_and_settled(redis_client, ["a"])))
        assert source.metrics.delivered.labels("delivered").value == 1
    assert gateway.started == []
    assert await record(redis_client, "a", request_id) == canceled


async def test_a_keyed_request_canceled_while_queued_keeps_its_key_as_long_as_the_canceled_record(
        redis_url, redis_client, gateway):
    """Taken without an expiry (pending), the key gets the canceled record's lifetime when the source settles the
    canceled entry: the cancel itself cannot name it."""
    queue = LAYOUT.for_host(host("a"))
    key = idempotency.key_name("async", host("a"), "withdrawn")
    document = envelope_json("withdrawn-1", "GET", f"http://{host('a')}/never", [("Idempotency-Key", "withdrawn")],
                             b"", time.time())
    async with enqueuer(redis_client) as enqueue:
        entry_id = (await enqueue.enqueue_once(queue, (document, key, "ab", "withdrawn-1"))).decode()
    assert await redis_client.pttl(key) == -1
    canceler = Canceler(redis_client, channel="async:finished")
    canceled = await canceler.cancel(record_key("async", "withdrawn-1", host("a")), queue.stream, entry_id,
                                     "withdrawn-1", host("a"), time.time())
    assert canceled.found == QUEUED and await redis_client.pttl(key) == -1
    assert await redis_client.pttl(record_key("async", "withdrawn-1", host("a"))) == -1, "pending: no expiry"
    async with running(settings_for(redis_url, gateway, status_retention=600)):
        assert await eventually(lambda: _zero(queued_and_settled(redis_client, ["a"])))
    assert gateway.started == []
    record_ttl = await redis_client.pttl(record_key("async", "withdrawn-1", host("a")))
    assert 590_000 < record_ttl <= 600_000, "settled: the result's lifetime"
    assert abs(await redis_client.pttl(key) - record_ttl) < 2000


async def test_an_entry_the_replay_refuses_is_dead_lettered_and_leaves_no_running_record(
        redis_url, redis_client, gateway):
    """Readable enough to be started as it is read, but not a request this build replays."""
    document = orjson.loads(envelope_json("future", "GET", f"http://{host('a')}/x", [], b"", time.time()))
    document["v"] = 99
    async with enqueuer(redis_client) as enqueue:
        await enqueue.enqueue(LAYOUT.for_host(host("a")), orjson.dumps(document))
    async with running(settings_for(redis_url, gateway)):
        assert await eventually(lambda: _zero(redis_client.xlen(LAYOUT.for_host(host("a")).stream)))
    assert gateway.started == []
    assert await redis_client.xlen(DEAD) == 1
    assert await redis_client.get(record_key("async", "future", host("a"))) is None


async def _read_as_the_source(redis_client, services: list[str]) -> list[tuple[str, str, str]]:
    """Each Service's queued entries read into the group as a source would: (service, stream, entry id)."""
    read = []
    for service in services:
        stream = LAYOUT.for_host(host(service)).stream
        await redis_client.xgroup_create(stream, GROUP, id="0")
        for _, entries in await redis_client.xreadgroup(GROUP, "first", {stream: ">"}):
            read += [(service, stream, entry_id.decode()) for entry_id, _ in entries]
    return read


async def test_outcomes_of_several_services_are_one_script_call_on_one_server_that_writes_and_settles_all(
        redis_url, redis_client, gateway):
    """On one redis-server a batch of outcomes costs one FINISH call whatever Services they are for (a call per
    Service cost a round of packing and parsing each); on a cluster it stays one per Service (hash slot)."""
    services = ["a", "b", "c"]
    async with enqueuer(redis_client) as enqueue:
        for n in range(6):
            await accept_as(enqueue, services[n % 3], f"r{n}", "/x")
    read = await _read_as_the_source(redis_client, services)
    writes = [(record_key("async", f"r{n}", host(service)),
               Record(state=SUCCEEDED, host=host(service), attempts=1, updated_at=1.0).to_json(),
               (stream, entry_id), 60_000, None, False) for n, (service, stream, entry_id) in enumerate(read)]
    source = Source(settings_for(redis_url, gateway), redis=redis_client)
    calls = source.finish_calls(writes)
    assert [positions for positions, _ in calls] == [list(range(6))]
    assert await call_scripts(redis_client, [call for _, call in calls]) == [6]
    for key, *_ in writes:
        assert 0 < await redis_client.pttl(key) <= 60_000
    assert await queued_and_settled(redis_client, services) == 0
    on_a_cluster = Source(settings_for(redis_url, gateway, redis_cluster=True), redis=redis_client)
    assert sorted(positions for positions, _ in on_a_cluster.finish_calls(writes)) == [[0, 1], [2, 3], [4, 5]]


async def test_an_outcome_batch_of_several_services_redis_refuses_leaves_every_entry_pending(
        redis_url, redis_client, gateway):
    """Refused whole: no record written, no entry settled, every request delivered again once Redis takes writes."""
    gateway.slow = 0.3
    async with enqueuer(redis_client) as enqueue:
        requests = [await accept_as(enqueue, service, f"refused-{service}", "/slow") for service in ("a", "b", "c")]
    async with running(settings_for(redis_url, gateway)) as source:
        assert await eventually(lambda: has(gateway.started, 3))
        await redis_client.config_set("maxmemory", 1)  # from now on Redis refuses writes that need memory (OOM)
        try:
            assert await eventually(lambda: _at_least(source.metrics.delivered.labels("failed").value, 3))
            assert await queued_and_settled(redis_client, ["a", "b", "c"]) == 6  # in the streams, and pending
            for service, request_id in requests:
                assert (await record(redis_client, service, request_id)).state == "running"
        finally:
            await redis_client.config_set("maxmemory", 0)
        assert await eventually(all_in(redis_client, SUCCEEDED, requests))
        assert await eventually(lambda: _zero(queued_and_settled(redis_client, ["a", "b", "c"])))
    assert sorted(path for _, path, _ in gateway.started) == ["/slow"] * 6  # each replayed again: at least once
