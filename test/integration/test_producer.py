"""The producer against a real redis-server, through real HTTP on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from async_component.dataplane import idempotency, producer
from async_component.dataplane.envelope import Envelope
from async_component.local.ports import free_port
from async_component.dataplane.records import (
    CANCELED, EXPIRED, FAILED, QUEUED, RETRYING, RUNNING, SUCCEEDED, Record, RecordedResponse, record_key,
)
from async_component.protocol import STATUS_PATH_PREFIX
from async_component.settings import ProducerSettings

HOST = "sleep.default.svc.cluster.local"
ASYNC = {"Async-Original-Host": HOST}


def settings_for(redis_url: str, **changes) -> ProducerSettings:
    return dataclasses.replace(ProducerSettings(redis_url=redis_url, port=free_port(), host="127.0.0.1"), **changes)


async def start_producer(settings: ProducerSettings):
    server = producer.make_server(settings)
    await server.start(settings.host, settings.port)
    return server


@contextlib.asynccontextmanager
async def producer_with(redis_url: str, **changes):
    """A producer with settings changed from the defaults; yields its base URL."""
    settings = settings_for(redis_url, **changes)
    server = await start_producer(settings)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        await server.close()


@pytest.fixture
async def settings(redis_url):
    return settings_for(redis_url)


@pytest.fixture
async def base(settings):
    server = await start_producer(settings)
    yield f"http://127.0.0.1:{settings.port}"
    await server.close()



QUEUE = "async:{default/sleep}:q"
"""The stream of HOST's Service."""


async def stream_entries(redis_client, stream=QUEUE):
    return await redis_client.xrange(stream)


async def entry_count(redis_client, stream=QUEUE):
    return await redis_client.xlen(stream)


# --- queueing


async def test_enqueue_stores_the_request_exactly_and_answers_202(base, http, redis_client):
    body = os.urandom(4096) + b"\xff\xfe"  # not UTF-8
    headers = [
        ("Async-Original-Host", HOST), ("Prefer", "wait=0, respond-async; x=1, handling=lenient"),
        ("X-Tag", "one"), ("X-Tag", "two"), ("Content-Type", "application/octet-stream"),
        ("Connection", "keep-alive, X-Hop"), ("X-Hop", "dropped"),
    ]
    async with http.put(f"{base}/items/a%2Fb?q=1&q=2&z=%20", data=body, headers=headers) as resp:
        assert resp.status == 202
        doc = await resp.json()
        request_id = resp.headers["Async-Request-Id"]
        location = resp.headers["Location"]
    [(entry_id, fields)] = await stream_entries(redis_client)
    assert location == f"{STATUS_PATH_PREFIX}{entry_id.decode()}.{request_id}"
    assert doc == {"id": request_id, "state": "queued", "accepted_at": doc["accepted_at"], "status_url": location}
    assert resp.headers["Preference-Applied"] == "respond-async"
    assert resp.headers["Retry-After"] == "1"

    envelope = Envelope.from_stream_fields(fields)
    assert envelope.id == request_id
    assert envelope.method == "PUT"
    assert envelope.url == f"http://{HOST}/items/a%2Fb?q=1&q=2&z=%20"
    assert envelope.body == body
    names = [name.lower() for name, _ in envelope.headers]
    assert [v for n, v in envelope.headers if n.lower() == "x-tag"] == ["one", "two"]
    assert ("Prefer", "wait=0, handling=lenient") in envelope.headers
    for gone in ("host", "content-length", "async-original-host", "connection", "x-hop"):
        assert gone not in names
    assert ("Content-Type", "application/octet-stream") in envelope.headers

    async with http.get(base + location, headers=ASYNC) as resp:
        assert resp.status == 202 and resp.headers["Async-Request-State"] == QUEUED
        status = await resp.json()
    assert (status["id"], status["state"], status["attempts"]) == (request_id, QUEUED, 0)
    assert status["updated_at"] == status["accepted_at"] == envelope.accepted_at == doc["accepted_at"]
    assert status["status_url"] == location
    # the entry is all a queued request costs, besides its Service's place in the active set
    assert sorted(await redis_client.keys("async*")) == [b"async:active", b"async:wake", QUEUE.encode()]


async def test_prefer_with_only_respond_async_is_dropped_and_any_path_is_queued(base, http, redis_client):
    for path in ("/metrics", "/healthz", "/"):
        async with http.get(base + path, headers={**ASYNC, "Prefer": "respond-async"}) as resp:
            assert resp.status == 202, path
    entries = await stream_entries(redis_client)
    urls = [Envelope.from_stream_fields(fields).url for _, fields in entries]
    assert urls == [f"http://{HOST}/metrics", f"http://{HOST}/healthz", f"http://{HOST}/"]
    for _, fields in entries:
        assert all(name.lower() != "prefer" for name, _ in Envelope.from_stream_fields(fields).headers)


@pytest.mark.parametrize("path", [f"{STATUS_PATH_PREFIX}abc", f"{STATUS_PATH_PREFIX}1-0.abc?x=1",
                                  "/a/../.well-known/async-requests/abc", "//.well-known//async-requests/abc",
                                  "/%2Ewell-known/async-requests/abc"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "OPTIONS", "DELETE"])
async def test_other_methods_on_the_status_path_get_405_and_are_never_queued(base, http, redis_client, path, method):
    """Queued, such a request's replay would come back to the producer and be queued again, without end."""
    async with http.request(method, URL(base + path, encoded=True), data=b"x", headers=ASYNC) as resp:
        if method == "DELETE":  # cancels; there is no such request
            assert resp.status == 404
            assert await entry_count(redis_client) == 0
            return
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD, DELETE"
        assert "not allowed" in (await resp.json())["error"]
    assert await entry_count(redis_client) == 0
    async with http.get(base + "/metrics") as resp:
        assert 'async_producer_rejected_total{reason="method_not_allowed"} 1.0' in await resp.text()


async def test_a_replay_routed_back_to_the_producer_gets_508_and_is_not_queued(base, http, redis_client):
    """A network layer that sends a replay here instead of to its Service would otherwise loop without end."""
    headers = {**ASYNC, "Prefer": "respond-sync, return=minimal", "Async-Replay": "true"}
    async with http.post(f"{base}/work", data=b"x", headers=headers) as resp:
        assert resp.status == 508
        assert "Async-Replay" in (await resp.json())["error"]
    assert await entry_count(redis_client) == 0


