"""The consumer against a real redis-server and a real target Service, both on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import os
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from cloudevents.v1.conversion import to_structured
from cloudevents.v1.http import CloudEvent

from async_component.dataplane import idempotency, sink
from async_component.dataplane import envelope as wire
from async_component.dataplane.envelope import Envelope, event_attributes, event_data, header_value
from async_component.local.ports import free_port
from async_component.dataplane.records import (
    CANCELED, EXPIRED, FAILED, QUEUED, RETRYING, SUCCEEDED, Record, record_key, retry_key,
)
from async_component.settings import ConsumerSettings

from .aioserve import serve
from .scripted import LOOPBACK_TARGETS, ScriptedServer, serving

STREAM = "async-requests"
DEAD = "async-requests-dead"


class Target(ScriptedServer):
    """A Service that answers from a script of statuses (then 200) and remembers what it received."""

    def __init__(self) -> None:
        super().__init__()
        self.on_request = None

    @property
    def base(self) -> str:
        return f"http://{self.host}"

    async def record(self, request: web.Request) -> dict:
        seen = {"method": request.method, "raw_path": request.raw_path,
                "headers": list(request.headers.items()), "raw_headers": list(request.raw_headers),
                "body": await request.read()}
        if self.on_request is not None:
            self.on_request()
        return seen

    def reply(self, request: web.Request, status: int, seen: dict) -> web.Response:
        compressed = gzip.compress(b"reply to " + seen["body"])
        headers = [("Content-Encoding", "gzip"), ("X-Reply", "a"), ("X-Reply", "b"), ("Location", "/elsewhere")]
        return web.Response(status=status, body=compressed, headers=headers)

    def header(self, n: int, name: str) -> list[str]:
        return [v for k, v in self.seen[n]["headers"] if k.lower() == name.lower()]


@pytest.fixture
async def target():
    async with serving(Target()) as service:
        yield service


def settings_for(redis_url: str, **changes) -> ConsumerSettings:
    """The consumer behind Knative's RedisStreamSource: events from the single stream, retries back to it."""
    base = ConsumerSettings(redis_url=redis_url, port=free_port(), host="127.0.0.1", retry_base_delay=0.05,
                            retry_max_delay=0.2, request_timeout=2.0, max_attempts=3, **LOOPBACK_TARGETS)
    return dataclasses.replace(base, **changes)


async def start_consumer(settings: ConsumerSettings) -> web.AppRunner:
    return await serve(sink.make_app(settings, mover_interval=0.05), settings.port, settings.host)


@pytest.fixture
async def settings(redis_url):
    return settings_for(redis_url)


@pytest.fixture
async def base(settings):
    runner = await start_consumer(settings)
    yield f"http://127.0.0.1:{settings.port}"
    await runner.cleanup()



async def queue(redis_client, envelope: Envelope) -> str:
    """What the producer writes for an accepted request."""
    host = envelope.url.split("/")[2]
    entry_id = await redis_client.xadd(STREAM, envelope.to_stream_fields())
    await redis_client.set(record_key("async", envelope.id, host), Record(state=QUEUED, host=host).to_json())
    return entry_id.decode()


def binary_event(entry_id: str, fields) -> tuple[dict, bytes]:
    """Exactly what Knative's RedisStreamSource (and our source) sends for one stream entry."""
    return wire.binary_event(wire.event_source("redis://127.0.0.1:6379", STREAM), entry_id, fields)


