"""A source without a sink URL replays entries itself: real redis-server, a real Service on a free port.

The in-process path must come to exactly what the HTTP path (source -> consumer
over HTTP) comes to: the same records, the same dead letters, the same
guarantees (acknowledged only once the outcome is recorded, reclaimed after a
crash, never replayed twice once finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from async_component.dataplane import idempotency, sink
from async_component.dataplane.envelope import Envelope
from async_component.local.ports import free_port
from async_component.dataplane.records import FAILED, RETRYING, RUNNING, SUCCEEDED, Record, record_key, retry_key
from async_component.protocol import DeliveryPolicy
from async_component.settings import ConsumerSettings, SourceSettings

from .aioserve import serve
from .scripted import LOOPBACK_TARGETS, ScriptedServer, serving
from .sourcerun import DEAD, GROUP, STREAM, eventually, has, pending, running, settled, source_process

class Service(ScriptedServer):
    """The Knative Service a request is replayed to: remembers (path, Async-Attempt) of each request."""

    async def record(self, request: web.Request) -> tuple[str, str]:
        return request.path, request.headers.get("Async-Attempt", "")

    def reply(self, request: web.Request, status: int, seen: tuple) -> web.Response:
        # fixed headers, so two runs record byte-identical responses
        headers = {"X-Reply": "yes", "Date": "Mon, 23 Nov 2026 00:00:00 GMT", "Server": "test"}
        return web.Response(status=status, text=f"{request.path} answered {status}", headers=headers)


def service():
    return serving(Service())


class Notified(ScriptedServer):
    """A completion sink: remembers (path, ce-type, ce-subject) of each event."""

    async def record(self, request: web.Request) -> tuple[str, str, str]:
        return request.path, request.headers.get("ce-type", ""), request.headers.get("ce-subject", "")


def loopback_env(target: Service) -> dict[str, str]:
    """The target-host policy of a source process that replays to ``target``."""
    return {"ALLOWED_HOSTS": "127.0.0.1", "ALLOWED_PORTS": str(target.port)}


def source_settings(redis_url: str, **changes) -> SourceSettings:
    base = SourceSettings(redis_url=redis_url, visibility_timeout=1.0, health_port=0, concurrency=4,
                          consumer_name="first", retry_base_delay=0.05, retry_max_delay=0.1, request_timeout=2.0,
                          **LOOPBACK_TARGETS)
    return dataclasses.replace(base, **changes)


@contextlib.asynccontextmanager
async def http_consumer(redis_url: str, **changes):
    """The HTTP path's consumer, with the same replay settings as :func:`source_settings` (and ``changes``)."""
    settings = ConsumerSettings(redis_url=redis_url, port=free_port(), host="127.0.0.1", retry_base_delay=0.05,
                                retry_max_delay=0.1, request_timeout=2.0, **{**LOOPBACK_TARGETS, **changes})
    runner = await serve(sink.make_app(settings, mover_interval=0.05), settings.port)
    try:
        yield f"http://127.0.0.1:{settings.port}/"
    finally:
        await runner.cleanup()


async def queue(redis_client, target: Service, path: str = "/work", request_id: str | None = None,
                policy: str = "", headers=(("Content-Type", "text/plain"),)) -> Envelope:
    """What the producer writes for an accepted request."""
    envelope = Envelope.new("POST", f"http://{target.host}{path}", list(headers), path.encode(),
                            request_id=request_id, accepted_at=1.0, policy=policy)
    await redis_client.xadd(STREAM, envelope.to_stream_fields())
    return envelope


async def record_of(redis_client, request_id: str) -> Record | None:
    keys = await redis_client.keys(f"async:*:req:{request_id}")
    raw = await redis_client.get(keys[0]) if keys else None
    return None if raw is None else Record.from_json(raw)


def finished(redis_client, *envelopes: Envelope):
    async def check() -> bool:
        records = [await record_of(redis_client, e.id) for e in envelopes]
        return all(r is not None and r.finished for r in records)
    return check


