"""The client's side of an async call (issue #14): Prefer wait, Retry-After, Idempotency-Key, cancel."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from backend import SERVICE_ALWAYS, SERVICE_CONDITIONAL, Backend
from client import Client
from test_scenarios import client, echo_headers, entries_added, redis  # noqa: F401 - fixtures shared with the scenarios


async def test_wait_answers_the_apps_response_when_it_finishes_in_time(client: Client):
    reply = await client.request(SERVICE_ALWAYS, "POST", "/waited?sleep=0.2", data=b"abc",
                                 headers=[("Prefer", "respond-async, wait=10")])
    assert reply.status == 200, reply.body
    assert reply.elapsed < 5, "woken by the outcome, not by the end of the wait"
    assert reply.headers["Async-Request-State"] == "succeeded"
    request_id = reply.headers["Async-Request-Id"]
    echo = reply.json()
    assert echo["path"] == "/waited" and echo["body_length"] == 3
    assert echo_headers(echo, "Async-Request-Id") == [request_id]


async def test_wait_too_short_answers_202_after_about_the_wait(client: Client):
    reply = await client.request(SERVICE_ALWAYS, "GET", "/slow?sleep=3", headers=[("Prefer", "respond-async, wait=1")])
    assert reply.status == 202, reply.body
    assert 0.9 <= reply.elapsed < 2.5
    assert reply.headers["Retry-After"] == "1"
    assert reply.headers["Preference-Applied"] == "respond-async"
    final, _ = await client.follow(SERVICE_ALWAYS, reply)
    assert final.status == 200 and final.json()["path"] == "/slow"


async def test_wait_in_conditional_mode_is_not_routed_async_unless_spelled_exactly(client: Client):
    """KIngress matches Prefer exactly: 'respond-async, wait=N' reaches a conditional Service synchronously."""
    reply = await client.request(SERVICE_CONDITIONAL, "GET", "/cond?sleep=0",
                                 headers=[("Prefer", "respond-async, wait=5")])
    assert reply.status == 200 and "Async-Request-Id" not in reply.headers
    assert echo_headers(reply.json(), "Async-Attempt") == []


async def test_the_same_idempotency_key_twice_is_replayed_once_with_the_same_location(client: Client,
                                                                                   backend: Backend, redis):
    before = await entries_added(redis, backend)
    headers = [("Idempotency-Key", f'"{uuid.uuid4()}"')]
    first = await client.request(SERVICE_CONDITIONAL, "POST", "/once?sleep=0", data=b"pay", headers=headers,
                                 prefer_async=True)
    again = await client.request(SERVICE_CONDITIONAL, "POST", "/once?sleep=0", data=b"pay", headers=headers,
                                 prefer_async=True)
    assert first.status == 202, first.body
    assert again.status in (200, 202), again.body  # the first 202 again, or its final response
    assert again.headers["Async-Request-Id"] == first.headers["Async-Request-Id"]
    if again.status == 202:
        assert again.headers["Location"] == first.headers["Location"]
    final, _ = await client.follow(SERVICE_CONDITIONAL, first)
    assert final.status == 200 and echo_headers(final.json(), "Async-Attempt") == ["1"]
    after = await client.request(SERVICE_CONDITIONAL, "POST", "/once?sleep=0", data=b"pay", headers=headers,
                                 prefer_async=True)
    assert after.status == 200 and after.body == final.body  # finished: its response
    await asyncio.sleep(0.5)
    assert await entries_added(redis, backend) == before + 1


async def test_the_same_idempotency_key_with_another_body_is_422(client: Client, backend: Backend, redis):
    before = await entries_added(redis, backend)
    headers = [("Idempotency-Key", f"k-{uuid.uuid4()}")]
    first = await client.request(SERVICE_CONDITIONAL, "POST", "/k?sleep=0", data=b"one", headers=headers,
                                 prefer_async=True)
    assert first.status == 202, first.body
    other = await client.request(SERVICE_CONDITIONAL, "POST", "/k?sleep=0", data=b"two", headers=headers,
                                 prefer_async=True)
    assert other.status == 422, other.body
    assert await entries_added(redis, backend) == before + 1


async def poll_state(client: Client, service: str, location: str, state: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await client.request(service, "GET", location)
        if reply.headers.get("Async-Request-State") == state:
            return
        assert asyncio.get_running_loop().time() < deadline, f"never {state}: {reply.status} {reply.body!r}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("service", [SERVICE_CONDITIONAL, SERVICE_ALWAYS])
async def test_delete_while_running_is_409(client: Client, service):
    accepted = await client.request(service, "POST", "/busy?sleep=3", prefer_async=service == SERVICE_CONDITIONAL)
    assert accepted.status == 202, accepted.body
    location = accepted.headers["Location"]
    await poll_state(client, service, location, "running")
    reply = await client.request(service, "DELETE", location)
    assert reply.status == 409, reply.body
    assert reply.headers["Async-Request-State"] == "running" and reply.json()["state"] == "running"
    final, _ = await client.follow(service, accepted)
    assert final.status == 200 and final.json()["path"] == "/busy"


@pytest.mark.parametrize("service", [SERVICE_CONDITIONAL, SERVICE_ALWAYS])
async def test_delete_after_finishing_is_204_then_404(client: Client, backend: Backend, redis, service):
    accepted = await client.request(service, "GET", "/done?sleep=0", prefer_async=service == SERVICE_CONDITIONAL)
    final, _ = await client.follow(service, accepted)
    assert final.status == 200
    before = await entries_added(redis, backend)
    location = accepted.headers["Location"]
    reply = await client.request(service, "DELETE", location)
    assert reply.status == 204 and reply.body == b""
    assert (await client.request(service, "GET", location)).status == 404
    assert (await client.request(service, "DELETE", location)).status == 404
    assert await entries_added(redis, backend) == before  # a DELETE is never queued


async def test_a_producer_killed_during_a_wait_loses_nothing(client: Client, backend: Backend, redis):
    """The client gets an error it can retry; retried with its Idempotency-Key, it gets the one request's answer."""
    before = await entries_added(redis, backend)
    headers = [("Prefer", "respond-async, wait=20"), ("Idempotency-Key", f'"{uuid.uuid4()}"')]
    waiting = asyncio.create_task(client.request(SERVICE_ALWAYS, "POST", "/crash?sleep=2", data=b"x", headers=headers))
    while await entries_added(redis, backend) == before:
        await asyncio.sleep(0.02)
    await asyncio.get_running_loop().run_in_executor(None, backend.kill, "producer")
    reply = await waiting
    assert reply.status in (202, 502, 503), reply.body  # a 202, or an error worth retrying
    await asyncio.get_running_loop().run_in_executor(None, backend.wait_ready, "producer")
    again = await client.request(SERVICE_ALWAYS, "POST", "/crash?sleep=2", data=b"x", headers=headers)
    assert again.status == 200, again.body
    assert again.json()["path"] == "/crash" and echo_headers(again.json(), "Async-Attempt") == ["1"]
    assert await entries_added(redis, backend) == before + 1