async def test_the_routes_policy_is_recorded_with_the_request_and_not_replayed(base, http, redis_client):
    async with http.post(f"{base}/work", data=b"x", headers={**ASYNC, "Async-Policy": "v1;retry=5;age=2"}) as resp:
        assert resp.status == 202
    ((_, fields),) = await stream_entries(redis_client)
    envelope = Envelope.from_stream_fields(fields)
    assert envelope.policy == "v1;retry=5;age=2"
    assert all(name.lower() != "async-policy" for name, _ in envelope.headers)


@pytest.mark.parametrize("values", [["v2;retry=5"], ["v1;retry=many"], ["v1", "v1;retry=5"]])
async def test_a_policy_the_producer_cannot_read_is_refused_and_not_queued(base, http, redis_client, values):
    headers = [*ASYNC.items(), *(("Async-Policy", value) for value in values)]
    async with http.post(f"{base}/work", data=b"x", headers=headers) as resp:
        assert resp.status == 400
        assert "Async-Policy" in (await resp.json())["error"]
    assert await entry_count(redis_client) == 0


async def test_paths_near_the_status_prefix_are_queued(base, http, redis_client):
    for path in ("/.well-known/async-requests", "/.well-known/other/x", "/x/.well-known/async-requests/a"):
        async with http.post(URL(base + path, encoded=True), data=b"x", headers=ASYNC) as resp:
            assert resp.status == 202, path
    assert await entry_count(redis_client) == 3


async def test_target_with_an_allowed_port_is_kept_in_the_url(redis_url, http, redis_client):
    server = await start_producer(settings := settings_for(redis_url, allowed_ports=(8080,)))
    try:
        async with http.post(f"http://127.0.0.1:{settings.port}/p",
                             headers={"Async-Original-Host": HOST.upper() + ":8080"}) as resp:
            assert resp.status == 202
    finally:
        await server.close()
    [(_, fields)] = await stream_entries(redis_client)
    assert Envelope.from_stream_fields(fields).url == f"http://{HOST}:8080/p"


@pytest.mark.parametrize("host, status", [
    (f"{HOST}:6379", 403), (f"{HOST}:8080", 403), (f"{HOST}:\uff16\uff13\uff17\uff19", 400),
    (f"{HOST}:\u0666\u0663\u0667\u0669", 400),
])
async def test_a_port_other_than_the_services_is_refused_by_default(base, http, redis_client, host, status):
    """An open relay to any port of any Service (Redis's, say) otherwise; other scripts' digits read as ports too."""
    async with http.post(f"{base}/p", data=b"x", headers={"Async-Original-Host": host}) as resp:
        assert resp.status == status
        assert "port" in (await resp.json())["error"]
    assert await entry_count(redis_client) == 0


@pytest.mark.parametrize("host", ["evil.example.com", "svc.cluster.local", "x.svc.cluster.local.evil.com"])
async def test_disallowed_host_is_forbidden_and_nothing_is_written(base, http, redis_client, host):
    async with http.post(f"{base}/p", data=b"x", headers={"Async-Original-Host": host}) as resp:
        assert resp.status == 403
        assert "not allowed" in (await resp.json())["error"]
    assert await redis_client.dbsize() == 0
    async with http.get(f"{base}/metrics") as resp:
        assert 'async_producer_rejected_total{reason="forbidden_host"} 1.0' in await resp.text()


@pytest.mark.parametrize("host", ["bad host", "a..b", "-a.svc.cluster.local", "a.svc.cluster.local:99999", "a.svc.cluster.local:x", ""])
async def test_malformed_host_is_a_bad_request(base, http, redis_client, host):
    async with http.post(f"{base}/p", headers={"Async-Original-Host": host}) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()
    assert await redis_client.dbsize() == 0


async def test_exact_and_suffix_entries(redis_url, http, redis_client):
    settings = settings_for(redis_url, allowed_hosts=("api.example.com", ".apps.internal"))
    server = await start_producer(settings)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        expected = {
            "api.example.com": 202, "API.example.com": 202, "x.api.example.com": 403,
            "a.apps.internal": 202, "a.b.apps.internal": 202, "apps.internal": 403,
            "xapps.internal": 403, "sleep.default.svc.cluster.local": 403,
        }
        for host, status in expected.items():
            async with http.post(f"{base}/", headers={"Async-Original-Host": host}) as resp:
                assert resp.status == status, host
        queues = [key for key in await redis_client.keys("async:*:q")]
        assert sorted(queues) == [b"async:{a.apps.internal}:q", b"async:{a.b.apps.internal}:q",
                                  b"async:{api.example.com}:q"]  # hosts that are not a Service's queue apart
        assert sum([await redis_client.xlen(key) for key in queues]) == 4
    finally:
        await server.close()


async def test_requests_without_the_header_only_reach_the_probes(base, http):
    for method, path in (("GET", "/"), ("POST", "/items"), ("POST", "/healthz"), ("GET", STATUS_PATH_PREFIX + "x")):
        async with http.request(method, base + path) as resp:
            assert resp.status == 400, (method, path)
            assert "missing Async-Original-Host" in (await resp.json())["error"]


async def test_probes_and_metrics(base, http, redis_server):
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200
    async with http.post(f"{base}/x", headers=ASYNC) as resp:
        assert resp.status == 202
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    assert "async_producer_accepted_total 1.0" in text
    assert "async_producer_batch_seconds_count 1.0" in text
    assert "async_producer_batch_size_count 1.0" in text
    redis_server.kill()
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 503
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200


# --- body limit


async def test_content_length_over_the_limit_is_refused_with_413(base, http, redis_client):
    body = b"a" * 7_000_000
    async with http.post(f"{base}/upload", data=body, headers=ASYNC) as resp:
        assert resp.status == 413
        assert "larger than" in (await resp.json())["error"]
    assert await entry_count(redis_client) == 0
    # the connection stays usable
    async with http.post(f"{base}/small", data=b"ok", headers=ASYNC) as resp:
        assert resp.status == 202
    assert await entry_count(redis_client) == 1