def comparable(record: Record) -> dict:
    """A record without its timestamps."""
    doc = json.loads(record.to_json())
    doc.pop("updated_at", None)
    return doc


# --- delivery


async def test_an_entry_is_replayed_recorded_acknowledged_and_deleted(redis_url, redis_client):
    async with service() as target, running(source_settings(redis_url)) as source:
        envelope = await queue(redis_client, target)
        assert await eventually(finished(redis_client, envelope))
        assert await eventually(settled(redis_client))
        assert source.metrics.delivered.labels("delivered").value == 1
        assert await redis_client.ttl(record_key("async", envelope.id, target.host)) > 86000
    assert target.seen == [("/work", "1")]
    record = await record_of(redis_client, envelope.id)
    assert (record.state, record.attempts, record.host) == (SUCCEEDED, 1, target.host)
    assert (record.response.status, record.response.body) == (200, b"/work answered 200")


async def test_records_and_dead_letters_are_those_of_the_http_path(redis_url, redis_client):
    """The same requests (and one malformed entry) through source -> HTTP consumer, then in-process."""
    outcomes = []
    async with service() as target:
        for path in ("http", "in-process"):
            await redis_client.flushall()
            target.seen = []
            async with contextlib.AsyncExitStack() as stack:
                sink_url = await stack.enter_async_context(http_consumer(redis_url)) if path == "http" else None
                await stack.enter_async_context(running(source_settings(redis_url, sink_url=sink_url)))
                target.statuses = [201, 404, 503]
                envelopes = []
                for n, name in enumerate(("ok", "missing", "flaky")):  # one at a time: the statuses go in order
                    envelopes.append(await queue(redis_client, target, f"/{name}", request_id=f"request-{n}"))
                    assert await eventually(finished(redis_client, envelopes[-1]))
                await redis_client.xadd(STREAM, {"data": "not a queued request"})
                assert await eventually(settled(redis_client))
                assert await redis_client.zcard(retry_key("async")) == 0
                records = [comparable(await record_of(redis_client, e.id)) for e in envelopes]
                dead = [fields for _, fields in await redis_client.xrange(DEAD)]
                outcomes.append((records, dead, target.seen))
    assert outcomes[0] == outcomes[1]
    records, dead, seen = outcomes[1]
    assert [(r["state"], r["attempts"]) for r in records] == [(SUCCEEDED, 1), (FAILED, 1), (SUCCEEDED, 2)]
    assert seen == [("/ok", "1"), ("/missing", "1"), ("/flaky", "1"), ("/flaky", "2")]
    assert [d[b"error"] for d in dead[:1]] == [b"the Service answered 404"]
    assert dead[1][b"data"] == b"not a queued request" and dead[1][b"status"] == b"400"
    assert dead[1][b"error"].startswith(b"sink answered 400: ")


async def test_503_twice_then_200_succeeds_on_attempt_3_through_the_retry_set(redis_url, redis_client):
    async with service() as target, running(source_settings(redis_url)):
        target.statuses = [503, 502]
        envelope = await queue(redis_client, target)
        states = set()

        async def done() -> bool:
            record = await record_of(redis_client, envelope.id)
            states.add(record and record.state)
            return record is not None and record.finished

        assert await eventually(done)
        assert await eventually(settled(redis_client))
    assert RETRYING in states
    assert target.seen == [("/work", "1"), ("/work", "2"), ("/work", "3")]
    record = await record_of(redis_client, envelope.id)
    assert (record.state, record.attempts, record.response.status) == (SUCCEEDED, 3, 200)
    assert await redis_client.xlen(DEAD) == 0


