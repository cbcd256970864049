"""When to try again, and how long to wait: shared by the source and the consumer.

The source retries a delivery to its sink in-process (the entry stays pending);
the consumer retries a replay through Redis: the next attempt waits in the
sorted set ``records.retry_key`` scored by its due time, and
:class:`RetryMover` puts due ones back on the stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from email.utils import parsedate_to_datetime

import redis.asyncio as aioredis

from .envelope import STREAM_FIELD
from ..logthrottle import LogThrottle

log = logging.getLogger(__name__)

REPLAY_RETRY_STATUSES = frozenset({429, 502, 503, 504})
"""Service answers worth another attempt; anything else non-2xx/3xx is final."""

SINK_RETRY_STATUSES = frozenset({408, 429})
"""Sink 4xx answers that mean "not now" rather than "never"."""

# verdicts on a sink's answer
DELIVERED = "delivered"
RETRY = "retry"
REJECTED = "rejected"


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``attempt`` (1-based): doubling from ``base``, capped, jittered to [0.5, 1.0]."""
    exponent = min(max(attempt - 1, 0), 64)  # 2**64 * base is past any cap; avoids float overflow
    return min(cap, base * 2.0**exponent) * (0.5 + 0.5 * rand())


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``event``; whether it is set.

    Loops stop on an event rather than by cancellation: redis-py can swallow a
    cancellation that lands mid-command, which would leave such a loop running.
    """
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Answers whose ``Retry-After`` sets the delay of the next attempt (RFC 9110 section 10.2.3)."""


def retry_after(status: int, headers: Iterable[tuple[str, str]], now: float | None = None) -> float | None:
    """Seconds the Service asked to wait (delay-seconds or an HTTP-date), for a 429 or 503; else None."""
    if status not in RETRY_AFTER_STATUSES:
        return None
    for name, value in headers:
        if name.lower() != "retry-after":
            continue
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


def replay_retryable(status: int) -> bool:
    return status in REPLAY_RETRY_STATUSES


def sink_verdict(status: int) -> str:
    """A sink's 4xx (but 408/429) rejects the entry for good; 5xx and the rest mean try again."""
    if 200 <= status < 300:
        return DELIVERED
    if 400 <= status < 500 and status not in SINK_RETRY_STATUSES:
        return REJECTED
    return RETRY


# KEYS[1] the retry set, KEYS[2] the stream; ARGV[1] now, ARGV[2] most entries to move, ARGV[3] the stream field.
# Atomic, so several consumers can run it at once without moving an entry twice.
MOVE_DUE_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', ARGV[3], member)
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


class RetryMover:
    """Moves retries whose time has come from the sorted set back to the stream."""

    def __init__(self, redis: aioredis.Redis, *, retry_set: str, stream: str, batch: int = 100,
                 on_moved: Callable[[int], None] | None = None) -> None:
        self.keys = [retry_set, stream]
        self.batch = batch
        self.script = redis.register_script(MOVE_DUE_SCRIPT)
        self.on_moved = on_moved
        self.throttle = LogThrottle(log)

    async def move_due(self, now: float | None = None) -> int:
        """Move every retry due at ``now``; how many were moved."""
        now = time.time() if now is None else now
        total = 0
        while True:
            moved = int(await self.script(keys=self.keys, args=[repr(now), self.batch, STREAM_FIELD]))
            total += moved
            if moved < self.batch:
                break
        if total:
            log.info("moved %d due retries back to stream %s", total, self.keys[1])
            if self.on_moved is not None:
                self.on_moved(total)
        return total

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; a Redis outage is logged (rate-limited) and waited out."""
        while not stop.is_set():
            try:
                await self.move_due()
            except Exception as exc:  # Redis down or erroring: the retries wait in the set
                self.throttle.warning("cannot move due retries: %s: %s", type(exc).__name__, exc)
            await wait_event(stop, interval)