async def post(http, base: str, headers: dict, body: bytes) -> tuple[int, dict]:
    async with http.post(base + "/", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def deliver_new(http, base: str, redis_client, last: list[str]) -> list[int]:
    """Act as a source: post every stream entry after ``last[0]`` to the consumer."""
    entries = await redis_client.xrange(STREAM, min=f"({last[0]}" if last[0] != "-" else "-")
    statuses = []
    for entry_id, fields in entries:
        last[0] = entry_id.decode()
        status, _ = await post(http, base, *binary_event(last[0], fields))
        statuses.append(status)
    return statuses


async def record_of(redis_client, request_id: str) -> Record:
    [key] = await redis_client.keys(f"async:*:req:{request_id}")
    return Record.from_json(await redis_client.get(key))


async def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


def envelope_for(target: Target, path: str = "/work", method: str = "POST", body: bytes = b"payload",
                 headers=(("Content-Type", "text/plain"),)) -> Envelope:
    return Envelope.new(method, f"{target.base}{path}", list(headers), body)


# --- replaying


async def test_redis_stream_source_event_is_replayed_byte_for_byte(base, http, redis_client, target):
    body = os.urandom(2048) + b"\xff\xfe"  # not UTF-8
    headers = [("X-Tag", "one"), ("Content-Type", "application/octet-stream"), ("X-Tag", "two"),
               ("Prefer", "wait=5, handling=lenient"), ("Async-Attempt", "7")]
    envelope = envelope_for(target, "/items/a%2Fb?q=1&q=2&z=%20", "PUT", body, headers)
    entry_id = await queue(redis_client, envelope)
    target.statuses = [201]

    status, doc = await post(http, base, *binary_event(entry_id, await fields_of(redis_client, entry_id)))

    assert (status, doc["state"], doc["attempt"]) == (200, SUCCEEDED, 1)
    [seen] = target.seen
    assert (seen["method"], seen["raw_path"], seen["body"]) == ("PUT", "/items/a%2Fb?q=1&q=2&z=%20", body)
    assert target.header(0, "X-Tag") == ["one", "two"]
    assert target.header(0, "Content-Type") == ["application/octet-stream"]
    assert target.header(0, "Prefer") == ["respond-sync, wait=5, handling=lenient"]  # only respond-async is ours
    assert target.header(0, "Async-Replay") == ["true"]
    assert target.header(0, "Async-Request-Id") == [envelope.id]
    assert target.header(0, "Async-Attempt") == ["1"]
    assert target.header(0, "User-Agent") == [] and target.header(0, "Accept-Encoding") == []

    record = await record_of(redis_client, envelope.id)
    assert (record.state, record.attempts, record.host) == (SUCCEEDED, 1, f"127.0.0.1:{target.port}")
    assert record.response.status == 201
    assert gzip.decompress(record.response.body) == b"reply to " + body  # kept compressed, as sent
    assert [v for k, v in record.response.headers if k == "X-Reply"] == ["a", "b"]
    assert ("Content-Encoding", "gzip") in record.response.headers
    assert all(k.lower() not in ("content-length", "transfer-encoding") for k, _ in record.response.headers)
    assert 86000 < await redis_client.ttl(record_key("async", envelope.id, f"127.0.0.1:{target.port}")) <= 86400


@pytest.mark.parametrize("through_gateway", [False, True])
async def test_header_bytes_that_are_not_utf8_are_replayed_unchanged(redis_url, http, redis_client, target,
                                                                    through_gateway):
    """aiohttp writes header text as UTF-8 (and drops what is not): such a request goes out byte for byte."""
    changes = {"target_gateway_url": target.base} if through_gateway else {}
    runner = await start_consumer(settings := settings_for(redis_url, **changes))
    try:
        headers = [("X-Binary", header_value(b"a\xff\xfe\x80z")), ("X-Utf8", "caf\u00e9"),
                   ("Prefer", "return=minimal")]
        envelope = Envelope.new("PATCH", "http://sleep.default.svc.cluster.local/b?x=1" if through_gateway
                                else f"{target.base}/b?x=1", headers, b"body \xff")
        entry_id = await queue(redis_client, envelope)
        status, doc = await post(http, f"http://127.0.0.1:{settings.port}",
                                 *binary_event(entry_id, await fields_of(redis_client, entry_id)))
    finally:
        await runner.cleanup()
    assert (status, doc["state"]) == (200, SUCCEEDED)
    [seen] = target.seen
    raw = dict(seen["raw_headers"])
    assert raw[b"X-Binary"] == b"a\xff\xfe\x80z" and raw[b"X-Utf8"] == "caf\u00e9".encode()
    assert raw[b"Prefer"] == b"respond-sync, return=minimal" and raw[b"Async-Replay"] == b"true"
    assert (seen["method"], seen["raw_path"], seen["body"]) == ("PATCH", "/b?x=1", b"body \xff")
    assert raw[b"Host"] == (b"sleep.default.svc.cluster.local" if through_gateway else f"127.0.0.1:{target.port}".encode())
    record = await record_of(redis_client, envelope.id)
    assert record.response.status == 200 and gzip.decompress(record.response.body) == b"reply to body \xff"


async def fields_of(redis_client, entry_id: str):
    [(_, fields)] = await redis_client.xrange(STREAM, min=entry_id, max=entry_id)
    return fields


def structured(entry_id: str, data) -> tuple[dict, bytes]:
    attributes = event_attributes("redis://127.0.0.1:6379", STREAM, entry_id)
    return to_structured(CloudEvent(attributes, data))


@pytest.mark.parametrize("form", ["structured list", "structured JSON text", "binary list", "binary list, charset"])
async def test_event_forms_are_all_replayed(form, base, http, redis_client, target):
    envelope = envelope_for(target, "/form")
    entry_id = await queue(redis_client, envelope)
    data = event_data(envelope.to_stream_fields())
    if form == "structured list":
        event = structured(entry_id, data)
    elif form == "structured JSON text":
        event = structured(entry_id, json.dumps(data))
    else:
        event = binary_event(entry_id, envelope.to_stream_fields())
        if form.endswith("charset"):
            event[0]["content-type"] = "application/json; charset=utf-8"
    status, doc = await post(http, base, *event)
    assert (status, doc["state"]) == (200, SUCCEEDED)
    assert [s["raw_path"] for s in target.seen] == ["/form"]


async def test_concurrent_events_are_each_replayed_and_recorded_once(base, http, redis_client, target):
    envelopes = [envelope_for(target, f"/many/{n}") for n in range(20)]
    events = [binary_event(await queue(redis_client, e), e.to_stream_fields()) for e in envelopes]
    answers = await asyncio.gather(*(post(http, base, *event) for event in events))
    assert [(status, doc["state"]) for status, doc in answers] == [(200, SUCCEEDED)] * 20
    assert sorted(s["raw_path"] for s in target.seen) == sorted(f"/many/{n}" for n in range(20))
    assert {(await record_of(redis_client, e.id)).state for e in envelopes} == {SUCCEEDED}


async def test_events_still_replay_after_redis_forgets_its_scripts(base, http, redis_client, target):
    first, second = envelope_for(target, "/before"), envelope_for(target, "/after")
    assert (await post(http, base, *binary_event(await queue(redis_client, first), first.to_stream_fields())))[0] == 200
    await redis_client.script_flush()
    status, doc = await post(http, base, *binary_event(await queue(redis_client, second), second.to_stream_fields()))
    assert (status, doc["state"]) == (200, SUCCEEDED)
    assert [s["raw_path"] for s in target.seen] == ["/before", "/after"]


async def test_a_redirect_is_recorded_not_followed(base, http, redis_client, target):
    envelope = envelope_for(target, "/moved")
    entry_id = await queue(redis_client, envelope)
    target.statuses = [302]
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc["state"]) == (200, SUCCEEDED)
    assert [s["raw_path"] for s in target.seen] == ["/moved"]
    record = await record_of(redis_client, envelope.id)
    assert record.response.status == 302 and ("Location", "/elsewhere") in record.response.headers