async def test_chunked_body_over_the_limit_is_refused_with_413(redis_url, http, redis_client):
    settings = settings_for(redis_url, request_size_limit=100_000)
    server = await start_producer(settings)
    try:
        async def chunks():
            for _ in range(20):
                yield b"b" * 10_000

        async with http.post(f"http://127.0.0.1:{settings.port}/up", data=chunks(), headers=ASYNC) as resp:
            assert resp.status == 413
        async with http.get(f"http://127.0.0.1:{settings.port}/metrics") as resp:
            assert 'async_producer_rejected_total{reason="too_large"} 1.0' in await resp.text()
        assert await entry_count(redis_client) == 0

        async def small():
            yield b"c" * 50_000
            yield b"c" * 50_000

        async with http.post(f"http://127.0.0.1:{settings.port}/up", data=small(), headers=ASYNC) as resp:
            assert resp.status == 202
        [(_, fields)] = await stream_entries(redis_client)
        assert Envelope.from_stream_fields(fields).body == b"c" * 100_000
    finally:
        await server.close()


async def test_expect_continue_with_oversized_length_is_refused_before_the_body(base, settings):
    reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
    writer.write(
        f"POST /big HTTP/1.1\r\nHost: x\r\nAsync-Original-Host: {HOST}\r\n"
        "Content-Length: 7000000\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")


# --- Redis failures


async def test_redis_down_answers_503_then_recovers(base, http, redis_server, redis_client):
    redis_server.kill()
    async with http.post(f"{base}/x", data=b"1", headers=ASYNC) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert "unavailable" in (await resp.json())["error"]
    async with http.get(f"{base}{STATUS_PATH_PREFIX}abc", headers=ASYNC) as resp:
        assert resp.status == 503
    redis_server.start()
    deadline = time.monotonic() + 10
    while True:
        async with http.post(f"{base}/x", data=b"2", headers=ASYNC) as resp:
            if resp.status == 202 or time.monotonic() > deadline:
                break
        await asyncio.sleep(0.05)
    assert resp.status == 202
    [(_, fields)] = await stream_entries(redis_client)
    assert Envelope.from_stream_fields(fields).body == b"2"
    async with http.get(f"{base}/metrics") as resp:
        assert 'async_producer_rejected_total{reason="redis_unavailable"}' in await resp.text()


async def test_redis_failures_are_logged_once_per_interval(base, http, redis_server, caplog):
    redis_server.kill()
    with caplog.at_level("WARNING", logger="async_component.dataplane.producer"):
        for _ in range(5):
            async with http.post(f"{base}/x", headers=ASYNC) as resp:
                assert resp.status == 503
    warnings = [r for r in caplog.records if r.name == "async_component.dataplane.producer" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "Redis unavailable while queueing a request" in warnings[0].getMessage()


async def test_error_reply_answers_503(base, http, redis_client):
    await redis_client.set(QUEUE, "not a stream")
    async with http.post(f"{base}/x", headers=ASYNC) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]


# --- batching


async def test_concurrent_requests_get_distinct_ids_and_all_entries(base, http, redis_client):
    async def one(n: int):
        async with http.post(f"{base}/n/{n}", data=str(n).encode(), headers=ASYNC) as resp:
            assert resp.status == 202
            return resp.headers["Async-Request-Id"], resp.headers["Location"]

    accepted = await asyncio.gather(*(one(n) for n in range(200)))
    ids = [request_id for request_id, _ in accepted]
    assert len(set(ids)) == 200
    entries = await stream_entries(redis_client)
    by_id = {e.id: e for e in (Envelope.from_stream_fields(f) for _, f in entries)}
    assert set(by_id) == set(ids)
    for n, request_id in enumerate(ids):
        assert by_id[request_id].body == str(n).encode()
        assert by_id[request_id].url.endswith(f"/n/{n}")
    for request_id, location in accepted:
        async with http.get(base + location, headers=ASYNC) as resp:
            assert resp.status == 202 and (await resp.json())["id"] == request_id


async def script_calls(redis_client) -> int:
    """Script calls Redis ran (a first call answered NOSCRIPT, which loads the script, is not one)."""
    evalsha = (await redis_client.info("commandstats")).get("cmdstat_evalsha", {})
    return evalsha.get("calls", 0) - evalsha.get("failed_calls", 0)


async def test_a_burst_of_large_bodies_is_written_in_short_calls_and_every_one_accepted(base, http, redis_client):
    """Twelve 3 MB bodies arrive while Redis holds writes back: all twelve wait for one batch. Sent in one script
    call, hundreds of such bodies kept Redis busy past its clients' socket timeout, and requests Redis had queued
    were answered 503; in calls of one body each, every request gets its 202 and no call carries more than 4 MiB."""
    bodies = [bytes([65 + n]) * 3_000_000 for n in range(12)]
    await redis_client.execute_command("CLIENT", "PAUSE", 500, "WRITE")  # the first batch waits; the rest pile up
    before = await script_calls(redis_client)

    async def one(body: bytes):
        async with http.post(f"{base}/big", data=body, headers=ASYNC) as resp:
            return resp.status

    assert await asyncio.gather(*(one(body) for body in bodies)) == [202] * 12
    assert await script_calls(redis_client) - before == 12  # one request a call
    queued = sorted(Envelope.from_stream_fields(fields).body for _, fields in await stream_entries(redis_client))
    assert queued == bodies


async def test_bodies_past_the_memory_bound_get_503_with_retry_after_and_are_counted(redis_url, http, redis_client):
    async with producer_with(redis_url, body_memory_limit=5_000_000) as base:
        await redis_client.execute_command("CLIENT", "PAUSE", 1000, "WRITE")  # the first request waits for Redis
        first = asyncio.ensure_future(http.post(f"{base}/a", data=b"a" * 3_000_000, headers=ASYNC))
        await asyncio.sleep(0.3)
        async with http.post(f"{base}/b", data=b"b" * 3_000_000, headers=ASYNC) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert "BODY_MEMORY_LIMIT 5000000" in (await resp.json())["error"]
        async with await first as resp:
            assert resp.status == 202
        async with http.post(f"{base}/c", data=b"c" * 3_000_000, headers=ASYNC) as resp:
            assert resp.status == 202  # the first was answered: its bytes are no longer held
        async with http.get(f"{base}/metrics") as resp:
            assert 'async_producer_rejected_total{reason="body_memory"} 1.0' in await resp.text()
    assert [Envelope.from_stream_fields(f).body[:1] for _, f in await stream_entries(redis_client)] == [b"a", b"c"]


# --- status


async def put_record(redis_client, request_id: str, record: Record) -> None:
    await redis_client.set(record_key("async", request_id, HOST), record.to_json())