async def test_503_forever_is_dead_lettered_after_max_attempts(redis_url, redis_client):
    async with service() as target, running(source_settings(redis_url, max_attempts=2)):
        target.statuses = [503] * 5
        envelope = await queue(redis_client, target)
        assert await eventually(finished(redis_client, envelope))
        assert await eventually(settled(redis_client))
    assert target.seen == [("/work", "1"), ("/work", "2")]
    record = await record_of(redis_client, envelope.id)
    assert (record.state, record.attempts, record.error) == (FAILED, 2, "the Service answered 503")
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert Envelope.from_stream_fields(dead).id == envelope.id and dead[b"status"] == b"503"


@pytest.mark.parametrize("path", ["/.well-known/async-requests/x", "/a/..//.well-known/async-requests/x?q=1",
                                  "/%2Ewell-known/async-requests/x"])
@pytest.mark.parametrize("over_http", [False, True])
async def test_an_entry_for_the_status_path_is_dead_lettered_never_replayed(redis_url, redis_client, path, over_http):
    """Replayed, it would reach the producer, not the Service, and be queued again without end."""
    async with service() as target, contextlib.AsyncExitStack() as stack:
        sink_url = await stack.enter_async_context(http_consumer(redis_url)) if over_http else None
        await stack.enter_async_context(running(source_settings(redis_url, sink_url=sink_url)))
        envelope = await queue(redis_client, target, path)
        assert await eventually(finished(redis_client, envelope))
        assert await eventually(settled(redis_client))
    assert target.seen == []
    record = await record_of(redis_client, envelope.id)
    assert record.state == FAILED and "status path" in record.error
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert Envelope.from_stream_fields(dead).id == envelope.id and b"status path" in dead[b"error"]
    assert await redis_client.xinfo_stream(STREAM) and (await redis_client.xinfo_stream(STREAM))["entries-added"] == 1


def poison(target: Service, **changes) -> dict:
    """A stream entry the producer never writes: its envelope with ``changes``."""
    doc = json.loads(Envelope.new("POST", f"http://{target.host}/work", [], b"x", accepted_at=1.0).to_json())
    return {"data": json.dumps({**doc, **changes})}


@pytest.mark.parametrize("changes, reason", [
    ({"url": "http://[::1/x"}, "does not parse"),
    ({"url": "http://a.b.svc.cluster.local:port/x"}, "does not parse"),
    ({"url": "mailto:a@b"}, "not an http(s) URL"),
    ({"attempt": 2**70}, "attempt must be"),
    ({"accepted_at": float("nan")}, "accepted_at must be"),
    ({"body_encoding": "rot13"}, "body_encoding"),
])
@pytest.mark.parametrize("over_http", [False, True])
async def test_a_poison_entry_is_dead_lettered_with_its_reason(redis_url, redis_client, changes, reason, over_http):
    """Before: a URL that does not parse crashed the delivery again after each reclaim; attempt 2**70 passed
    for "Redis unavailable" and was retried without end. Neither reached a dead letter."""
    async with service() as target, contextlib.AsyncExitStack() as stack:
        sink_url = await stack.enter_async_context(http_consumer(redis_url)) if over_http else None
        await stack.enter_async_context(running(source_settings(redis_url, sink_url=sink_url)))
        fields = poison(target, **changes)
        await redis_client.xadd(STREAM, fields)
        assert await eventually(settled(redis_client), timeout=5)
    assert target.seen == []
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert dead[b"data"] == fields["data"].encode() and dead[b"status"] == b"400"
    assert reason.encode() in dead[b"error"], dead[b"error"]


REFUSING = {"allowed_hosts": (".svc.cluster.local",), "allowed_ports": ()}
"""The default target policy: the test's Service, on 127.0.0.1, is not on it."""


async def refusing(stack: contextlib.AsyncExitStack, redis_url: str, over_http: bool, **changes) -> SourceSettings:
    """A source whose replays refuse the test's Service: in-process (with ``changes``), or over HTTP its consumer's."""
    if over_http:
        sink_url = await stack.enter_async_context(http_consumer(redis_url, **REFUSING))
        return source_settings(redis_url, sink_url=sink_url)
    return source_settings(redis_url, **REFUSING, **changes)