@pytest.mark.parametrize("gateway_path, path_seen", [("", "/x?y=1"), ("/mesh", "/mesh/x?y=1")])
async def test_gateway_gets_the_request_with_the_target_host(redis_url, http, redis_client, target, gateway_path,
                                                            path_seen):
    """TARGET_GATEWAY_URL may name a path on the gateway: the replayed target follows it."""
    settings = settings_for(redis_url, target_gateway_url=target.base + gateway_path)
    runner = await start_consumer(settings)
    try:
        envelope = Envelope.new("GET", "http://sleep.default.svc.cluster.local/x?y=1", [("Host", "evil")], b"")
        entry_id = await queue(redis_client, envelope)
        status, doc = await post(http, f"http://127.0.0.1:{settings.port}",
                                 *binary_event(entry_id, envelope.to_stream_fields()))
    finally:
        await runner.cleanup()
    assert (status, doc["state"]) == (200, SUCCEEDED)
    assert target.seen[0]["raw_path"] == path_seen
    assert target.header(0, "Host") == ["sleep.default.svc.cluster.local"]
    assert (await record_of(redis_client, envelope.id)).host == "sleep.default.svc.cluster.local"


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254/latest/meta-data/", "target host '169.254.169.254' is not allowed"),
    ("http://sleep.default.svc.cluster.local:6379/", "target port of 'sleep.default.svc.cluster.local:6379'"),
    ("http://redis.default.svc.cluster.local.evil.example/", "is not allowed"),
    ("http://user@sleep.default.svc.cluster.local/", "not a valid host name"),
])
async def test_a_target_outside_the_producers_policy_is_refused_never_called(redis_url, http, redis_client, target,
                                                                            url, reason):
    """Any pod can post an event: the consumer sends only what the producer would have queued. An event for no
    entry of the stream, or naming a queued request with another URL, gets 400 and nothing is written. The first
    attempt at an entry the stream does hold (the policy changed since it was queued) ends ``failed`` with the
    reason: before, it got 400 too, and Knative's adapter, which acknowledges it then but keeps the entry, left
    its status reading ``queued`` for ever."""
    settings = settings_for(redis_url, target_gateway_url=target.base, allowed_hosts=(".svc.cluster.local",),
                            allowed_ports=())  # the defaults; the gateway would pass anything on
    runner = await start_consumer(settings)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        envelope = Envelope.new("GET", url, [], b"")
        made_up = await post(http, base, *binary_event("1-0", envelope.to_stream_fields()))
        other = Envelope.new("GET", "http://sleep.default.svc.cluster.local/", [], b"")
        other_id = (await redis_client.xadd(STREAM, other.to_stream_fields())).decode()
        forged = await post(http, base, *binary_event(other_id, dataclasses.replace(other, url=url)
                                                      .to_stream_fields()))
        written = await redis_client.keys(f"async:*req:*")
        entry_id = (await redis_client.xadd(STREAM, envelope.to_stream_fields())).decode()  # no record: attempt 1
        status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    finally:
        await runner.cleanup()
    for answer in made_up, forged:
        assert answer[0] == 400 and reason in answer[1]["error"], answer
    assert written == []
    assert (status, doc["state"]) == (200, FAILED), doc
    record = await record_of(redis_client, envelope.id)
    assert (record.state, record.attempts) == (FAILED, 0)
    assert "not replayed" in record.error and reason in record.error, record
    assert target.seen == []


@pytest.mark.parametrize("url, answer", [
    ("http://sleep.default.svc.cluster.local/.well-known/async-requests/x", (200, SUCCEEDED)),  # a duplicate
    ("http://sleep.default.svc.cluster.local:6379/", (400, None)),
])
async def test_an_event_never_replayed_leaves_a_finished_request_as_it_is(redis_url, http, redis_client, target,
                                                                           url, answer):
    """An event for the status path, or for a port the policy refuses, naming a request that has finished (any pod
    can post one): the recorded result stays. Before: the status-path event rewrote it as failed."""
    settings = settings_for(redis_url, target_gateway_url=target.base, allowed_hosts=(".svc.cluster.local",),
                            allowed_ports=())
    runner = await start_consumer(settings)
    try:
        envelope = Envelope.new("GET", url, [], b"")
        done = Record(state=SUCCEEDED, host="sleep.default.svc.cluster.local", attempts=1, updated_at=1.0)
        await redis_client.set(record_key("async", envelope.id, "sleep.default.svc.cluster.local"), done.to_json())
        status, doc = await post(http, f"http://127.0.0.1:{settings.port}",
                                 *binary_event("1-0", envelope.to_stream_fields()))
    finally:
        await runner.cleanup()
    assert (status, doc.get("state")) == answer, doc
    assert target.seen == []
    assert await record_of(redis_client, envelope.id) == done
    assert await redis_client.keys("*dead*") == []


async def test_events_past_body_memory_limit_wait_unread_until_replays_end(redis_url, http, redis_client, target):
    """BODY_MEMORY_LIMIT 1 MB and three events of ~400 kB posted at once to a Service that hangs: two are
    replayed, the third waits unread (before: all three were read and replayed at once, however large); once the
    Service answers, it goes through too, and every event is answered."""
    settings = settings_for(redis_url, body_memory_limit=1_000_000)
    runner = await start_consumer(settings)
    base = f"http://127.0.0.1:{settings.port}"
    target.hold = True
    try:
        events = [binary_event(f"{n}-0", Envelope.new("POST", f"{target.base}/big/{n}", [], b"x" * 400_000)
                               .to_stream_fields()) for n in range(3)]
        posts = [asyncio.create_task(post(http, base, *event)) for event in events]
        assert await eventually(lambda: _true(len(target.seen) == 2))
        await asyncio.sleep(0.3)
        assert len(target.seen) == 2
        async with http.get(base + "/metrics") as resp:
            metrics = await resp.text()
        assert "async_consumer_waiting_events 1.0" in metrics
        assert any(line.startswith("async_consumer_held_bytes 8") for line in metrics.splitlines()), metrics
        target.release.set()
        answers = await asyncio.gather(*posts)
    finally:
        target.release.set()
        await runner.cleanup()
    assert [status for status, _ in answers] == [200, 200, 200]
    assert sorted(seen["raw_path"] for seen in target.seen) == ["/big/0", "/big/1", "/big/2"]



