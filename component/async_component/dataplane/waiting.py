"""``Prefer: wait=N``: requests that wait for their own outcome, woken by one subscription per process.

The replay core publishes a request's record key on :func:`.records.finished_channel`
in the transaction that records its final outcome, when a client may wait for
it: the request asked ``Prefer: wait``, or has an ``Idempotency-Key`` a repeat
may wait on (``replay.awaited``). Each producer process holds
one subscription to that channel, whatever the number of waiting requests, and
wakes the requests waiting on that key; a waiting request then reads its record
once. A message lost while the subscription reconnects only means the waiter
reads its record when its time is up, so nothing depends on the channel
being reliable.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import redis.asyncio as aioredis

from ..logthrottle import LogThrottle
from . import redisconn
from .retries import wait_event

log = logging.getLogger(__name__)

RECONNECT_DELAY = 1.0
POLL_SECONDS = 0.2
"""How often the subscription loop looks at its stop event."""

_WAIT = re.compile(r'(?:^|[,;\s])wait\s*=\s*"?([0-9]{1,9})"?\s*(?=[,;]|$)', re.IGNORECASE)


def wait_preference(values: list[str]) -> int | None:
    """Seconds asked for by ``wait=N`` in the ``Prefer`` values (the first one wins), else None."""
    for value in values:
        match = _WAIT.search(value)
        if match:
            return int(match.group(1))
    return None


class Finished:
    """Wakes waiting requests when the replay core announces their final outcome."""

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self.waiting: dict[bytes, list[asyncio.Future]] = {}
        self.subscribed = asyncio.Event()
        self.released = False
        self.throttle = LogThrottle(log)

    async def wait(self, key: str, future: asyncio.Future, timeout: float) -> None:
        """Until ``key``'s outcome is announced, ``timeout`` passes or :meth:`release_all`.

        ``future`` comes from :meth:`register`, called before the request was queued, so
        an outcome announced before this call still counts.
        """
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            self.unregister(key, future)

    def register(self, key: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.released:
            future.set_result(None)
        else:
            self.waiting.setdefault(key.encode(), []).append(future)
        return future

    def unregister(self, key: str, future: asyncio.Future) -> None:
        futures = self.waiting.get(key.encode())
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self.waiting[key.encode()]

    def wake(self, key: bytes) -> None:
        for future in self.waiting.pop(key, ()):
            if not future.done():
                future.set_result(None)

    def release_all(self) -> None:
        """The process is stopping: every waiter answers now (a 202 if its request is not finished)."""
        self.released = True
        for key in list(self.waiting):
            self.wake(key)

    async def run(self, stop: asyncio.Event) -> None:
        """Hold the subscription until ``stop`` (on a cluster, one through each master: one that hangs stays
        open and silent); a Redis outage is logged (rate-limited) and reconnected."""
        if not redisconn.is_cluster(self.redis):
            return await self._follow(stop, None)

        def failed(exc: Exception) -> None:
            self.throttle.warning("cannot list the masters of the cluster: %s: %s", type(exc).__name__, exc)
        await redisconn.on_every_master(self.redis, lambda node: self._follow(stop, node), stop, failed)

    async def _follow(self, stop: asyncio.Event, node: Any) -> None:
        while not stop.is_set():
            pubsub = (self.redis.pubsub(ignore_subscribe_messages=True) if node is None
                      else self.redis.pubsub(node=node, ignore_subscribe_messages=True))
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=POLL_SECONDS)
                    if message is not None and message.get("type") == "message":
                        self.wake(message["data"])
            except Exception as exc:  # waiters read their records when their time is up meanwhile
                self.subscribed.clear()
                self.throttle.warning("lost the subscription to %s, reconnecting: %s: %s", self.channel,
                                      type(exc).__name__, exc)
                await wait_event(stop, RECONNECT_DELAY)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # the connection is gone already
                    pass
