"""Does the Redis behind the queue keep what it acknowledged? Checked at start and periodically.

A 202 promises the request is kept. Redis breaks that promise silently in two
ways: under a ``maxmemory-policy`` other than ``noeviction`` it deletes keys
when full (queued entries and records vanish, Locations answer 404); without
AOF a crash loses everything written since the last snapshot. The first makes
the producer not ready (and refuse new requests); the second is a warning, as
some operators accept it. Each is logged once when it starts, and once when it
ends; a Redis that is down is reported elsewhere.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from .redisconn import is_cluster
from .retries import wait_event

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"


async def inspect(redis: aioredis.Redis) -> tuple[str, bool]:
    """``(maxmemory-policy, AOF on)`` from INFO, which managed Redis services allow where CONFIG is often denied.

    On a Redis Cluster, of every master: the first policy that is not noeviction, AOF only if all have it.
    """
    if is_cluster(redis):
        memory = await redis.info("memory", target_nodes=redis.PRIMARIES)
        persistence = await redis.info("persistence", target_nodes=redis.PRIMARIES)
        policies = sorted({str(info.get("maxmemory_policy", "")) for info in memory.values()}, key=lambda p: p == SAFE_POLICY)
        return (policies[0] if policies else ""), all(int(info.get("aof_enabled", 0)) for info in persistence.values())
    async with redis.pipeline(transaction=False) as pipe:
        pipe.info("memory")
        pipe.info("persistence")
        memory, persistence = await pipe.execute()
    return str(memory.get("maxmemory_policy", "")), bool(int(persistence.get("aof_enabled", 0)))


class RedisEvicts(Exception):
    """Redis may delete queued requests: the process is not ready."""


class RedisCheck:
    """The last verdict on Redis's durability, refreshed every ``interval`` seconds by :meth:`run`."""

    def __init__(self, redis: aioredis.Redis, interval: float, *, who: str) -> None:
        self.redis = redis
        self.interval = interval
        self.who = who
        self.evicting: str | None = None
        """Why Redis may lose accepted requests (None: it may not, or it was not checked yet)."""
        self.without_aof = False
        self.unverifiable = False

    async def check(self) -> None:
        """Refresh the verdict; Redis unreachable leaves it as it was."""
        try:
            policy, aof = await inspect(self.redis)
        except aioredis.ResponseError as exc:  # INFO denied (ACL): say so once, do not block
            if not self.unverifiable:
                self.unverifiable = True
                log.warning("cannot check Redis's maxmemory-policy and persistence (%s): make sure it runs with "
                            "maxmemory-policy %s and appendonly yes", exc, SAFE_POLICY)
            return
        except Exception:  # unreachable: the callers report that on their own paths
            return
        self._eviction(policy)
        self._persistence(aof)

    def _eviction(self, policy: str) -> None:
        if policy == SAFE_POLICY or not policy:
            if self.evicting is not None:
                log.info("Redis now runs with maxmemory-policy %s: the %s is ready again", SAFE_POLICY, self.who)
            self.evicting = None
            return
        if self.evicting is None:
            log.error("Redis runs with maxmemory-policy %s: when full it deletes queued requests and their records; "
                      "the %s is not ready until it runs with maxmemory-policy %s", policy, self.who, SAFE_POLICY)
        self.evicting = f"Redis evicts keys (maxmemory-policy {policy}), accepted requests could be lost; " \
                        f"it must run with maxmemory-policy {SAFE_POLICY}"

    def _persistence(self, aof: bool) -> None:
        if not aof and not self.without_aof:
            log.warning("Redis runs without AOF (appendonly no): requests accepted since its last snapshot are lost "
                        "if Redis crashes; run it with appendonly yes")
        elif aof and self.without_aof:
            log.info("Redis now runs with AOF (appendonly yes)")
        self.without_aof = not aof

    def require(self) -> None:
        """Raise :class:`RedisEvicts` while Redis may delete queued requests (for the readiness probe)."""
        if self.evicting is not None:
            raise RedisEvicts(self.evicting)

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``interval`` seconds until ``stop`` is set."""
        while not await wait_event(stop, self.interval):
            await self.check()