async def test_a_chunked_event_counts_as_64_mib_only_until_it_is_read(redis_url, http, redis_client, target):
    """An event without Content-Length might be 64 MiB, so it is admitted as that; once read, its replay holds
    what it is (30 kB), and the next event under BODY_MEMORY_LIMIT 1 MB need not wait for that replay to end."""
    settings = settings_for(redis_url, body_memory_limit=1_000_000, request_timeout=30.0)
    runner = await start_consumer(settings)
    base = f"http://127.0.0.1:{settings.port}"
    target.hold = True
    try:
        (chunked_headers, chunked_body), (headers, body) = (
            binary_event(f"{n}-0", Envelope.new("POST", f"{target.base}/sized/{n}", [], b"x" * 30_000)
                         .to_stream_fields()) for n in range(2))

        async def in_chunks():
            for at in range(0, len(chunked_body), 4096):
                yield chunked_body[at:at + 4096]

        first = asyncio.create_task(post(http, base, chunked_headers, in_chunks()))
        assert await eventually(lambda: _true(len(target.seen) == 1))
        async with http.get(base + "/metrics") as resp:
            [held] = [line for line in (await resp.text()).splitlines() if line.startswith("async_consumer_held_bytes ")]
        assert 30_000 < float(held.split()[1]) < 40_000, held
        second = asyncio.create_task(post(http, base, headers, body))
        assert await eventually(lambda: _true(len(target.seen) == 2), 3), "waited for the chunked event's replay"
        target.release.set()
        answers = await asyncio.gather(first, second)
    finally:
        target.release.set()
        await runner.cleanup()
    assert [status for status, _ in answers] == [200, 200]

@contextlib.asynccontextmanager
async def two_replaying_and_a_third(redis_url, http, target):
    """A consumer with BODY_MEMORY_LIMIT 1 MB replaying two events of 450 kB (the Service holding them until
    ``target.release``), and a third event of 100 kB, not posted yet, which would have to wait for room: yields the
    consumer's URL and port, the two posts and the third event."""
    settings = settings_for(redis_url, body_memory_limit=1_000_000)
    runner = await start_consumer(settings)
    base = f"http://127.0.0.1:{settings.port}"
    target.hold = True
    try:
        events = [binary_event(f"{n}-0", Envelope.new("POST", f"{target.base}/big/{n}", [], b"x" * size)
                               .to_stream_fields()) for n, size in enumerate([450_000, 450_000, 100_000])]
        posts = [asyncio.create_task(post(http, base, *event)) for event in events[:2]]
        assert await eventually(lambda: _true(len(target.seen) == 2))
        yield base, settings.port, posts, events[2]
    finally:
        target.release.set()
        await runner.cleanup()


@pytest.mark.parametrize("deadline, replayed", [("2.5", False), ("30", True), (None, True)])
async def test_an_event_that_waited_too_long_for_its_senders_deadline_is_answered_503_unreplayed(
        redis_url, http, redis_client, target, deadline, replayed):
    """A third event waits 1 s for room (BODY_MEMORY_LIMIT 1 MB, two of 450 kB being replayed); its replay may take
    REQUEST_TIMEOUT, 2 s. A sender that waits 2.5 s in all (Async-Delivery-Timeout, as our source sends it) would
    post it again while it ran: it gets 503, and the Service is not called with it. Before, it was replayed, and
    then again when its sender posted it again. A sender with time enough, or none said (Knative's adapter), gets
    the replay."""
    async with two_replaying_and_a_third(redis_url, http, target) as (base, _, posts, (headers, body)):
        if deadline is not None:
            headers = {**headers, "Async-Delivery-Timeout": deadline}
        third = asyncio.create_task(post(http, base, headers, body))
        await asyncio.sleep(1.0)
        target.release.set()
        answers = await asyncio.gather(*posts, third)
    assert [status for status, _ in answers] == [200, 200, 200 if replayed else 503], answers
    assert ("/big/2" in [seen["raw_path"] for seen in target.seen]) is replayed
    if not replayed:
        assert "its sender waits 2.5s in all, and the replay may take 2s more" in answers[2][1]["error"]


async def test_an_event_whose_sender_leaves_while_it_waits_for_room_is_dropped_with_a_log_line(
        redis_url, http, redis_client, target, caplog):
    """Two events of 450 kB are replayed (BODY_MEMORY_LIMIT 1 MB, the Service holding them), and a third of 100 kB
    waits; its sender times out and closes the connection, as our source does after DELIVERY_TIMEOUT before posting
    it again. Once room frees, that event is dropped, not replayed, and the log says why: before, reading it raised
    aiohttp's ConnectionResetError and the log held only a traceback."""
    async with two_replaying_and_a_third(redis_url, http, target) as (base, port, posts, (headers, body)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n" % len(body)
                     + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
                     + b"\r\n" + body)
        await writer.drain()

        async def waiting() -> bool:
            async with http.get(base + "/metrics") as resp:
                return "async_consumer_waiting_events 1.0" in await resp.text()

        assert await eventually(waiting)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.2)
        target.release.set()
        answers = await asyncio.gather(*posts)
        await asyncio.sleep(0.5)
    assert [status for status, _ in answers] == [200, 200]
    assert sorted(seen["raw_path"] for seen in target.seen) == ["/big/0", "/big/1"]
    assert "its sender left before the event was read (it waited for room" in caplog.text
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