@pytest.mark.parametrize("over_http", [False, True])
async def test_a_target_outside_the_producers_policy_is_dead_lettered_never_called(redis_url, redis_client,
                                                                                  over_http):
    """Anyone who reaches Redis can queue an entry: the source replays only what the producer would have queued.
    The request ends failed with the reason, so a client who was answered 202 before the policy changed reads why
    (before: in-process, its status read 404; through the consumer, which records only what it finds queued,
    nothing was recorded and it read ``queued`` for as long as its entry stayed). Its key gets the result's
    lifetime."""
    async with service() as target, contextlib.AsyncExitStack() as stack:
        settings = await refusing(stack, redis_url, over_http, target_gateway_url=f"http://{target.host}")
        await stack.enter_async_context(running(settings))
        envelope = Envelope.new("GET", "http://169.254.169.254/latest/meta-data/", [("Idempotency-Key", '"k"')], b"")
        key = idempotency.queued_key_name("async", "169.254.169.254", envelope.headers)
        await redis_client.set(key, f"fingerprint 1-0 {envelope.id}")  # what the producer's claim would be
        await redis_client.xadd(STREAM, envelope.to_stream_fields())
        assert await eventually(settled(redis_client))
    assert target.seen == []
    record = await record_of(redis_client, envelope.id)
    assert record.state == FAILED and record.attempts == 0
    assert record.error == "not replayed: target host '169.254.169.254' is not allowed (ALLOWED_HOSTS)"
    assert 86000 < await redis_client.ttl(key) <= 86400  # the key ends with its request
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert Envelope.from_stream_fields(dead).id == envelope.id
    assert b"target host '169.254.169.254' is not allowed (ALLOWED_HOSTS)" in dead[b"error"]


@pytest.mark.parametrize("over_http", [False, True])
async def test_a_retry_the_policy_now_refuses_ends_failed_never_called(redis_url, redis_client, over_http):
    """A request replayed once and waiting for its retry when ALLOWED_HOSTS changed: its client has seen it
    retrying, so it ends failed, with the reason, for as long as a result is kept. Before: its record was deleted
    (the status read 404) in-process, and over HTTP stayed retrying, without an expiry, for ever."""
    async with service() as target, contextlib.AsyncExitStack() as stack:
        settings = await refusing(stack, redis_url, over_http)
        first = Envelope.new("POST", f"http://{target.host}/work", [], b"x", accepted_at=time.time())
        key = record_key("async", first.id, target.host)
        retrying = Record(state=RETRYING, host=target.host, attempts=1, updated_at=time.time(), error="503")
        await redis_client.set(key, retrying.to_json())
        await redis_client.xadd(STREAM, first.next_attempt().to_stream_fields())
        await stack.enter_async_context(running(settings))
        assert await eventually(finished(redis_client, first))
        assert await eventually(settled(redis_client))
    assert target.seen == []
    record = await record_of(redis_client, first.id)
    assert record.state == FAILED and record.attempts == 1  # the refused one was never made
    assert "not replayed: target host" in record.error and "ALLOWED_HOSTS" in record.error
    assert 86000 < await redis_client.ttl(key) <= 86400  # STATUS_RETENTION_SECONDS
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert Envelope.from_stream_fields(dead).id == first.id and b"ALLOWED_HOSTS" in dead[b"error"]


