"""The client's side of an async call (issue #14): Prefer wait, Retry-After, Idempotency-Key, cancel."""

from __future__ import annotations

from backend import SERVICE_ALWAYS, SERVICE_CONDITIONAL
from client import Client
from test_scenarios import client, echo_headers, redis  # noqa: F401 - fixtures shared with the scenarios


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