async def test_an_event_being_replayed_is_held_once_not_also_as_the_request_body_read(redis_url, http, redis_client,
                                                                                        target):
    """While four events of 900 kB are replayed (the Service holding them), the consumer holds each body once, as
    the request to replay, and the Service's copy (this test's) once more: under 2.25 MB an event in all. Before,
    the event as read stayed on its aiohttp request for as long as the replay ran."""
    settings = settings_for(redis_url)
    runner = await start_consumer(settings)
    base = f"http://127.0.0.1:{settings.port}"
    target.hold = True
    events = [binary_event(f"{n}-0", Envelope.new("POST", f"{target.base}/big/{n}", [], os.urandom(450_000).hex()
                                                  .encode()).to_stream_fields()) for n in range(4)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        posts = [asyncio.create_task(post(http, base, *event)) for event in events]
        assert await eventually(lambda: _true(len(target.seen) == 4))
        await asyncio.sleep(0.2)
        held = tracemalloc.get_traced_memory()[0] - before
        target.release.set()
        await asyncio.gather(*posts)
    finally:
        tracemalloc.stop()
        target.release.set()
        await runner.cleanup()
    assert held < 4 * 2_250_000, f"{held / 4e6:.2f} MB an event"


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_event_over_64_mib_gets_413(redis_url, chunked):
    settings = settings_for(redis_url)
    runner = await start_consumer(settings)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        if chunked:
            writer.write(b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
            for _ in range(65):  # 65 MiB: one past the limit
                writer.write(chunk)
                await writer.drain()
        else:
            writer.write(b"POST / HTTP/1.1\r\nHost: c\r\nContent-Length: 70000000\r\n\r\n" + b"x" * 1000)
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        await writer.wait_closed()  # else the runner's cleanup waits 10 s for the connection to go
    finally:
        await runner.cleanup()
    assert status.startswith(b"HTTP/1.1 413 "), status


async def _true(value: bool) -> bool:
    return value


# --- Knative's RedisStreamSource, as its receive adapter sends events

VECTORS = Path(__file__).parent.parent / "vectors" / "redisstreamsource"


def go_json(value) -> str:
    """JSON as Go's encoder writes it: compact, with &, < and > escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


async def send_recorded(port: int, headers: list[list[str]], body: bytes) -> tuple[int, dict]:
    """One request exactly as recorded (header order and case), but for Host and Content-Length; its answer."""
    head = [f"{k}: {v}" for k, v in headers if k.lower() not in ("host", "content-length")]
    request = "\r\n".join(["POST / HTTP/1.1", f"Host: 127.0.0.1:{port}", *head, f"Content-Length: {len(body)}", "", ""])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode("latin-1") + body)
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        answer = await reader.readexactly(length)
    finally:
        writer.close()
    return int(status_line.split()[1]), json.loads(answer)


@pytest.mark.parametrize("escaped", [False, True])
async def test_the_adapters_own_event_is_replayed(redis_url, redis_client, target, escaped):
    """The recorded adapter request (compact JSON, Go's escapes, ce-time in nanoseconds, Kn-Namespace, Traceparent)."""
    vector = json.loads((VECTORS / "binary-mode-event.json").read_text())
    body = vector["body"].encode()
    [field, document] = json.loads(body)
    envelope = Envelope.from_json(document)
    if escaped:  # the sample has no character Go escapes: one that has them all
        doc = dict(json.loads(document), url="http://127.0.0.1:18081/echo?a=1&b=<2>", body="<a & b>")
        body = go_json([field, go_json(doc)]).encode()
        assert b"\\u0026" in body and b"&" not in body
    settings = settings_for(redis_url, target_gateway_url=target.base)
    runner = await start_consumer(settings)
    try:
        status, doc = await send_recorded(settings.port, vector["headers"], body)
    finally:
        await runner.cleanup()
    assert (status, doc["state"], doc["attempt"]) == (200, SUCCEEDED, 1)
    [seen] = target.seen
    assert seen["method"] == "POST"
    assert (seen["raw_path"], seen["body"]) == (("/echo?a=1&b=<2>", b"<a & b>") if escaped else ("/echo?sleep=0", b"hello"))
    assert target.header(0, "Host") == ["127.0.0.1:18081"]
    assert target.header(0, "User-Agent") == ["curl/7.88.1"] and target.header(0, "Content-Type") == ["text/plain"]
    assert target.header(0, "Traceparent") == [] and target.header(0, "Kn-Namespace") == []  # the event's, not the request's
    assert (await record_of(redis_client, envelope.id)).state == SUCCEEDED


# --- retries and failures


async def test_two_503_then_200_succeeds_on_the_third_attempt_through_the_retry_set(base, http, redis_client, target):
    envelope = envelope_for(target)
    await queue(redis_client, envelope)
    target.statuses = [503, 503]
    last = ["-"]
    states = []

    async def step():
        for status in await deliver_new(http, base, redis_client, last):
            assert status == 200
            states.append((await record_of(redis_client, envelope.id)).state)
        return states and states[-1] != RETRYING

    assert await eventually(step)
    assert states == [RETRYING, RETRYING, SUCCEEDED]
    assert [target.header(n, "Async-Attempt") for n in range(3)] == [["1"], ["2"], ["3"]]
    record = await record_of(redis_client, envelope.id)
    assert (record.attempts, record.response.status) == (3, 200)
    assert await redis_client.zcard(retry_key("async")) == 0
    assert await redis_client.xlen(DEAD) == 0


async def test_a_retry_is_scheduled_with_backoff_then_moved_back_to_the_stream(redis_url, http, redis_client, target):
    settings = settings_for(redis_url, retry_base_delay=0.4, retry_max_delay=1.0)
    runner = await start_consumer(settings)
    try:
        envelope = envelope_for(target)
        entry_id = await queue(redis_client, envelope)
        target.statuses = [429]
        before = time.time()
        status, doc = await post(http, f"http://127.0.0.1:{settings.port}",
                                 *binary_event(entry_id, envelope.to_stream_fields()))
        assert (status, doc["state"]) == (200, RETRYING)
        record = await record_of(redis_client, envelope.id)
        assert (record.attempts, record.error) == (1, "the Service answered 429")
        assert before + 0.2 <= record.next_attempt_at <= time.time() + 0.4  # jitter: half to all of 0.4 s
        [(member, score)] = await redis_client.zrange(retry_key("async"), 0, -1, withscores=True)
        assert Envelope.from_json(member) == envelope.next_attempt()
        assert score == record.next_attempt_at
        assert await redis_client.xlen(STREAM) == 1

        async def moved():
            return await redis_client.xlen(STREAM) == 2

        assert await eventually(moved, 5)
        assert time.time() >= record.next_attempt_at
    finally:
        await runner.cleanup()
    [_, (_, fields)] = await redis_client.xrange(STREAM)
    assert Envelope.from_stream_fields(fields) == envelope.next_attempt()
    assert await redis_client.zcard(retry_key("async")) == 0
    assert (await record_of(redis_client, envelope.id)).state == RETRYING  # until the replay starts


async def test_503_forever_fails_after_max_attempts_into_the_dead_letter_stream(base, http, redis_client, target):
    envelope = envelope_for(target)
    await queue(redis_client, envelope)
    target.statuses = [503] * 10
    last = ["-"]

    async def finished():
        await deliver_new(http, base, redis_client, last)
        return (await record_of(redis_client, envelope.id)).state == FAILED

    assert await eventually(finished)
    assert len(target.seen) == 3
    record = await record_of(redis_client, envelope.id)
    assert (record.attempts, record.response.status, record.error) == (3, 503, "the Service answered 503")
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert Envelope.from_stream_fields(dead).id == envelope.id
    assert dead[b"error"] == b"the Service answered 503" and dead[b"status"] == b"503"
    assert await redis_client.zcard(retry_key("async")) == 0


async def test_404_fails_at_once_without_retry(base, http, redis_client, target):
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    target.statuses = [404]
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc["state"]) == (200, FAILED)
    record = await record_of(redis_client, envelope.id)
    assert (record.state, record.attempts, record.response.status) == (FAILED, 1, 404)
    assert await redis_client.zcard(retry_key("async")) == 0
    assert await redis_client.xlen(DEAD) == 1
    await asyncio.sleep(0.2)  # the mover has had its chances: nothing comes back
    assert await redis_client.xlen(STREAM) == 1 and len(target.seen) == 1



async def test_an_error_that_is_not_redis_recording_the_outcome_ends_the_request_failed(base, http, redis_client,
                                                                                       target, monkeypatch):
    """The event gets 400 (it would fail the same way every time, and the sender takes a 400 for good); the request,
    started running, must not read running for ever: it ends failed, with the retention of a finished one."""
    from async_component.dataplane.replay import Replayer

    async def broken(*args, **kwargs):
        raise RuntimeError("an error nobody foresaw")

    monkeypatch.setattr(Replayer, "_record_outcome", broken)
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert status == 400 and "RuntimeError: an error nobody foresaw" in doc["error"], doc
    record = await record_of(redis_client, envelope.id)
    assert (record.state, record.attempts) == (FAILED, 1), record
    assert "RuntimeError: an error nobody foresaw" in record.error
    [key] = await redis_client.keys(f"async:*:req:{envelope.id}")
    assert await redis_client.ttl(key) > 0
    assert len(target.seen) == 1

async def test_a_response_over_the_size_limit_is_not_kept_and_the_request_fails_without_retry(
        redis_url, http, redis_client, target):
    """A Service's answer is recorded in Redis: past RESPONSE_SIZE_LIMIT it is not read, and its status says why."""
    settings = settings_for(redis_url, response_size_limit=1000)
    runner = await start_consumer(settings)
    try:
        small, large = envelope_for(target, body=os.urandom(500)), envelope_for(target, body=os.urandom(3000))
        for envelope in (small, large):  # gzip leaves random bytes as long as they are
            entry_id = await queue(redis_client, envelope)
            status, doc = await post(http, f"http://127.0.0.1:{settings.port}",
                                     *binary_event(entry_id, envelope.to_stream_fields()))
            assert status == 200
    finally:
        await runner.cleanup()
    assert (await record_of(redis_client, small.id)).state == SUCCEEDED
    record = await record_of(redis_client, large.id)
    error = "the Service answered 200 with a body of more than 1000 bytes, over RESPONSE_SIZE_LIMIT: not kept"
    assert (record.state, record.attempts, record.response, record.error) == (FAILED, 1, None, error)
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert Envelope.from_stream_fields(dead).id == large.id and dead[b"error"] == error.encode()
    assert await redis_client.zcard(retry_key("async")) == 0 and len(target.seen) == 2


async def test_unreachable_target_is_retried(base, http, redis_client):
    envelope = Envelope.new("POST", f"http://127.0.0.1:{free_port()}/down", [], b"x")
    entry_id = await queue(redis_client, envelope)
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc["state"]) == (200, RETRYING)
    record = await record_of(redis_client, envelope.id)
    assert record.error.startswith("ConnectionRefusedError") and record.response is None


async def test_slow_target_times_out_and_is_retried(redis_url, http, redis_client, target):
    settings = settings_for(redis_url, request_timeout=0.2, max_attempts=1)
    runner = await start_consumer(settings)
    target.delay = 0.5
    try:
        envelope = envelope_for(target)
        entry_id = await queue(redis_client, envelope)
        status, doc = await post(http, f"http://127.0.0.1:{settings.port}",
                                 *binary_event(entry_id, envelope.to_stream_fields()))
    finally:
        await runner.cleanup()
    assert (status, doc["state"]) == (200, FAILED)  # max_attempts=1: a timeout uses the only attempt
    record = await record_of(redis_client, envelope.id)
    assert record.error == "no answer within 0.2s"
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert dead[b"error"] == b"no answer within 0.2s" and b"status" not in dead


# --- bad and repeated events


@pytest.mark.parametrize("headers, body", [
    ({"Content-Type": "application/json"}, b'["data", "{}"]'),  # no ce-* headers: not a CloudEvent
    ({"Content-Type": "application/cloudevents+json"}, b"{not json"),
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "s", "ce-id": "1", "Content-Type": "application/json"},
     b'["data", "not json"]'),
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "s", "ce-id": "1", "Content-Type": "application/json"},
     b'["other", "{}"]'),
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "s", "ce-id": "1", "Content-Type": "application/json"},
     b""),
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "s", "ce-id": "1", "Content-Type": "text/plain"},
     b"\x00binary"),
])
async def test_malformed_event_is_400_and_the_next_good_event_still_works(headers, body, base, http, redis_client,
                                                                           target, caplog):
    status, doc = await post(http, base, headers, body)
    assert status == 400 and doc["error"]
    assert "rejected a malformed event" in caplog.text
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc["state"]) == (200, SUCCEEDED)