async def test_status_of_unknown_request_is_404(base, http):
    for request_id in ("unknown", "bad%2Fid", ""):
        async with http.get(f"{base}{STATUS_PATH_PREFIX}{request_id}", headers=ASYNC) as resp:
            assert resp.status == 404
            assert "error" in await resp.json()
    async with http.get(f"{base}{STATUS_PATH_PREFIX}{'a' * 6000}", headers=ASYNC) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == f"no request '{'a' * 100}...' for this host"  # not 6 KB of it back


async def test_status_after_enqueue_is_pending_and_hidden_from_other_hosts(base, http):
    async with http.post(f"{base}/x", headers=ASYNC) as resp:
        location = resp.headers["Location"]
        request_id = resp.headers["Async-Request-Id"]
    async with http.get(base + location, headers=ASYNC) as resp:
        assert resp.status == 202
        assert resp.headers["Async-Request-State"] == QUEUED
        doc = await resp.json()
    assert doc["id"] == request_id and doc["state"] == QUEUED and doc["attempts"] == 0
    assert doc["updated_at"] > 0
    async with http.get(base + location, headers={"Async-Original-Host": "other.default.svc.cluster.local"}) as resp:
        assert resp.status == 404


async def test_status_needs_the_request_id_and_follows_the_record(base, http, redis_client):
    async with http.post(f"{base}/x", headers=ASYNC) as resp:
        location = resp.headers["Location"]
        request_id = resp.headers["Async-Request-Id"]
    async with http.post(f"{base}/y", headers=ASYNC) as resp:
        other_id = resp.headers["Async-Request-Id"]
    entry_id = location[len(STATUS_PATH_PREFIX):].partition(".")[0]
    for path in (entry_id, f"{entry_id}.", f"{entry_id}.{other_id}", request_id, f"{entry_id}.{request_id}x",
                 f"x{entry_id}.{request_id}"):
        async with http.get(f"{base}{STATUS_PATH_PREFIX}{path}", headers=ASYNC) as resp:
            assert resp.status == 404, path
    # the consumer's records answer through both forms, and after the entry is gone
    await put_record(redis_client, request_id, Record(state=RUNNING, host=HOST, attempts=1, updated_at=5.0))
    await redis_client.xdel(QUEUE, entry_id)
    for path in (location, STATUS_PATH_PREFIX + request_id):
        async with http.get(base + path, headers=ASYNC) as resp:
            assert resp.status == 202 and resp.headers["Async-Request-State"] == RUNNING, path
    await redis_client.delete(record_key("async", request_id, HOST))
    async with http.get(base + location, headers=ASYNC) as resp:
        assert resp.status == 404


async def test_in_the_single_stream_an_entry_older_than_the_status_retention_says_nothing(
        redis_url, http, redis_client):
    """A source that keeps delivered entries (RedisStreamSource) must not make them queued again."""
    settings = settings_for(redis_url, status_retention=0.2, queue_mode="single-stream")
    server = await start_producer(settings)
    try:
        base = f"http://127.0.0.1:{settings.port}"
        async with http.post(f"{base}/x", headers=ASYNC) as resp:
            location = resp.headers["Location"]
        async with http.get(base + location, headers=ASYNC) as resp:
            assert resp.status == 202
        await asyncio.sleep(0.3)
        async with http.get(base + location, headers=ASYNC) as resp:
            assert resp.status == 404
        assert await entry_count(redis_client, "async-requests") == 1
        assert await entry_count(redis_client) == 0  # the single stream only
    finally:
        await server.close()


async def test_a_request_queued_longer_than_the_status_retention_still_reads_queued(redis_url, http, redis_client):
    settings = settings_for(redis_url, status_retention=0.2)
    server = await start_producer(settings)
    try:
        base = f"http://127.0.0.1:{settings.port}"
        async with http.post(f"{base}/x", headers=ASYNC) as resp:
            location = resp.headers["Location"]
        await asyncio.sleep(0.5)
        async with http.get(base + location, headers=ASYNC) as resp:
            assert resp.status == 202
            assert (await resp.json())["state"] == QUEUED
    finally:
        await server.close()


async def test_a_full_queue_answers_503_and_queues_nothing_while_another_service_gets_202(
        redis_url, http, redis_client):
    settings = settings_for(redis_url, max_queued_per_service=2)
    server = await start_producer(settings)
    other = {"Async-Original-Host": "other.default.svc.cluster.local"}
    try:
        base = f"http://127.0.0.1:{settings.port}"
        for _ in range(2):
            async with http.post(f"{base}/x", headers=ASYNC) as resp:
                assert resp.status == 202
        async with http.post(f"{base}/x", headers=ASYNC) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "10"
            message = (await resp.json())["error"]
        assert "queue of Service default/sleep is full" in message and "nothing was queued" in message
        async with http.post(f"{base}/x", headers=other) as resp:
            assert resp.status == 202
        assert await entry_count(redis_client) == 2
        async with http.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
        assert 'async_producer_queue_full_total{namespace="default",service="sleep"} 1.0' in metrics
        assert 'async_producer_rejected_total{reason="queue_full"} 1.0' in metrics
    finally:
        await server.close()


async def test_a_services_max_queued_policy_is_its_queues_cap(base, http, redis_client):
    capped = {**ASYNC, "Async-Policy": "v1;queued=2"}
    for _ in range(2):
        async with http.post(f"{base}/x", headers=capped) as resp:
            assert resp.status == 202
    async with http.post(f"{base}/x", headers=capped) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "10"
        assert "at most 2)" in (await resp.json())["error"]
    async with http.post(f"{base}/x", headers={**ASYNC, "Async-Policy": "v1;queued=5"}) as resp:
        assert resp.status == 202, "the cap follows the policy in force"
    assert await entry_count(redis_client) == 3


async def test_a_request_queued_in_the_single_stream_before_an_upgrade_still_reads_queued(
        redis_url, http, redis_client):
    envelope = Envelope.new("POST", f"http://{HOST}/old", [], b"")
    entry_id = (await redis_client.xadd("async-requests", envelope.to_stream_fields())).decode()
    settings = settings_for(redis_url)
    server = await start_producer(settings)
    try:
        base = f"http://127.0.0.1:{settings.port}"
        async with http.get(f"{base}{STATUS_PATH_PREFIX}{entry_id}.{envelope.id}", headers=ASYNC) as resp:
            assert resp.status == 202 and (await resp.json())["state"] == QUEUED
    finally:
        await server.close()


