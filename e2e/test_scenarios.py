"""What a client of an async Knative Service sees, on whichever backend runs.

Every scenario goes through the gateway with the Host header of one of the
three sample Services (conditional, always async, plain), except the few that
check the producer and consumer directly. The source replays queued requests
in-process; the consumer is the HTTP sink a RedisStreamSource posts to, so the
scenarios that involve it post such events themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from async_component.dataplane.envelope import Envelope, binary_event, event_source
from async_component.dataplane.records import RUNNING, Record, record_key
from backend import SERVICE_ALWAYS, SERVICE_CONDITIONAL, SERVICE_PLAIN, Backend
from client import Client, Reply


@pytest.fixture
async def client(backend: Backend):
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield Client(backend, session)


@pytest.fixture
async def redis(backend: Backend):
    client = backend.redis_client()
    yield client
    await client.aclose()


async def entries_added(redis: aioredis.Redis, backend: Backend) -> int:
    """Entries ever written to any queue (each Service's, and the single stream): unaffected by the source
    deleting delivered ones."""
    streams = [backend.stream]
    async for key in redis.scan_iter(match=f"{backend.key_prefix}:{{*}}:q", count=1000):
        streams.append(key)
    total = 0
    for stream in streams:
        try:
            total += int((await redis.xinfo_stream(stream))["entries-added"])
        except aioredis.ResponseError:  # no such stream yet
            pass
    return total


def redis_stream_source_event(backend: Backend, entry_id: str, envelope: Envelope) -> tuple[dict, bytes]:
    """The binary-mode event Knative's RedisStreamSource sends for the entry holding ``envelope``."""
    source = event_source("redis://redis.redis.svc.cluster.local:6379", backend.stream)
    return binary_event(source, entry_id, envelope.to_stream_fields())


def echo_headers(echo: dict, name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


async def test_sync_call_answers_after_the_sleep(client: Client):
    reply = await client.request(SERVICE_CONDITIONAL, "GET", "/sync?sleep=1")
    assert reply.status == 200
    assert reply.elapsed >= 1.0
    echo = reply.json()
    assert echo["path"] == "/sync" and echo["slept"] == 1
    assert echo_headers(echo, "Async-Attempt") == []


async def test_async_call_is_accepted_at_once_and_its_result_kept(client: Client):
    accepted = await client.request(SERVICE_CONDITIONAL, "POST", "/work?sleep=2", data=b"hello", prefer_async=True)
    assert accepted.status == 202, accepted.body
    assert accepted.elapsed < 2.0, "the 202 must not wait for the app"
    request_id = accepted.headers["Async-Request-Id"]
    assert accepted.headers["Location"].endswith(request_id)
    assert accepted.headers["Location"].startswith("/")

    final, states = await client.follow(SERVICE_CONDITIONAL, accepted)
    assert states and set(states) <= {"queued", "running"}
    assert "running" in states  # the app sleeps 2 s, polled every 50 ms
    assert final.status == 200
    assert final.headers["Async-Request-State"] == "succeeded"
    echo = final.json()
    assert echo["method"] == "POST" and echo["path"] == "/work" and echo["body_length"] == 5
    assert echo_headers(echo, "Prefer") == ["respond-sync"]
    assert echo_headers(echo, "Async-Request-Id") == [request_id]
    assert echo_headers(echo, "Async-Attempt") == ["1"]


@pytest.mark.parametrize(("prefer", "queued"), [("Respond-Async", True), ("RESPOND-ASYNC", True), ("rEsPoNd-AsYnC", False)])
async def test_common_case_variants_of_the_preference_are_queued_others_are_not(client: Client, prefer, queued):
    reply = await client.request(SERVICE_CONDITIONAL, "GET", "/variant?sleep=0", headers=[("Prefer", prefer)])
    if queued:
        assert reply.status == 202, reply.body
        final, _ = await client.follow(SERVICE_CONDITIONAL, reply)
        assert final.status == 200 and final.json()["path"] == "/variant"
    else:  # the network layer matches the header exactly: only the listed spellings are async
        assert reply.status == 200 and "Async-Request-Id" not in reply.headers


async def test_always_async_service_queues_without_the_header(client: Client):
    accepted = await client.request(SERVICE_ALWAYS, "GET", "/always?sleep=0")
    assert accepted.status == 202, accepted.body
    final, _ = await client.follow(SERVICE_ALWAYS, accepted)
    assert final.status == 200
    assert final.json()["path"] == "/always"


@pytest.mark.parametrize("service", [SERVICE_CONDITIONAL, SERVICE_ALWAYS])
async def test_other_preferences_reach_the_service_beside_respond_sync(client: Client, backend: Backend, redis,
                                                                       service):
    """Only respond-async is replaced; the replay still reaches the Service, never the producer again."""
    before = await entries_added(redis, backend)
    prefer = "respond-async, return=minimal" if service == SERVICE_ALWAYS else "respond-async"
    headers = [("Prefer", prefer), ("Prefer", "handling=lenient")] if service == SERVICE_ALWAYS else []
    accepted = await client.request(service, "POST", "/prefer?sleep=0", data=b"x", headers=headers,
                                    prefer_async=service == SERVICE_CONDITIONAL)
    assert accepted.status == 202, accepted.body
    final, _ = await client.follow(service, accepted)
    assert final.status == 200 and final.headers["Async-Request-State"] == "succeeded"
    expected = ["respond-sync, return=minimal, handling=lenient"] if service == SERVICE_ALWAYS else ["respond-sync"]
    assert echo_headers(final.json(), "Prefer") == expected
    await asyncio.sleep(0.5)
    assert await entries_added(redis, backend) == before + 1


async def test_plain_service_ignores_the_async_preference(client: Client):
    reply = await client.request(SERVICE_PLAIN, "GET", "/plain?sleep=0", prefer_async=True)
    assert reply.status == 200
    assert "Async-Request-Id" not in reply.headers
    assert reply.json()["path"] == "/plain"


async def test_unknown_request_id_is_404(client: Client):
    reply = await client.request(SERVICE_CONDITIONAL, "GET", "/.well-known/async-requests/no-such-request")
    assert reply.status == 404


async def test_binary_body_repeated_headers_and_query_arrive_unchanged(client: Client):
    body = os.urandom(64 * 1024)
    accepted = await client.request(
        SERVICE_CONDITIONAL, "PUT", "/blob?sleep=0&tag=a&tag=b&empty=",
        headers=[("X-Repeated", "one"), ("X-Repeated", "two"), ("Content-Type", "application/octet-stream")],
        data=body, prefer_async=True,
    )
    assert accepted.status == 202, accepted.body
    final, _ = await client.follow(SERVICE_CONDITIONAL, accepted)
    assert final.status == 200
    echo = final.json()
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["body_length"] == len(body)
    assert echo["query_string"] == "sleep=0&tag=a&tag=b&empty="
    assert echo_headers(echo, "X-Repeated") == ["one", "two"]
    assert echo_headers(echo, "Content-Type") == ["application/octet-stream"]



async def test_a_20_kib_header_reaches_the_service_sync_and_queued(client: Client):
    """A large token or cookie: Envoy (Kourier's and Istio's gateways) passes 60 KiB of headers on."""
    token = "t" * (20 * 1024)
    sync = await client.request(SERVICE_CONDITIONAL, "GET", "/large-header?sleep=0", headers=[("X-Token", token)])
    assert sync.status == 200, sync.body[:300]
    assert echo_headers(sync.json(), "X-Token") == [token]
    accepted = await client.request(SERVICE_CONDITIONAL, "GET", "/large-header?sleep=0",
                                    headers=[("X-Token", token)], prefer_async=True)
    assert accepted.status == 202, accepted.body[:300]
    final, _ = await client.follow(SERVICE_CONDITIONAL, accepted)
    assert final.status == 200
    assert echo_headers(final.json(), "X-Token") == [token]

async def test_header_bytes_that_are_not_utf8_reach_the_service_unchanged(client: Client, backend: Backend):
    """Like the body, a header value is bytes: ff fe 80 arrives as ff fe 80, not re-encoded as UTF-8."""
    url = URL(backend.gateway_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"GET /binary-header?sleep=0 HTTP/1.1\r\nHost: " + backend.host(SERVICE_CONDITIONAL).encode()
                     + b"\r\nPrefer: respond-async\r\nX-Binary: a\xff\xfe\x80z\r\nX-Utf8: caf\xc3\xa9\r\n"
                     b"Connection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert head[0].startswith("HTTP/1.1 202 "), answer
    location = next(line.split(": ", 1)[1] for line in head if line.lower().startswith("location:"))
    accepted = Reply(202, CIMultiDictProxy(CIMultiDict(Location=location)), b"", 0.0)
    final, _ = await client.follow(SERVICE_CONDITIONAL, accepted)
    assert final.status == 200, final.body
    echo = final.json()
    assert [v.encode("utf-8", "surrogateescape") for v in echo_headers(echo, "X-Binary")] == [b"a\xff\xfe\x80z"]
    assert echo_headers(echo, "X-Utf8") == ["caf\u00e9"]


async def test_client_sent_original_host_cannot_redirect_the_request(client: Client):
    accepted = await client.request(
        SERVICE_CONDITIONAL, "GET", "/spoof?sleep=0",
        headers=[("Async-Original-Host", "evil.example.org")], prefer_async=True,
    )
    assert accepted.status == 202, accepted.body
    final, _ = await client.follow(SERVICE_CONDITIONAL, accepted)
    assert final.status == 200
    echo = final.json()
    assert echo["path"] == "/spoof"
    assert echo_headers(echo, "Host") == [Backend.cluster_host(SERVICE_CONDITIONAL)]


async def test_producer_refuses_targets_outside_the_allowed_hosts(client: Client, backend: Backend, redis):
    before = await entries_added(redis, backend)
    async with client.session.post(
        backend.producer_url + "/anything", data=b"x",
        headers={"Async-Original-Host": "evil.example.org", "Prefer": "respond-async"},
    ) as response:
        assert response.status == 403
        assert "error" in await response.json()
    assert await entries_added(redis, backend) == before


@pytest.mark.parametrize("service", [SERVICE_CONDITIONAL, SERVICE_ALWAYS])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_status_path_is_never_queued_or_replayed(client: Client, backend: Backend, redis, service, method):
    """A write to the status path once made its replay come back to the producer and be queued again, forever."""
    before = await entries_added(redis, backend)
    reply = await client.request(service, method, "/.well-known/async-requests/x", data=b"x", prefer_async=True)
    assert reply.status == 405, reply.body
    assert reply.headers["Allow"] == "GET, HEAD, DELETE"
    await asyncio.sleep(1.0)  # a replay loop would have added entries by now
    assert await entries_added(redis, backend) == before


async def test_too_large_body_is_refused_and_nothing_queued(client: Client, backend: Backend, redis):
    before = await entries_added(redis, backend)
    reply = await client.request(SERVICE_CONDITIONAL, "POST", "/big", data=b"x" * 7_000_000, prefer_async=True)
    assert reply.status == 413
    assert await entries_added(redis, backend) == before


@pytest.mark.parametrize("prefer_async", [True, False])
async def test_a_body_sent_after_100_continue_arrives(client: Client, prefer_async):
    reply = await client.request(SERVICE_CONDITIONAL, "POST", "/continued?sleep=0", data=b"x" * 100_000,
                                 headers=[("Expect", "100-continue")], prefer_async=prefer_async)
    if prefer_async:
        assert reply.status == 202
        reply, _ = await client.follow(SERVICE_CONDITIONAL, reply)
    assert reply.status == 200 and reply.json()["body_length"] == 100_000


async def test_retryable_failures_are_retried_until_success(client: Client):
    accepted = await client.request(SERVICE_CONDITIONAL, "GET", "/flaky?sleep=0&fail_attempts=2", prefer_async=True)
    assert accepted.status == 202
    final, states = await client.follow(SERVICE_CONDITIONAL, accepted)
    assert final.status == 200
    assert final.headers["Async-Request-State"] == "succeeded"
    assert echo_headers(final.json(), "Async-Attempt") == ["3"]
    assert "retrying" in states


async def test_permanent_failure_ends_in_the_dead_letter_stream(client: Client, backend: Backend, redis):
    accepted = await client.request(SERVICE_CONDITIONAL, "GET", "/broken?sleep=0&status=503", prefer_async=True)
    assert accepted.status == 202
    request_id = accepted.headers["Async-Request-Id"]
    final, _ = await client.follow(SERVICE_CONDITIONAL, accepted)
    assert final.headers["Async-Request-State"] == "failed"
    assert final.status == 503  # the Service's last answer, as recorded
    dead = await redis.xrange(backend.dead_letter_stream_of(SERVICE_CONDITIONAL))
    ids = [Envelope.from_stream_fields(fields).id for _, fields in dead]
    assert request_id in ids


async def succeeded_echo(client: Client, backend: Backend, request_id: str) -> dict:
    """The sleep app's echo recorded for a request to the plain Service, which has no async routes:
    read from the producer directly, with the header the network layer would append."""
    async with client.session.get(
        backend.producer_url + f"/.well-known/async-requests/{request_id}",
        headers={"Async-Original-Host": Backend.cluster_host(SERVICE_PLAIN)},
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Async-Request-State"] == "succeeded"
        return await response.json()


async def test_consumer_handles_a_redis_stream_source_event(client: Client, backend: Backend):
    """Knative's RedisStreamSource sends binary-mode events whose data is the entry's field list."""
    envelope = Envelope.new(
        "POST", f"http://{Backend.cluster_host(SERVICE_PLAIN)}/from-rss?sleep=0",
        [("Content-Type", "text/plain"), ("X-Repeated", "1"), ("X-Repeated", "2")], b"via RedisStreamSource",
    )
    headers, body = redis_stream_source_event(backend, "1700000000000-0", envelope)
    async with client.session.post(backend.consumer_url + "/", data=body, headers=headers) as response:
        assert response.status // 100 == 2, await response.text()
    echo = await succeeded_echo(client, backend, envelope.id)
    assert echo["path"] == "/from-rss"
    assert echo_headers(echo, "X-Repeated") == ["1", "2"]
    assert echo["body_sha256"] == hashlib.sha256(b"via RedisStreamSource").hexdigest()


async def test_malformed_event_is_rejected_and_the_consumer_keeps_serving(client: Client, backend: Backend):
    headers = {"ce-specversion": "1.0", "ce-type": "dev.knative.sources.redisstream",
               "ce-source": "redis://x/y", "ce-id": "1-0", "Content-Type": "application/json"}
    async with client.session.post(backend.consumer_url + "/", data=b'["data", "not json"]', headers=headers) as response:
        assert response.status == 400
    async with client.session.get(backend.consumer_url + "/healthz") as response:
        assert response.status == 200


async def test_redis_outage_answers_503_never_202(client: Client, backend: Backend):
    backend.stop_redis()
    try:
        reply = await client.request(SERVICE_CONDITIONAL, "POST", "/outage", data=b"x", prefer_async=True, timeout=30)
        assert reply.status == 503
        assert "Retry-After" in reply.headers
    finally:
        backend.start_redis()
    # and it recovers
    for _ in range(100):
        reply = await client.request(SERVICE_CONDITIONAL, "POST", "/after-outage?sleep=0", prefer_async=True)
        if reply.status == 202:
            break
        await asyncio.sleep(0.1)
    assert reply.status == 202
    final, _ = await client.follow(SERVICE_CONDITIONAL, reply)
    assert final.status == 200


async def test_no_accepted_request_is_lost_when_the_source_is_killed(client: Client, backend: Backend):
    """The source replays queued requests itself (in-process), so it is the process whose death could lose one."""
    accepted = []
    for i in range(10):
        reply = await client.request(SERVICE_CONDITIONAL, "POST", f"/survive/{i}?sleep=1", data=str(i).encode(),
                                     prefer_async=True)
        assert reply.status == 202
        accepted.append(reply)
    await asyncio.sleep(0.3)  # let deliveries start
    backend.kill("source")
    backend.wait_ready("source")
    finals = await asyncio.gather(*(client.follow(SERVICE_CONDITIONAL, reply, timeout=90) for reply in accepted))
    for i, (final, _) in enumerate(finals):
        assert final.status == 200, final.body
        assert final.json()["path"] == f"/survive/{i}"


async def test_an_event_cut_off_by_a_consumer_crash_is_replayed_when_delivered_again(client: Client, backend: Backend,
                                                                                    redis):
    """The consumer is the HTTP sink (of a RedisStreamSource): killed mid-replay, it never answered 2xx, so the
    sender delivers the event again, and that delivery must be replayed and recorded, not taken for a duplicate."""
    envelope = Envelope.new("POST", f"http://{Backend.cluster_host(SERVICE_PLAIN)}/cut-off?sleep=2",
                            [("Content-Type", "text/plain")], b"cut off")
    headers, body = redis_stream_source_event(backend, "1700000000001-0", envelope)

    async def deliver() -> int | None:
        """The consumer's answer; None for none (the connection broke, or a tunnel to a dead pod hung)."""
        try:
            async with client.session.post(backend.consumer_url + "/", data=body, headers=headers,
                                           timeout=aiohttp.ClientTimeout(total=60)) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    first = asyncio.create_task(deliver())
    key = record_key(backend.key_prefix, envelope.id, envelope.url.split("/")[2])
    for _ in range(200):  # until the consumer has started the replay (the app sleeps 2 s)
        raw = await redis.get(key)
        if raw is not None and Record.from_json(raw).state == RUNNING:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the consumer did not start the replay: record {raw!r}, delivery {first}")
    backend.kill("consumer")
    status = await first
    assert status is None or status // 100 != 2, "the consumer must not answer 2xx for an unrecorded outcome"
    backend.wait_ready("consumer")
    assert await deliver() == 200
    echo = await succeeded_echo(client, backend, envelope.id)
    assert echo["path"] == "/cut-off" and echo["body_length"] == len(b"cut off")