async def test_envelope_with_a_non_http_url_is_400(base, http, redis_client):
    envelope = Envelope.new("GET", "ftp://host/file", [], b"")
    status, doc = await post(http, base, *binary_event("1-0", envelope.to_stream_fields()))
    assert status == 400 and "http" in doc["error"]


async def test_redelivered_event_of_a_finished_request_is_not_replayed(base, http, redis_client, target):
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    event = binary_event(entry_id, envelope.to_stream_fields())
    assert (await post(http, base, *event))[1]["state"] == SUCCEEDED
    status, doc = await post(http, base, *event)
    assert (status, doc) == (200, {"id": envelope.id, "state": SUCCEEDED, "duplicate": True})
    assert len(target.seen) == 1


async def test_a_canceled_request_is_settled_without_being_replayed(base, http, redis_client, target):
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    canceled = Record(state=CANCELED, host=urlsplit(envelope.url).netloc, attempts=1, updated_at=1.0)
    await redis_client.set(record_key("async", envelope.id, urlsplit(envelope.url).netloc), canceled.to_json())
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc) == (200, {"id": envelope.id, "state": CANCELED, "duplicate": True})
    assert target.seen == []


async def test_a_retrying_keyed_request_keeps_its_key_without_expiry_and_its_record_names_it(
        base, http, redis_client, target):
    envelope = envelope_for(target, headers=[("Idempotency-Key", "again")])
    host = urlsplit(envelope.url).netloc
    key = idempotency.key_name("async", host, "again")
    await redis_client.set(key, f"ab 1-0 {envelope.id}")
    target.statuses = [503]
    entry_id = await queue(redis_client, envelope)
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc["state"]) == (200, RETRYING)
    record = Record.from_json(await redis_client.get(record_key("async", envelope.id, host)))
    assert record.state == RETRYING and record.idempotency_key == key  # a cancel finds the key there
    assert await redis_client.pttl(key) == -1, "pending: the key lives as long as the request"


