"""The source posting to a sink URL, against a real redis-server and a real sink, in this process and as a process.

Without a sink URL it replays in-process: test_inprocess_delivery.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import signal

import aiohttp
import pytest
from aiohttp import web
from cloudevents.v1.http import from_http

from async_component.dataplane import idempotency, sink as consumer_sink
from async_component.dataplane.envelope import Envelope
from async_component.local.ports import free_port
from async_component.dataplane.records import QUEUED, SUCCEEDED, Record, record_key
from async_component.protocol import DeliveryPolicy
from async_component.settings import ConsumerSettings, SourceSettings
from async_component.dataplane.source import Source

from .aioserve import serve
from .scripted import LOOPBACK_TARGETS, ScriptedServer, serving
from .sourcerun import DEAD, STREAM, eventually, has, pending, running, settled, source_process


class Sink(ScriptedServer):
    """The sink URL: remembers each event (with its headers) and answers from the script."""

    async def record(self, request: web.Request) -> tuple[dict, object]:
        headers = dict(request.headers)
        return headers, from_http(headers, await request.read())

    def reply(self, request: web.Request, status: int, seen: tuple) -> web.Response:
        return web.Response(status=status, text=f"sink says {status}")

    @property
    def received(self) -> list[str]:
        return [event["id"] for _, event in self.seen]

    @property
    def delivered(self) -> list[tuple[dict, object]]:
        return self.succeeded()

    @property
    def delivered_ids(self) -> list[str]:
        return [event["id"] for _, event in self.delivered]


@pytest.fixture
async def sink():
    async with serving(Sink()) as server:
        yield server


def settings_for(redis_url: str, sink_url: str, **changes) -> SourceSettings:
    base = SourceSettings(redis_url=redis_url, sink_url=sink_url, visibility_timeout=1.0, delivery_timeout=5.0,
                          request_timeout=4.0, health_port=0, concurrency=4, consumer_name="first")
    return dataclasses.replace(base, **changes)


async def queue(redis_client, path: str = "/work", host: str = "target.default.svc.cluster.local",
                stream: str = STREAM, headers=(("Content-Type", "text/plain"),), policy: str = ""
                ) -> tuple[str, Envelope]:
    """What the producer writes for an accepted request."""
    envelope = Envelope.new("POST", f"http://{host}{path}", list(headers), path.encode(), policy=policy)
    entry_id = (await redis_client.xadd(stream, envelope.to_stream_fields())).decode()
    await redis_client.set(record_key("async", envelope.id, host), Record(state=QUEUED, host=host).to_json())
    return entry_id, envelope


# --- delivery


async def test_entries_are_sent_as_redis_stream_source_events_and_acked_after_2xx(redis_url, redis_client, sink,
                                                                                  redis_server):
    before = [await queue(redis_client, f"/before/{n}") for n in range(3)]  # queued before the group exists
    async with running(settings_for(redis_url, sink.url)) as source:
        assert await eventually(lambda: has(sink.delivered, 3))
        after = await queue(redis_client, "/after")
        assert await eventually(lambda: has(sink.delivered, 4))
        assert await eventually(settled(redis_client))
        assert source.metrics.delivered.labels("delivered").value == 4
    for (entry_id, envelope), (headers, event) in zip([*before, after], sink.delivered):
        assert event["id"] == entry_id
        assert event["type"] == "dev.knative.sources.redisstream"
        # as the adapter names it with ADDRESS=REDIS_URL: the database number kept
        assert event["source"] == f"redis://127.0.0.1:{redis_server.port}/0/{STREAM}"
        assert event["datacontenttype"] == "application/json"
        assert headers["ce-id"] == entry_id and headers["Content-Type"] == "application/json"  # binary mode
        assert headers["Async-Delivery-Timeout"] == "5"  # DELIVERY_TIMEOUT: how long the consumer may take
        assert event.data == ["data", envelope.to_json()]
        assert Envelope.from_stream_fields(event.data) == envelope
    assert sink.received == sink.delivered_ids


@pytest.mark.parametrize("failures", [[503, 500], [408, 429]])
async def test_sink_failure_keeps_the_entry_pending_until_it_is_delivered(failures, redis_url, redis_client, sink):
    sink.statuses = list(failures)
    async with running(settings_for(redis_url, sink.url), retry_base=0.3) as source:
        entry_id, _ = await queue(redis_client)
        assert await eventually(lambda: has(sink.received, 1))
        assert await redis_client.xlen(STREAM) == 1 and await pending(redis_client) == 1
        assert await eventually(lambda: has(sink.delivered, 1))
        assert await eventually(settled(redis_client))
        assert source.metrics.delivered.labels("failed").value == 2
    assert sink.received == [entry_id] * 3
    assert sink.delivered_ids == [entry_id]


async def test_unreachable_sink_is_retried_until_it_comes_up(redis_url, redis_client):
    sink = Sink()
    async with running(settings_for(redis_url, sink.url)):
        entry_id, _ = await queue(redis_client)
        await asyncio.sleep(0.3)  # a few refused connections
        assert await pending(redis_client) == 1
        async with serving(sink):
            assert await eventually(lambda: has(sink.delivered, 1))
            assert await eventually(settled(redis_client))
    assert sink.delivered_ids == [entry_id]


async def test_sink_4xx_sends_the_entry_to_the_dead_letter_stream_and_acks_it(redis_url, redis_client, sink):
    sink.statuses = [400]
    entry_id, envelope = await queue(redis_client)
    async with running(settings_for(redis_url, sink.url)) as source:
        assert await eventually(settled(redis_client))
        assert source.metrics.delivered.labels("dead_lettered").value == 1
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert dead == {b"data": envelope.to_json().encode(), b"error": b"sink answered 400: sink says 400",
                    b"status": b"400", b"service": b"default/target"}
    assert sink.received == [entry_id] and sink.delivered == []


@pytest.mark.parametrize(("retention", "kept_ms"), [(None, 600_000), (120.0, 120_000)])
async def test_a_keyed_request_the_sink_rejects_keeps_its_key_as_long_as_a_result(redis_url, redis_client, sink,
                                                                                  retention, kept_ms):
    """Dead-lettered, the request has ended: its key, without an expiry while it was pending, gets one: its
    Service's retention policy, else STATUS_RETENTION (600 s here), as a result of the replay's would."""
    sink.statuses = [400]
    entry_id, envelope = await queue(redis_client, headers=[("Idempotency-Key", '"refused"')],
                                     policy=DeliveryPolicy(retention=retention).encode())
    key = idempotency.key_name("async", "target.default.svc.cluster.local", "refused")
    await redis_client.set(key, f"ab {entry_id} {envelope.id}")
    async with running(settings_for(redis_url, sink.url, status_retention=600)):
        assert await eventually(settled(redis_client))
    assert await redis_client.xlen(DEAD) == 1
    assert kept_ms - 10_000 < await redis_client.pttl(key) <= kept_ms


async def test_two_sources_share_the_group_without_delivering_twice(redis_url, redis_client, sink):
    sink.delay = 0.01
    queued = [(await queue(redis_client, f"/n/{n}"))[0] for n in range(30)]
    async with running(settings_for(redis_url, sink.url, concurrency=2)), \
            running(settings_for(redis_url, sink.url, concurrency=2, consumer_name="second")):
        queued += [(await queue(redis_client, f"/m/{n}"))[0] for n in range(10)]
        assert await eventually(lambda: has(sink.delivered, 40))
        assert await eventually(settled(redis_client))
    assert sorted(sink.received) == sorted(queued)
    assert collections.Counter(sink.received).most_common(1)[0][1] == 1


# --- crashes and long deliveries


async def test_entries_of_a_killed_source_are_reclaimed_and_delivered(redis_url, redis_client, sink):
    sink.hold = True
    queued = [(await queue(redis_client, f"/n/{n}"))[0] for n in range(3)]
    process = source_process(redis_url, {"SINK_URL": sink.url, "CONSUMER_NAME": "doomed"})
    try:
        assert await eventually(lambda: has(sink.received, 3), 20)
    finally:
        process.kill()
        process.communicate()
    assert await pending(redis_client) == 3
    sink.hold = False
    async with running(settings_for(redis_url, sink.url, consumer_name="heir")) as heir:
        assert await eventually(lambda: has(sink.delivered, 3))
        assert await eventually(settled(redis_client))
        assert heir.metrics.reclaimed._value.get() == 3
    assert sorted(sink.delivered_ids) == sorted(queued)


@pytest.mark.slow
async def test_a_long_delivery_is_not_stolen_by_another_source(redis_url, redis_client, sink):
    sink.delay = 2.5  # well past the visibility timeout of 1 s
    async with running(settings_for(redis_url, sink.url)) as first:
        entry_id, _ = await queue(redis_client)
        assert await eventually(lambda: has(sink.received, 1))
        async with running(settings_for(redis_url, sink.url, consumer_name="second")) as second:
            assert await eventually(lambda: has(sink.delivered, 1))
            assert await eventually(settled(redis_client))
            assert second.metrics.reclaimed._value.get() == 0
        assert first.metrics.reclaimed._value.get() == 0
    assert sink.received == [entry_id]


async def stop_while_delivering(settings: SourceSettings, redis_client, sink: Sink, grace: float) -> None:
    source = Source(settings, stop_grace=grace)
    task = asyncio.create_task(source.run())
    await queue(redis_client)
    assert await eventually(lambda: has(sink.received, 1))
    source.stop()
    await asyncio.wait_for(task, 5)


async def test_stop_waits_for_deliveries_in_flight_within_the_grace_period(redis_url, redis_client, sink):
    sink.delay = 0.5
    await stop_while_delivering(settings_for(redis_url, sink.url), redis_client, sink, grace=5)
    assert len(sink.delivered) == 1 and await settled(redis_client)()


async def test_stop_leaves_a_delivery_past_the_grace_period_pending(redis_url, redis_client, sink):
    sink.hold = True
    await stop_while_delivering(settings_for(redis_url, sink.url), redis_client, sink, grace=0.2)
    assert await pending(redis_client) == 1 and await redis_client.xlen(STREAM) == 1


async def test_source_rides_out_a_redis_restart(redis_url, redis_client, redis_server, sink):
    async with running(settings_for(redis_url, sink.url)):
        await queue(redis_client, "/first")
        assert await eventually(lambda: has(sink.delivered, 1))
        redis_server.kill()
        await asyncio.sleep(0.3)
        redis_server.start()
        with contextlib.suppress(Exception):  # the test's own pooled connection died with the server
            await redis_client.ping()
        await queue(redis_client, "/second")
        assert await eventually(lambda: has(sink.delivered, 2))
        assert await eventually(settled(redis_client))


# --- the process


async def test_process_serves_probes_reads_k_sink_and_stops_on_sigterm(redis_url, redis_client, sink):
    health = free_port()
    process = source_process(redis_url, {"K_SINK": sink.url, "HEALTH_PORT": str(health)})
    try:
        await queue(redis_client)
        assert await eventually(lambda: has(sink.delivered, 1), 20)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{health}/readyz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{health}/metrics") as resp:
                assert 'async_source_delivered_total{outcome="delivered"} 1.0' in await resp.text()
        process.send_signal(signal.SIGTERM)
        await asyncio.get_running_loop().run_in_executor(None, process.wait, 10)
        assert process.returncode == 0
    finally:
        process.kill()
        process.communicate()


# --- the whole delivery path


async def test_503_twice_then_200_succeeds_on_attempt_3_through_source_consumer_and_retry_mover(
        redis_url, redis_client):
    statuses, attempts = [503, 503], []

    async def service(request: web.Request) -> web.Response:
        attempts.append(request.headers["Async-Attempt"])
        return web.Response(status=statuses.pop(0) if statuses else 200, text="done")

    target, consumer_settings = web.Application(), ConsumerSettings(
        redis_url=redis_url, port=free_port(), host="127.0.0.1", retry_base_delay=0.05, retry_max_delay=0.1,
        **LOOPBACK_TARGETS)
    target.router.add_route("*", "/{tail:.*}", service)
    target_port = free_port()
    runners = [await serve(target, target_port),
               await serve(consumer_sink.make_app(consumer_settings, mover_interval=0.05), consumer_settings.port)]
    try:
        _, envelope = await queue(redis_client, "/flaky", host=f"127.0.0.1:{target_port}")

        async def succeeded():
            raw = await redis_client.get(record_key("async", envelope.id, f"127.0.0.1:{target_port}"))
            return Record.from_json(raw).state == SUCCEEDED

        async with running(settings_for(redis_url, f"http://127.0.0.1:{consumer_settings.port}/")):
            assert await eventually(succeeded)
            assert await eventually(settled(redis_client))
    finally:
        for runner in runners:
            await runner.cleanup()
    assert attempts == ["1", "2", "3"]
    record = Record.from_json(await redis_client.get(record_key("async", envelope.id, f"127.0.0.1:{target_port}")))
    assert (record.attempts, record.response.status, record.response.body) == (3, 200, b"done")
