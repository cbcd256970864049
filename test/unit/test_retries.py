"""Backoff, retry verdicts and the due-retry mover (against a real redis-server)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from async_component.dataplane.envelope import Envelope
from async_component.dataplane.retries import DELIVERED, REJECTED, RETRY, RetryMover, backoff, replay_retryable, sink_verdict
from async_component.settings import ConsumerSettings
from async_component.logthrottle import LogThrottle


@pytest.mark.parametrize("attempt, low, high", [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (10, 5.0, 10.0),
                                                (10_000, 5.0, 10.0)])
def test_backoff_doubles_is_capped_and_jittered_to_half_or_more(attempt, low, high):
    assert backoff(attempt, 1.0, 10.0, rand=lambda: 0.0) == low
    assert backoff(attempt, 1.0, 10.0, rand=lambda: 1.0) == high
    assert low <= backoff(attempt, 1.0, 10.0) <= high


def test_default_first_retry_is_within_two_seconds():
    defaults = ConsumerSettings()
    assert all(0 < backoff(1, defaults.retry_base_delay, defaults.retry_max_delay) <= 2.0 for _ in range(100))


@pytest.mark.parametrize("status, retryable", [(429, True), (502, True), (503, True), (504, True),
                                               (500, False), (404, False), (408, False), (501, False)])
def test_replay_retries_only_overload_and_gateway_answers(status, retryable):
    assert replay_retryable(status) is retryable


@pytest.mark.parametrize("status, verdict", [(200, DELIVERED), (202, DELIVERED), (400, REJECTED), (404, REJECTED),
                                             (413, REJECTED), (408, RETRY), (429, RETRY), (500, RETRY), (503, RETRY),
                                             (302, RETRY)])
def test_sink_4xx_rejects_for_good_but_408_429_and_5xx_retry(status, verdict):
    assert sink_verdict(status) == verdict


def member(n: int) -> str:
    envelope = Envelope.new("GET", f"http://svc/{n}", [], b"", request_id=f"id{n}", accepted_at=1.0)
    return envelope.next_attempt().to_json()


async def test_mover_moves_due_retries_only_and_removes_them(redis_client):
    await redis_client.zadd("p:retries", {member(1): 100.0, member(2): 200.0, member(3): 300.0})
    moved = []
    mover = RetryMover(redis_client, retry_set="p:retries", stream="s", batch=1, on_moved=moved.append)
    assert await mover.move_due(now=250.0) == 2
    entries = await redis_client.xrange("s")
    assert [Envelope.from_stream_fields(f).id for _, f in entries] == ["id1", "id2"]
    assert [Envelope.from_stream_fields(f).attempt for _, f in entries] == [1, 1]
    assert await redis_client.zrange("p:retries", 0, -1) == [member(3).encode()]
    assert moved == [2]
    assert await mover.move_due(now=250.0) == 0 and moved == [2]


async def test_movers_running_at_once_move_each_retry_exactly_once(redis_client):
    await redis_client.zadd("p:retries", {member(n): float(n) for n in range(300)})
    movers = [RetryMover(redis_client, retry_set="p:retries", stream="s", batch=7) for _ in range(4)]
    counts = await asyncio.gather(*(m.move_due(now=1000.0) for m in movers))
    assert sum(counts) == 300
    ids = [Envelope.from_stream_fields(f).id for _, f in await redis_client.xrange("s")]
    assert sorted(ids) == sorted(f"id{n}" for n in range(300))
    assert await redis_client.zcard("p:retries") == 0


def test_throttle_logs_each_message_once_per_interval_and_counts_the_rest(caplog):
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("t"), interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert throttle.warning("down: %s", "a") is True
        assert throttle.warning("down: %s", "b") is False
        assert throttle.warning("cannot ack %s", "e1") is True  # another failure is not hidden behind the first
        assert throttle.warning("down: %s", "c") is False
        assert throttle.warning("cannot ack %s", "e2") is False
        now[0] = 61
        assert throttle.warning("down: %s", "d") is True
        assert throttle.warning("down: %s", "e") is False
    assert caplog.messages == ["down: a", "cannot ack e1", "down: d (2 similar failures not logged)"]


@pytest.mark.parametrize("attempt, high", [(1, 0.5), (2, 1.0), (3, 1.5), (40, 5.0)])
def test_linear_backoff_grows_by_the_base_delay(attempt, high):
    assert backoff(attempt, 0.5, 5.0, rand=lambda: 1.0, linear=True) == high
    assert backoff(attempt, 0.5, 5.0, rand=lambda: 0.0, linear=True) == high / 2


@pytest.mark.parametrize("retry_on, status, retryable", [(("5xx",), 500, True), (("5xx",), 429, False),
                                                         (("429", "5xx"), 429, True), (("404",), 404, True)])
def test_replay_retries_what_the_policy_names(retry_on, status, retryable):
    assert replay_retryable(status, retry_on) is retryable