@pytest.mark.parametrize("allowed, told", [(None, True), (("127.0.0.1",), True), ((".svc.cluster.local",), False)])
async def test_completion_events_go_only_to_sink_hosts_on_notification_allowed_hosts(redis_url, redis_client,
                                                                                      allowed, told):
    """A Service's owner names its sinks; an operator may keep the data plane from posting anywhere else: a sink
    whose host is not on NOTIFICATION_ALLOWED_HOSTS hears nothing, and the request keeps its state."""
    async with service() as target, serving(Notified()) as sink:
        policy = DeliveryPolicy(on_success_sink=sink.url + "done").encode()
        async with running(source_settings(redis_url, notification_allowed_hosts=allowed)) as source:
            envelope = await queue(redis_client, target, policy=policy)
            assert await eventually(finished(redis_client, envelope))
            registry = source.registry

            async def notified() -> bool:
                return bool(registry.get_sample_value("async_notifications_total", {"result": "sent"})
                            or registry.get_sample_value("async_notifications_total", {"result": "failed"}))
            assert await eventually(notified)
    assert (sink.seen == [("/done", "dev.knative.async.request.succeeded", envelope.id)]) is told
    assert registry.get_sample_value("async_notifications_total", {"result": "sent" if told else "failed"}) == 1
    assert (await record_of(redis_client, envelope.id)).state == SUCCEEDED


async def test_a_finished_request_delivered_again_is_acknowledged_without_a_replay(redis_url, redis_client):
    """A source that died between recording the outcome and acknowledging leaves the entry to be delivered again."""
    async with service() as target:
        envelope = Envelope.new("GET", f"http://{target.host}/once", [], b"")
        done = Record(state=SUCCEEDED, host=target.host, attempts=1, updated_at=1.0)
        await redis_client.set(record_key("async", envelope.id, target.host), done.to_json())
        await redis_client.xadd(STREAM, envelope.to_stream_fields())
        async with running(source_settings(redis_url)) as source:
            assert await eventually(settled(redis_client))
            assert source.metrics.delivered.labels("delivered").value == 1
    assert target.seen == []
    assert (await record_of(redis_client, envelope.id)) == done


async def test_redis_down_while_replaying_leaves_the_entry_pending_until_recorded(redis_url, redis_client,
                                                                                  redis_server):
    async with service() as target, running(source_settings(redis_url)):
        target.delay = 0.5
        envelope = await queue(redis_client, target)
        assert await eventually(lambda: has(target.seen))
        redis_server.kill()  # the outcome cannot be recorded: 503 in the HTTP path, so not acknowledged
        await asyncio.sleep(0.8)
        redis_server.start()
        with contextlib.suppress(Exception):  # the test's own pooled connection died with the server
            await redis_client.ping()
        assert await eventually(finished(redis_client, envelope))
        assert await eventually(settled(redis_client))
    assert len(target.seen) == 2  # replayed again once Redis was back: at least once
    assert (await record_of(redis_client, envelope.id)).state == SUCCEEDED


async def test_an_outcome_redis_refuses_to_store_leaves_the_entry_pending(redis_url, redis_client):
    """The ack goes in the transaction that records the outcome: refused together, never the ack alone."""
    async with service() as target, running(source_settings(redis_url)) as source:
        target.delay = 0.3
        envelope = await queue(redis_client, target)
        assert await eventually(lambda: has(target.seen))
        await redis_client.config_set("maxmemory", 1)  # from now on Redis refuses writes that need memory (OOM)

        async def refused() -> bool:
            return source.metrics.delivered.labels("failed").value >= 2
        try:
            assert await eventually(refused)
            assert await redis_client.xlen(STREAM) == 1 and await pending(redis_client) == 1
            assert (await record_of(redis_client, envelope.id)).state == "running"
        finally:
            await redis_client.config_set("maxmemory", 0)
        assert await eventually(finished(redis_client, envelope))
        assert await eventually(settled(redis_client))
    assert (await record_of(redis_client, envelope.id)).state == SUCCEEDED
    assert target.seen == [("/work", "1"), ("/work", "1")]  # replayed again: at least once