@pytest.mark.parametrize(("claimed_by", "renewed"), [("self", True), ("another", False)])
async def test_settling_a_request_canceled_while_queued_keeps_its_key_as_long_as_the_canceled_record(
        base, http, redis_client, target, claimed_by, renewed):
    """The cancel of a queued request cannot name its key (the key's grammar is the producer's): the replay, which
    settles the canceled entry, gives the key the canceled record's lifetime, unless another request holds it."""
    envelope = envelope_for(target, headers=[("Idempotency-Key", '"withdrawn"')])
    host = urlsplit(envelope.url).netloc
    key = idempotency.key_name("async", host, "withdrawn")
    await redis_client.set(key, f"ab 1-0 {envelope.id if claimed_by == 'self' else 'SomeOtherRequest'}")
    entry_id = await queue(redis_client, envelope)
    canceled = Record(state=CANCELED, host=host, attempts=0, updated_at=1.0)
    await redis_client.set(record_key("async", envelope.id, host), canceled.to_json(), px=600_000)
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc) == (200, {"id": envelope.id, "state": CANCELED, "duplicate": True})
    assert target.seen == []
    if renewed:
        record_ttl = await redis_client.pttl(record_key("async", envelope.id, host))
        assert 590_000 < record_ttl and await redis_client.pttl(key) == pytest.approx(record_ttl, abs=2000)
    else:
        assert await redis_client.pttl(key) == -1


async def replayed_and_announced(http, base, redis_client, envelope: Envelope) -> tuple[str, bytes]:
    """Queue and replay ``envelope``: its final state, and the first record key announced to waiting producers."""
    entry_id = await queue(redis_client, envelope)
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe("async:finished")
        state = (await post(http, base, *binary_event(entry_id, envelope.to_stream_fields())))[1]["state"]
        message = None
        while message is None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    return state, message["data"]


@pytest.mark.parametrize("prefer", ["respond-async, wait=5", "wait=10"])
async def test_the_replay_announces_the_outcome_of_a_request_whose_client_waits(base, http, redis_client, target,
                                                                                prefer):
    envelope = envelope_for(target, headers=[("Prefer", prefer)])
    assert await replayed_and_announced(http, base, redis_client, envelope) == (
        SUCCEEDED, record_key("async", envelope.id, urlsplit(envelope.url).netloc).encode())