async def test_status_retrying_reports_next_attempt(base, http, redis_client):
    await put_record(redis_client, "r1", Record(state=RETRYING, host=HOST, attempts=2, updated_at=10.0,
                                                error="503 from the Service", next_attempt_at=42.5,
                                                accepted_at=9.0))
    await put_record(redis_client, "r2", Record(state=RUNNING, host=HOST, attempts=1, updated_at=11.0))
    async with http.get(f"{base}{STATUS_PATH_PREFIX}r1", headers=ASYNC) as resp:
        assert resp.status == 202 and resp.headers["Async-Request-State"] == RETRYING
        doc = await resp.json()
    assert doc["attempts"] == 2 and doc["next_attempt_at"] == 42.5 and doc["updated_at"] == 10.0
    assert doc["accepted_at"] == 9.0 and doc["status_url"] == f"{STATUS_PATH_PREFIX}r1"
    async with http.get(f"{base}{STATUS_PATH_PREFIX}r2", headers=ASYNC) as resp:
        assert resp.status == 202 and resp.headers["Async-Request-State"] == RUNNING
        assert resp.headers["Location"] == f"{STATUS_PATH_PREFIX}r2"
        assert "next_attempt_at" not in await resp.json()


async def test_every_202_suggests_the_polling_interval(redis_url, http, redis_client):
    async with producer_with(redis_url, poll_interval=7) as base:
        async with http.post(f"{base}/x", headers=ASYNC) as resp:
            assert resp.status == 202 and resp.headers["Retry-After"] == "7"
            assert resp.headers["Preference-Applied"] == "respond-async"
            location = resp.headers["Location"]
        async with http.get(base + location, headers=ASYNC) as resp:
            assert resp.status == 202 and resp.headers["Retry-After"] == "7"
            assert resp.headers["Location"] == location
            assert "Preference-Applied" not in resp.headers


async def test_status_replays_the_recorded_response(base, http, redis_client):
    body = os.urandom(1000)
    response = RecordedResponse(status=201, headers=(("Content-Type", "image/png"), ("Set-Cookie", "a=1"),
                                                     ("Set-Cookie", "b=2"), ("Transfer-Encoding", "chunked")), body=body)
    await put_record(redis_client, "done", Record(state=SUCCEEDED, host=HOST, attempts=1, response=response))
    await put_record(redis_client, "bad", Record(state=FAILED, host=HOST, attempts=3,
                                                 response=RecordedResponse(500, (("X-Err", "1"),), b"boom")))
    url = f"{base}{STATUS_PATH_PREFIX}done"
    async with http.get(url, headers=ASYNC) as resp:
        assert resp.status == 201
        assert resp.headers["Async-Request-State"] == SUCCEEDED
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert await resp.read() == body
    async with http.head(url, headers=ASYNC) as resp:
        assert resp.status == 201 and resp.headers["Async-Request-State"] == SUCCEEDED
        assert await resp.read() == b""
    async with http.get(f"{base}{STATUS_PATH_PREFIX}bad", headers=ASYNC) as resp:
        assert resp.status == 500 and resp.headers["Async-Request-State"] == FAILED
        assert resp.headers["X-Err"] == "1" and await resp.read() == b"boom"


async def test_status_failed_without_response_is_502(base, http, redis_client):
    await put_record(redis_client, "f", Record(state=FAILED, host=HOST, attempts=3, error="connection refused"))
    async with http.get(f"{base}{STATUS_PATH_PREFIX}f", headers=ASYNC) as resp:
        assert resp.status == 502
        assert resp.headers["Async-Request-State"] == FAILED
        assert (await resp.json())["error"] == "connection refused"
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    assert 'async_producer_status_reads_total{result="failed"} 1.0' in text


# --- the process


def producer_command(port: int, redis_url: str, **env: str):
    environ = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "REDIS_URL": redis_url, **env}
    return [sys.executable, "-m", "async_component", "producer"], environ