async def test_a_request_the_core_cannot_record_ends_failed_with_its_dead_letter_not_running(redis_url, redis_client):
    """An error that is not Redis's while the outcome is written (a bug, an input nobody foresaw) would fail the same
    way every time: the entry is dead-lettered, and the request, marked running when it started, ends failed."""
    async with service() as target, running(source_settings(redis_url)) as source:
        replayer = source.delivery.replayer
        async def started() -> bool:
            return replayer.sets is not None
        assert await eventually(started)
        write = replayer.sets._send
        broken = []

        async def once_broken(items):
            if not broken:
                broken.append(items)
                raise RuntimeError("an error nobody foresaw")
            return await write(items)

        replayer.sets._send = once_broken
        envelope = await queue(redis_client, target)
        assert await eventually(settled(redis_client))
        assert broken and await redis_client.xlen(DEAD) == 1
        assert target.seen == [("/work", "1")]
    record = await record_of(redis_client, envelope.id)
    assert record.state == FAILED, f"reads {record.state}"
    assert "RuntimeError: an error nobody foresaw" in record.error
    [key] = await redis_client.keys(f"async:*:req:{envelope.id}")
    assert await redis_client.ttl(key) > 0

@pytest.mark.slow
async def test_a_long_replay_is_kept_fresh_and_not_stolen_by_another_source(redis_url, redis_client):
    async with service() as target, running(source_settings(redis_url, request_timeout=10)) as first:
        target.delay = 2.5  # well past the visibility timeout of 1 s
        envelope = await queue(redis_client, target)
        assert await eventually(lambda: has(target.seen))
        async with running(source_settings(redis_url, consumer_name="second", request_timeout=10)) as second:
            assert await eventually(finished(redis_client, envelope))
            assert await eventually(settled(redis_client))
            assert second.metrics.reclaimed._value.get() == 0
        assert first.metrics.reclaimed._value.get() == 0
    assert target.seen == [("/work", "1")]


# --- the process


async def test_entries_of_a_source_killed_mid_replay_are_reclaimed_and_replayed(redis_url, redis_client):
    async with service() as target:
        target.delay = 30  # the doomed source is killed while the Service works
        envelopes = [await queue(redis_client, target, f"/n/{n}") for n in range(3)]
        process = source_process(redis_url, {"CONSUMER_NAME": "doomed", **loopback_env(target)})
        try:
            assert await eventually(lambda: has(target.seen, 3), 20)
        finally:
            process.kill()
            process.communicate()
        assert await pending(redis_client) == 3
        assert {(await record_of(redis_client, e.id)).state for e in envelopes} == {"running"}
        target.delay = 0
        async with running(source_settings(redis_url, consumer_name="heir")) as heir:
            assert await eventually(finished(redis_client, *envelopes))
            assert await eventually(settled(redis_client))
            assert heir.metrics.reclaimed._value.get() == 3
    assert sorted(target.seen) == sorted([(f"/n/{n}", "1") for n in range(3)] * 2)
    assert {(await record_of(redis_client, e.id)).state for e in envelopes} == {SUCCEEDED}


async def died_on(redis_client, count: int, times: int) -> None:
    """Read the first ``count`` queued entries as a process that dies holding them: the first is delivered ``times``
    times, the others once."""
    await redis_client.xgroup_create(STREAM, GROUP, id="0")
    ids = [entry_id for _, entries in await redis_client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=count)
           for entry_id, _ in entries]
    for _ in range(times - 1):
        await redis_client.xclaim(STREAM, GROUP, "dead", min_idle_time=0, message_ids=ids[:1])