@pytest.mark.parametrize("status", [200, 500])
async def test_an_outcome_no_client_can_wait_for_wakes_no_producer(base, http, redis_client, target, status):
    """Without ``Prefer: wait`` or an ``Idempotency-Key`` nobody waits: announcing it woke every producer."""
    target.statuses = [status]
    plain, waited = envelope_for(target, path="/plain"), envelope_for(target, headers=[("Prefer", "wait=5")])
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe("async:finished")
        for envelope in (plain, waited):
            entry_id = await queue(redis_client, envelope)
            await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
        announced, deadline = [], time.monotonic() + 2
        while time.monotonic() < deadline and len(announced) < 2:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                announced.append(message["data"])
    host = urlsplit(plain.url).netloc
    assert announced == [record_key("async", waited.id, host).encode()]


@pytest.mark.parametrize("statuses", [[200], [500]])
@pytest.mark.parametrize("px", [None, 5000], ids=["pending", "taken-by-an-older-producer"])
async def test_the_final_outcome_renews_the_idempotency_key_for_the_results_retention(base, http, redis_client,
                                                                                       target, statuses, px):
    envelope = envelope_for(target, headers=[("Idempotency-Key", '"order-9"')])
    host = urlsplit(envelope.url).netloc
    key = idempotency.key_name("async", host, "order-9")
    await redis_client.set(key, "fingerprint 1-0 id", px=px)  # as the producer left it: no expiry, or nearly expired
    target.statuses = statuses
    entry_id = await queue(redis_client, envelope)
    await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert await redis_client.pttl(key) > 5000
    record_ttl = await redis_client.pttl(record_key("async", envelope.id, host))
    assert await redis_client.pttl(key) == pytest.approx(record_ttl, abs=2000)


async def test_a_request_that_expires_is_announced_and_keeps_its_key_for_the_services_retention(
        base, http, redis_client, target):
    envelope = dataclasses.replace(envelope_for(target, headers=[("Idempotency-Key", "late")]),
                                   accepted_at=time.time() - 60, policy="v1;age=10;keep=600")
    host = urlsplit(envelope.url).netloc
    key = idempotency.key_name("async", host, "late")
    await redis_client.set(key, "fingerprint 1-0 id")  # pending: no expiry
    assert await replayed_and_announced(http, base, redis_client, envelope) == (
        EXPIRED, record_key("async", envelope.id, host).encode()), "a waiting client hears of it"
    assert target.seen == []
    record = Record.from_json(await redis_client.get(record_key("async", envelope.id, host)))
    assert record.state == EXPIRED and record.idempotency_key == key
    assert 590_000 < await redis_client.pttl(key) <= 600_000, "the key lasts as long as the Service keeps the result"


async def test_a_canceled_request_past_its_max_age_stays_canceled(base, http, redis_client, target):
    envelope = dataclasses.replace(envelope_for(target), accepted_at=time.time() - 60, policy="v1;age=10")
    host = urlsplit(envelope.url).netloc
    entry_id = await queue(redis_client, envelope)
    canceled = Record(state=CANCELED, host=host, attempts=0, updated_at=1.0)
    await redis_client.set(record_key("async", envelope.id, host), canceled.to_json())
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc) == (200, {"id": envelope.id, "state": CANCELED, "duplicate": True})
    assert Record.from_json(await redis_client.get(record_key("async", envelope.id, host))).state == CANCELED
    assert target.seen == []


async def test_redelivered_event_of_an_attempt_that_scheduled_a_retry_is_not_replayed(base, http, redis_client,
                                                                                       target):
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    event = binary_event(entry_id, envelope.to_stream_fields())
    target.statuses = [503]
    assert (await post(http, base, *event))[1]["state"] == RETRYING
    status, doc = await post(http, base, *event)
    assert (status, doc["duplicate"], doc["state"]) == (200, True, RETRYING)
    assert len(target.seen) == 1


async def test_redis_failing_while_the_outcome_is_recorded_answers_503(base, http, redis_client, redis_server, target):
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    target.on_request = redis_server.kill  # Redis goes down while the Service works
    try:
        status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    finally:
        redis_server.start()
    assert status == 503 and "unavailable" in doc["error"]
    assert len(target.seen) == 1
    # redelivered once Redis is back: replayed and recorded
    target.on_request = None
    status, doc = await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    assert (status, doc["state"]) == (200, SUCCEEDED)


async def test_redis_down_before_the_replay_answers_503_without_replaying(base, http, redis_client, redis_server,
                                                                          target):
    envelope = envelope_for(target)
    redis_server.kill()
    try:
        status, doc = await post(http, base, *binary_event("1-0", envelope.to_stream_fields()))
    finally:
        redis_server.start()
    assert status == 503 and target.seen == []


# --- probes


async def test_probes_and_metrics_live_beside_the_event_route(base, http, redis_client, target):
    envelope = envelope_for(target)
    entry_id = await queue(redis_client, envelope)
    await post(http, base, *binary_event(entry_id, envelope.to_stream_fields()))
    async with http.get(base + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(base + "/readyz") as resp:
        assert resp.status == 200
    async with http.get(base + "/metrics") as resp:
        text = await resp.text()
    assert 'async_consumer_replays_total{outcome="succeeded"} 1.0' in text
    assert "async_consumer_replay_seconds_count 1.0" in text
    assert "async_consumer_dead_lettered_total 0.0" in text
    async with http.get(base + "/") as resp:
        assert resp.status == 405


async def test_readyz_fails_while_redis_is_down(base, http, redis_server):
    redis_server.kill()
    try:
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503
    finally:
        redis_server.start()