async def wait_ready(http, base: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            async with http.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the producer did not become ready")


async def test_two_workers_share_the_port_and_stop_on_sigterm(redis_url, http, redis_client):
    port = free_port()
    command, environ = producer_command(port, redis_url, WORKERS="2")
    process = subprocess.Popen(command, env=environ, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(http, base, process)
        for n in range(20):
            async with aiohttp.ClientSession() as fresh:  # new connections spread over the workers
                async with fresh.post(f"{base}/w/{n}", headers=ASYNC) as resp:
                    assert resp.status == 202
        assert await entry_count(redis_client) == 20
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                        text=True).stdout.split()]
        assert len(children) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert "2 worker(s)" in process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bad_setting_is_a_one_line_error_with_status_2(redis_url):
    for env in ({"REQUEST_SIZE_LIMIT": "abc"}, {"ALLOWED_HOSTS": "*"}):
        command, environ = producer_command(free_port(), redis_url, **env)
        result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("async-component producer: error:"), result.stderr
        assert next(iter(env)) in lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_a_one_line_error(redis_url, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        command, environ = producer_command(taken.getsockname()[1], redis_url, WORKERS=workers)
        result = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot listen on 127.0.0.1" in result.stderr


async def test_a_client_trickling_its_headers_is_cut_off_after_header_timeout(redis_url):
    settings = settings_for(redis_url, header_timeout=0.3)
    server = await start_producer(settings)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nAsync-Original-Host: " + HOST.encode() + b"\r\n")
        started = time.monotonic()
        answer = asyncio.create_task(reader.read())
        while not answer.done() and time.monotonic() - started < 5:
            writer.write(b"X")  # one byte of a header name at a time: each restarts the stall timeout
            await asyncio.sleep(0.05)
        assert (await answer).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 2
        writer.close()
    finally:
        await server.close()


# --- Prefer: wait=N


async def test_wait_answers_the_recorded_response_once_the_replay_announces_it(base, http, redis_client):
    async def finish_it():
        while not (entries := await stream_entries(redis_client)):
            await asyncio.sleep(0.02)
        request_id = Envelope.from_stream_fields(entries[0][1]).id
        response = RecordedResponse(status=201, headers=(("X-App", "yes"),), body=b"made")
        await put_record(redis_client, request_id, Record(state=SUCCEEDED, host=HOST, attempts=1, updated_at=1.0,
                                                          response=response))
        await redis_client.publish("async:finished", record_key("async", request_id, HOST))

    finisher = asyncio.create_task(finish_it())
    started = time.monotonic()
    async with http.post(f"{base}/x", headers={**ASYNC, "Prefer": "respond-async, wait=20"}) as resp:
        assert resp.status == 201 and await resp.read() == b"made"
        assert resp.headers["X-App"] == "yes" and resp.headers["Async-Request-State"] == SUCCEEDED
        assert resp.headers["Async-Request-Id"]
    assert time.monotonic() - started < 10
    await finisher


async def test_wait_is_capped_by_max_wait(redis_url, http):
    async with producer_with(redis_url, max_wait=0.5) as base:
        started = time.monotonic()
        async with http.post(f"{base}/x", headers={**ASYNC, "Prefer": "respond-async, wait=30"}) as resp:
            assert resp.status == 202 and resp.headers["Location"]
        assert 0.4 <= time.monotonic() - started < 5
        async with http.get(base + "/metrics") as resp:
            assert 'async_producer_waits_total{result="accepted"} 1.0' in await resp.text()


async def test_a_stopping_producer_answers_its_waiting_requests_202_and_keeps_them_queued(settings, http,
                                                                                      redis_client):
    server = await start_producer(settings)
    request = asyncio.create_task(http.post(f"http://127.0.0.1:{settings.port}/x",
                                            headers={**ASYNC, "Prefer": "respond-async, wait=30"}))
    while not await stream_entries(redis_client):
        await asyncio.sleep(0.02)
    started = time.monotonic()
    await server.close()
    async with await request as resp:
        assert resp.status == 202 and resp.headers["Location"]
    assert time.monotonic() - started < 5
    assert await entry_count(redis_client) == 1


# --- Idempotency-Key


async def test_the_same_idempotency_key_is_queued_once_and_answered_with_the_first_202(base, http, redis_client):
    headers = {**ASYNC, "Idempotency-Key": '"order-1"'}
    async with http.post(f"{base}/x?a=1", data=b"same", headers=headers) as resp:
        assert resp.status == 202
        first = (resp.headers["Location"], resp.headers["Async-Request-Id"])
    async with http.post(f"{base}/x?a=1", data=b"same", headers={**ASYNC, "Idempotency-Key": "order-1"}) as resp:
        assert resp.status == 202 and resp.headers["Retry-After"] == "1"
        assert (resp.headers["Location"], resp.headers["Async-Request-Id"]) == first
        assert (await resp.json())["state"] == QUEUED
    assert await entry_count(redis_client) == 1
    async with http.get(base + "/metrics") as resp:
        assert "async_producer_idempotent_repeats_total 1.0" in await resp.text()
    # another Service's key of the same name is another key
    other = {"Async-Original-Host": "other.default.svc.cluster.local", "Idempotency-Key": '"order-1"'}
    async with http.post(f"{base}/x?a=1", data=b"same", headers=other) as resp:
        assert resp.status == 202 and resp.headers["Location"] != first[0]
    assert await entry_count(redis_client) == 1 and await entry_count(redis_client, "async:{default/other}:q") == 1


async def test_the_same_key_answers_the_final_response_once_finished(base, http, redis_client):
    headers = {**ASYNC, "Idempotency-Key": "k2"}
    async with http.put(f"{base}/y", data=b"1", headers=headers) as resp:
        request_id = resp.headers["Async-Request-Id"]
    await put_record(redis_client, request_id, Record(state=SUCCEEDED, host=HOST, attempts=1, updated_at=1.0,
                                                      response=RecordedResponse(200, (), b"done")))
    async with http.put(f"{base}/y", data=b"1", headers=headers) as resp:
        assert resp.status == 200 and await resp.read() == b"done"
        assert resp.headers["Async-Request-Id"] == request_id
        assert resp.headers["Async-Request-State"] == SUCCEEDED
    assert await entry_count(redis_client) == 1


@pytest.mark.parametrize("changed", [("PUT", "/x", b"one"), ("POST", "/z", b"one"), ("POST", "/x?q", b"one"),
                                     ("POST", "/x", b"two")])
async def test_the_same_key_with_another_request_is_422(base, http, redis_client, changed):
    headers = {**ASYNC, "Idempotency-Key": '"k3"'}
    async with http.post(f"{base}/x", data=b"one", headers=headers) as resp:
        assert resp.status == 202
    method, path, body = changed
    async with http.request(method, f"{base}{path}", data=body, headers=headers) as resp:
        assert resp.status == 422
        assert "Idempotency-Key" in (await resp.json())["error"]
    assert await entry_count(redis_client) == 1


async def test_a_key_taken_by_the_previous_version_is_still_answered(base, http, redis_client):
    """An upgrade: a key the running producer took (its stored format) must still answer a repeat, never queue it
    again, and still refuse another request."""
    fingerprint = idempotency.fingerprint("POST", "/x?a=1", b"same")
    await redis_client.set("async:{default/sleep}:idem:before", f"{fingerprint} 1700000000000-7 FirstRequestId0000000000")
    async with http.post(f"{base}/x?a=1", data=b"same", headers={**ASYNC, "Idempotency-Key": "before"}) as resp:
        assert resp.status == 202
        assert resp.headers["Async-Request-Id"] == "FirstRequestId0000000000"
        assert resp.headers["Location"] == f"{STATUS_PATH_PREFIX}1700000000000-7.FirstRequestId0000000000"
    async with http.post(f"{base}/x?a=1", data=b"other", headers={**ASYNC, "Idempotency-Key": '"before"'}) as resp:
        assert resp.status == 422
    assert await entry_count(redis_client) == 0


async def test_a_malformed_idempotency_key_is_400_and_nothing_queued(base, http, redis_client):
    for value in ('"open', "two words", '""'):
        async with http.post(f"{base}/x", headers={**ASYNC, "Idempotency-Key": value}) as resp:
            assert resp.status == 400, value
    async with http.post(f"{base}/x", headers=[*ASYNC.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]) as resp:
        assert resp.status == 400
    assert await entry_count(redis_client) == 0


async def test_keyed_and_plain_requests_in_one_batch_are_each_queued(base, http, redis_client):
    async def post(n):
        headers = {**ASYNC, "Idempotency-Key": f"b{n % 5}"} if n % 2 else ASYNC
        async with http.post(f"{base}/b{n % 5 if n % 2 else n}", headers=headers) as resp:
            assert resp.status == 202
            return resp.headers["Location"]

    locations = await asyncio.gather(*(post(n) for n in range(40)))
    keyed = {n % 5: set() for n in range(40) if n % 2}
    for n, location in enumerate(locations):
        if n % 2:
            keyed[n % 5].add(location)
    assert all(len(seen) == 1 for seen in keyed.values())
    assert await entry_count(redis_client) == 20 + 5


# --- DELETE <Location>


async def accept(base, http, path="/c"):
    async with http.post(f"{base}{path}", headers=ASYNC) as resp:
        assert resp.status == 202
        return resp.headers["Location"], resp.headers["Async-Request-Id"]


async def test_delete_of_a_queued_request_cancels_it_and_get_reads_canceled(base, http, redis_client):
    location, request_id = await accept(base, http)
    async with http.delete(base + location, headers=ASYNC) as resp:
        assert resp.status == 200 and resp.headers["Async-Request-State"] == CANCELED
        doc = await resp.json()
    assert (doc["id"], doc["state"], doc["attempts"], doc["status_url"]) == (request_id, CANCELED, 0, location)
    assert doc["accepted_at"] > 0
    async with http.get(base + location, headers=ASYNC) as resp:
        assert resp.status == 410 and resp.headers["Async-Request-State"] == CANCELED
        assert (await resp.json())["state"] == CANCELED
    async with http.delete(base + location, headers=ASYNC) as resp:  # again: still canceled
        assert resp.status == 200 and (await resp.json())["state"] == CANCELED
    async with http.get(base + "/metrics") as resp:
        metrics = await resp.text()
    assert 'async_producer_cancels_total{found="queued"} 1.0' in metrics
    assert 'async_producer_cancels_total{found="canceled"} 1.0' in metrics
    record = Record.from_json(await redis_client.get(record_key("async", request_id, HOST)))
    assert record.state == CANCELED
    assert await redis_client.pttl(record_key("async", request_id, HOST)) == -1, "kept until its entry is settled"


async def test_delete_of_a_retrying_request_cancels_it(base, http, redis_client):
    await put_record(redis_client, "r1", Record(state=RETRYING, host=HOST, attempts=1, updated_at=10.0,
                                                error="the Service answered 503", next_attempt_at=99.0,
                                                accepted_at=9.0))
    async with http.delete(f"{base}{STATUS_PATH_PREFIX}r1", headers=ASYNC) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["state"] == CANCELED and doc["attempts"] == 1 and doc["accepted_at"] == 9.0
    assert "next_attempt_at" not in doc


async def test_delete_of_a_retrying_keyed_request_keeps_its_record_and_key_until_the_retry_is_settled(
        base, http, redis_client):
    """The retry may come due later than the retention: the canceled record (and the key that answers with it) must
    outlive that wait, or the retry would find no record and be replayed; settling it sets their lifetime."""
    key = "async:{default/sleep}:idem:k-retrying"
    await redis_client.set(key, "ab 1-0 r3")  # pending: no expiry
    await put_record(redis_client, "r3", Record(state=RETRYING, host=HOST, attempts=1, updated_at=10.0,
                                                error="the Service answered 503", next_attempt_at=99.0,
                                                idempotency_key=key))
    async with http.delete(f"{base}{STATUS_PATH_PREFIX}r3", headers={**ASYNC, "Async-Policy": "v1;keep=600"}) as resp:
        assert resp.status == 200 and (await resp.json())["state"] == CANCELED
    assert await redis_client.pttl(record_key("async", "r3", HOST)) == -1
    assert await redis_client.pttl(key) == -1


async def test_delete_of_a_running_request_is_409(base, http, redis_client):
    await put_record(redis_client, "r2", Record(state=RUNNING, host=HOST, attempts=1, updated_at=10.0))
    async with http.delete(f"{base}{STATUS_PATH_PREFIX}r2", headers=ASYNC) as resp:
        assert resp.status == 409 and resp.headers["Async-Request-State"] == RUNNING
        doc = await resp.json()
    assert doc["state"] == RUNNING and "running" in doc["error"]
    assert Record.from_json(await redis_client.get(record_key("async", "r2", HOST))).state == RUNNING


@pytest.mark.parametrize("state", [SUCCEEDED, FAILED, EXPIRED])
async def test_delete_of_a_finished_request_is_204_and_forgets_it(base, http, redis_client, state):
    location, request_id = await accept(base, http)
    await put_record(redis_client, request_id, Record(state=state, host=HOST, attempts=1, updated_at=1.0,
                                                      response=RecordedResponse(200, (), b"ok")))
    async with http.delete(base + location, headers=ASYNC) as resp:
        assert resp.status == 204 and await resp.read() == b""
        assert "Content-Length" not in resp.headers
    for method in ("GET", "DELETE"):
        async with http.request(method, base + location, headers=ASYNC) as resp:
            assert resp.status == 404, method
    assert await entry_count(redis_client) == 0  # a source that keeps delivered entries cannot make it queued again


async def test_delete_through_another_services_route_is_404(base, http, redis_client):
    location, request_id = await accept(base, http)
    async with http.delete(base + location, headers={"Async-Original-Host": "other.default.svc.cluster.local"}) as resp:
        assert resp.status == 404
    assert await redis_client.get(record_key("async", request_id, HOST)) is None


async def test_a_repeated_key_with_wait_waits_for_the_first_requests_outcome(base, http, redis_client):
    headers = {**ASYNC, "Idempotency-Key": "k-wait"}
    async with http.post(f"{base}/w", data=b"1", headers=headers) as resp:
        request_id = resp.headers["Async-Request-Id"]

    async def finish_it():
        await asyncio.sleep(0.5)
        await put_record(redis_client, request_id, Record(state=SUCCEEDED, host=HOST, attempts=1, updated_at=1.0,
                                                          response=RecordedResponse(200, (), b"first")))
        await redis_client.publish("async:finished", record_key("async", request_id, HOST))

    finisher = asyncio.create_task(finish_it())
    started = time.monotonic()
    async with http.post(f"{base}/w", data=b"1", headers={**headers, "Prefer": "respond-async, wait=20"}) as resp:
        assert resp.status == 200 and await resp.read() == b"first"
        assert resp.headers["Async-Request-Id"] == request_id
    assert 0.4 <= time.monotonic() - started < 10
    await finisher
    assert await entry_count(redis_client) == 1


async def test_delete_of_a_finished_request_frees_its_idempotency_key(base, http, redis_client):
    headers = {**ASYNC, "Idempotency-Key": "k-del"}
    async with http.post(f"{base}/d", data=b"1", headers=headers) as resp:
        location, request_id = resp.headers["Location"], resp.headers["Async-Request-Id"]
    await put_record(redis_client, request_id, Record(
        state=SUCCEEDED, host=HOST, attempts=1, updated_at=1.0, response=RecordedResponse(200, (), b"ok"),
        idempotency_key="async:{default/sleep}:idem:k-del"))
    async with http.delete(base + location, headers=ASYNC) as resp:
        assert resp.status == 204
    async with http.post(f"{base}/d", data=b"1", headers=headers) as resp:
        assert resp.status == 202 and resp.headers["Async-Request-Id"] != request_id  # queued anew
        new_id = resp.headers["Async-Request-Id"]
    [(_, fields)] = await stream_entries(redis_client)  # the first entry went with its record
    assert Envelope.from_stream_fields(fields).id == new_id


async def test_the_wait_subscription_comes_back_after_a_redis_restart(settings, http, redis_server):
    server = await start_producer(settings)
    base = f"http://127.0.0.1:{settings.port}"
    try:
        redis_server.kill()
        await asyncio.sleep(0.5)  # the subscription notices and waits to reconnect
        redis_server.start()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            deadline = time.monotonic() + 10
            while (await client.pubsub_numsub("async:finished"))[0][1] < 1:  # subscribed again
                assert time.monotonic() < deadline, "the producer never subscribed again"
                await asyncio.sleep(0.1)

            async def finish_it():
                while not (entries := await stream_entries(client)):
                    await asyncio.sleep(0.02)
                request_id = Envelope.from_stream_fields(entries[0][1]).id
                await put_record(client, request_id, Record(state=SUCCEEDED, host=HOST, attempts=1, updated_at=1.0,
                                                            response=RecordedResponse(200, (), b"back")))
                await client.publish("async:finished", record_key("async", request_id, HOST))

            finisher = asyncio.create_task(finish_it())
            started = time.monotonic()
            async with http.post(f"{base}/x", headers={**ASYNC, "Prefer": "respond-async, wait=20"}) as resp:
                assert resp.status == 200 and await resp.read() == b"back"
            assert time.monotonic() - started < 10
            await finisher
        finally:
            await client.aclose()
    finally:
        await server.close()


async def test_an_idempotency_key_has_no_expiry_while_its_request_is_queued(base, http, redis_client):
    """Its retention starts with the outcome (the replay gives the key the result's lifetime), as a record's does."""
    async with http.post(f"{base}/k", headers={**ASYNC, "Idempotency-Key": "kept", "Async-Policy": "v1;keep=600"}):
        pass
    assert await redis_client.pttl("async:{default/sleep}:idem:kept") == -1
    async with http.post(f"{base}/k", headers={**ASYNC, "Idempotency-Key": "default"}):
        pass
    assert await redis_client.pttl("async:{default/sleep}:idem:default") == -1


@pytest.mark.parametrize(("changes", "policy", "wait"), [({"status_retention": 0.2}, {}, 0.5),
                                                         ({}, {"Async-Policy": "v1;keep=1"}, 1.5)])
async def test_a_keyed_request_queued_longer_than_the_retention_is_still_answered_as_a_repeat(
        redis_url, http, redis_client, changes, policy, wait):
    """No source runs: the request stays queued past the retention, and a repeat must not queue it again."""
    headers = {**ASYNC, **policy, "Idempotency-Key": "pending"}
    async with producer_with(redis_url, **changes) as base:
        async with http.post(f"{base}/p", data=b"1", headers=headers) as resp:
            assert resp.status == 202
            first = (resp.headers["Location"], resp.headers["Async-Request-Id"])
        await asyncio.sleep(wait)
        async with http.post(f"{base}/p", data=b"1", headers=headers) as resp:
            assert resp.status == 202 and (resp.headers["Location"], resp.headers["Async-Request-Id"]) == first
            assert (await resp.json())["state"] == QUEUED
    assert await entry_count(redis_client) == 1


async def test_a_keyed_request_meets_its_services_cap_and_a_repeat_is_still_answered(base, http, redis_client):
    capped = {**ASYNC, "Async-Policy": "v1;queued=1"}
    async with http.post(f"{base}/x", data=b"1", headers={**capped, "Idempotency-Key": "first"}) as resp:
        assert resp.status == 202
        first = resp.headers["Async-Request-Id"]
    async with http.post(f"{base}/x", data=b"2", headers={**capped, "Idempotency-Key": "second"}) as resp:
        assert resp.status == 503 and "at most 1)" in (await resp.json())["error"]
    assert await redis_client.get("async:{default/sleep}:idem:second") is None, "a refused request takes no key"
    async with http.post(f"{base}/x", data=b"1", headers={**capped, "Idempotency-Key": "first"}) as resp:
        assert resp.status == 202 and resp.headers["Async-Request-Id"] == first
    assert await entry_count(redis_client) == 1


@pytest.mark.parametrize(("changes", "policy", "wait"), [({"status_retention": 0.2}, {}, 0.5),
                                                         ({}, {"Async-Policy": "v1;keep=1"}, 1.5)])
async def test_a_request_canceled_while_queued_still_reads_canceled_after_the_retention(
        redis_url, http, redis_client, changes, policy, wait):
    """No source runs: the canceled entry waits past the retention. Its record must still say canceled; gone, the
    entry would read queued again and the source would replay it."""
    async with producer_with(redis_url, **changes) as base:
        async with http.post(f"{base}/c", headers={**ASYNC, **policy}) as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        async with http.delete(base + location, headers={**ASYNC, **policy}) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == CANCELED
        await asyncio.sleep(wait)
        async with http.get(base + location, headers={**ASYNC, **policy}) as resp:
            assert resp.status == 410 and resp.headers["Async-Request-State"] == CANCELED


async def test_wait_answers_an_expired_request(base, http, redis_client):
    async def expire_it():
        while not (ids := [Envelope.from_stream_fields(f).id for _, f in await stream_entries(redis_client)]):
            await asyncio.sleep(0.05)
        await put_record(redis_client, ids[0], Record(state=EXPIRED, host=HOST, attempts=0, updated_at=1.0,
                                                      error="not finished within its max-age of 1s"))
        await redis_client.publish("async:finished", record_key("async", ids[0], HOST))

    expirer = asyncio.create_task(expire_it())
    async with http.post(f"{base}/w", headers={**ASYNC, "Prefer": "respond-async, wait=20"}) as resp:
        assert resp.status == 502 and resp.headers["Async-Request-State"] == EXPIRED
        assert "max-age" in (await resp.json())["error"]
    await expirer