@pytest.mark.parametrize("over_http", [False, True])
async def test_an_entry_that_keeps_killing_its_process_is_dead_lettered_not_delivered_again(redis_url, redis_client,
                                                                                             over_http):
    """Delivered MAX_DELIVERIES times without an outcome (each process holding it died): the next reclaim gives up."""
    async with service() as target, serving(Notified()) as sink, contextlib.AsyncExitStack() as stack, \
            redis_client.pubsub() as finished:
        await finished.subscribe("async:finished")  # as a producer with a waiting client does
        told = DeliveryPolicy(on_failure_sink=sink.url + "failed").encode()
        doomed = await queue(redis_client, target, "/doomed", policy=told, headers=[("Idempotency-Key", "doomed")])
        key = idempotency.key_name("async", target.host, "doomed")
        await redis_client.set(key, f"ab 1-0 {doomed.id}")  # as the producer left it: no expiry while pending
        survivor = await queue(redis_client, target, "/survivor", policy=told)
        # what the last process to die on it left: a running record, which never expires by itself
        await redis_client.set(record_key("async", doomed.id, target.host),
                               Record(state=RUNNING, host=target.host, attempts=3).to_json())
        await died_on(redis_client, 2, times=3)
        sink_url = await stack.enter_async_context(http_consumer(redis_url)) if over_http else None
        settings = source_settings(redis_url, sink_url=sink_url, max_deliveries=3)
        source = await stack.enter_async_context(running(settings))
        assert await eventually(settled(redis_client))
        assert source.metrics.delivered.labels("dead_lettered").value == 1
        async def told() -> bool:
            return bool(sink.seen)

        assert await eventually(told), "its failure sink hears of it"
        announced, deadline = set(), time.monotonic() + 5
        while record_key("async", doomed.id, target.host).encode() not in announced and time.monotonic() < deadline:
            message = await finished.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                announced.add(message["data"])
        assert record_key("async", doomed.id, target.host).encode() in announced, "a waiting client hears of it"
    assert sink.seen == [("/failed", "dev.knative.async.request.failed", doomed.id)]
    assert target.seen == [("/survivor", "1")]  # reclaimed a second time: still within the cap
    assert (await record_of(redis_client, survivor.id)).state == SUCCEEDED
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert Envelope.from_stream_fields(dead).id == doomed.id
    assert dead[b"error"].startswith(b"delivered 4 times without an outcome (MAX_DELIVERIES is 3)")
    record = await record_of(redis_client, doomed.id)
    assert record.state == FAILED and record.error.startswith("delivered 4 times without an outcome")
    assert 0 < await redis_client.ttl(record_key("async", doomed.id, target.host)) <= 86400  # one retention
    assert record.idempotency_key == key and 86_000 < await redis_client.ttl(key) <= 86400, "as long as the record"


@pytest.mark.parametrize("over_http", [False, True])
async def test_an_entry_given_up_keeps_its_failed_record_and_key_for_its_services_retention(redis_url, redis_client,
                                                                                         over_http):
    """The Service's retention policy (2 min), not STATUS_RETENTION (10 min): as long as a replayed result is kept."""
    async with service() as target, contextlib.AsyncExitStack() as stack:
        doomed = await queue(redis_client, target, "/doomed", policy=DeliveryPolicy(retention=120).encode(),
                             headers=[("Idempotency-Key", "doomed")])
        key = idempotency.key_name("async", target.host, "doomed")
        await redis_client.set(key, f"ab 1-0 {doomed.id}")  # as the producer left it: no expiry while pending
        await died_on(redis_client, 1, times=2)
        sink_url = await stack.enter_async_context(http_consumer(redis_url)) if over_http else None
        await stack.enter_async_context(running(source_settings(redis_url, sink_url=sink_url, max_deliveries=2,
                                                                status_retention=600)))
        assert await eventually(settled(redis_client))
    assert target.seen == [] and await redis_client.xlen(DEAD) == 1
    assert (await record_of(redis_client, doomed.id)).state == FAILED
    assert 110_000 < await redis_client.pttl(record_key("async", doomed.id, target.host)) <= 120_000
    assert 110_000 < await redis_client.pttl(key) <= 120_000, "as long as the record"


async def test_the_dead_letter_stream_keeps_about_dead_letter_max_length_entries(redis_url, redis_client):
    """Trimmed as entries are added, by the source (malformed entries) and by the replay (failed requests)."""
    await redis_client.config_set("stream-node-max-entries", 10)  # approximate trimming drops whole nodes
    async with service() as target, running(source_settings(redis_url, dead_letter_max_length=20, max_attempts=1)):
        target.statuses = [404] * 50
        for n in range(50):
            await redis_client.xadd(STREAM, {"data": f"not a queued request {n}"})
            await queue(redis_client, target, f"/missing/{n}")
        assert await eventually(settled(redis_client))
    assert len(target.seen) == 50
    assert 20 <= await redis_client.xlen(DEAD) <= 30
    kept = [fields[b"data"] for _, fields in await redis_client.xrange(DEAD)]
    assert b"not a queued request 49" in kept and b"not a queued request 0" not in kept  # the oldest go first


def read_until(stream, text: bytes) -> bytes | None:
    """Read a process's output until a line holds ``text``: that line (None if the output ended first)."""
    for line in stream:
        if text in line:
            return line
    return None


@pytest.mark.slow
async def test_sigterm_during_a_long_replay_lets_it_finish_and_reads_nothing_new(redis_url, redis_client):
    """The source used to give its replays 20 s on SIGTERM, whatever REQUEST_TIMEOUT: a longer one was cut, and
    replayed again elsewhere. It now gives them REQUEST_TIMEOUT + 10 s (16 s here, where it said 20 s), the longest
    any replay may take (a Service's own timeout is capped at REQUEST_TIMEOUT), and the replay in flight ends."""
    async with service() as target:
        target.delay = 4
        first = await queue(redis_client, target, "/first")
        process = source_process(redis_url, {"REQUEST_TIMEOUT": "6", **loopback_env(target)})
        try:
            assert await eventually(lambda: has(target.seen, 1), 20)
            process.send_signal(signal.SIGTERM)
            stopping = await asyncio.to_thread(read_until, process.stderr, b"stopping: waiting up to")
            assert stopping is not None and b"stopping: waiting up to 16s for 1 deliveries" in stopping, stopping
            second = await queue(redis_client, target, "/second")  # queued while the source drains
            returncode = await asyncio.to_thread(process.wait, 40)
        finally:
            process.kill()
            process.communicate()
        assert returncode == 0
        assert (await record_of(redis_client, first.id)).state == SUCCEEDED
        assert await pending(redis_client) == 0 and await redis_client.xlen(STREAM) == 1  # the second, never read
        target.delay = 0
        async with running(source_settings(redis_url, consumer_name="heir")):
            assert await eventually(finished(redis_client, second))
            assert await eventually(settled(redis_client))
            await asyncio.sleep(1.5)  # past VISIBILITY_TIMEOUT: anything left over would be reclaimed by now
    assert target.seen == [("/first", "1"), ("/second", "1")]


async def test_process_without_a_sink_url_replays_in_process_and_serves_probes(redis_url, redis_client):
    health = free_port()
    async with service() as target:
        process = source_process(redis_url, {"HEALTH_PORT": str(health), "STATUS_RETENTION_SECONDS": "60",
                                             **loopback_env(target)})
        try:
            envelope = await queue(redis_client, target)
            assert await eventually(finished(redis_client, envelope), 20)
            assert 0 < await redis_client.ttl(record_key("async", envelope.id, target.host)) <= 60
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{health}/readyz") as resp:
                    assert resp.status == 200
                async with http.get(f"http://127.0.0.1:{health}/metrics") as resp:
                    metrics = await resp.text()
            assert 'async_consumer_replays_total{outcome="succeeded"} 1.0' in metrics
            process.send_signal(signal.SIGTERM)
            await asyncio.get_running_loop().run_in_executor(None, process.wait, 10)
            assert process.returncode == 0
        finally:
            process.kill()
            _, stderr = process.communicate()
    assert "in-process (replaying directly)" in stderr.decode()
    replay_lines = [line for line in stderr.decode().splitlines() if "attempt 1: POST" in line]
    assert replay_lines and all(" async_component.dataplane.replay: " in line for line in replay_lines), \
        "the replay logs under its own name, not the consumer's"
    assert target.seen == [("/work", "1")]
