"""A Redis that may drop accepted requests is noticed: evicting makes the producer not ready, no AOF is a warning.

A real redis-server whose settings are changed at run time with CONFIG SET, as an
operator (or a managed Redis's parameter group) would.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from async_component.dataplane import producer
from async_component.dataplane.source import Source
from async_component.local.ports import free_port
from async_component.settings import ProducerSettings, SourceSettings

HOST = "sleep.default.svc.cluster.local"
ASYNC = {"Async-Original-Host": HOST}
CHECK = 0.05


def lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def until(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return result


@pytest.fixture
async def served(redis_url, redis_client):
    """Start a producer once ``redis_client`` is configured; yields its base URL."""
    servers = []

    async def start():
        settings = ProducerSettings(redis_url=redis_url, port=free_port(), host="127.0.0.1",
                                    redis_check_interval=CHECK)
        server = producer.make_server(settings)
        await server.start(settings.host, settings.port)
        servers.append(server)
        return f"http://127.0.0.1:{settings.port}"

    yield start
    for server in servers:
        await server.close()


async def test_an_evicting_redis_makes_the_producer_not_ready_and_refuse_until_fixed(served, http, redis_client,
                                                                                     caplog):
    caplog.set_level(logging.INFO, "async_component")
    await redis_client.config_set("maxmemory-policy", "allkeys-lru")
    base = await served()
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 503
        assert "maxmemory-policy allkeys-lru" in (await resp.json())["reason"]
    async with http.post(f"{base}/x", data=b"x", headers=ASYNC) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert "maxmemory-policy allkeys-lru" in (await resp.json())["error"]
    assert await redis_client.xlen("async-requests") == 0
    await asyncio.sleep(CHECK * 6)  # several checks: still one line
    assert len(lines(caplog, "maxmemory-policy allkeys-lru")) == 1

    await redis_client.config_set("maxmemory-policy", "noeviction")

    async def ready():
        async with http.get(f"{base}/readyz") as resp:
            return resp.status == 200
    await until(ready)
    async with http.post(f"{base}/x", data=b"x", headers=ASYNC) as resp:
        assert resp.status == 202
    assert len(lines(caplog, "ready again")) == 1


async def test_a_policy_changed_while_running_is_noticed(served, http, redis_client):
    base = await served()
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200
    await redis_client.config_set("maxmemory-policy", "volatile-lru")  # evicts the records, which expire

    async def not_ready():
        async with http.get(f"{base}/readyz") as resp:
            return resp.status == 503
    await until(not_ready)


async def test_redis_without_aof_is_one_warning(served, http, redis_client, caplog):
    await redis_client.config_set("appendonly", "no")
    base = await served()
    await asyncio.sleep(CHECK * 6)
    [line] = lines(caplog, "without AOF")
    assert "lost if Redis crashes" in line
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200  # a warning, not a refusal
    async with http.post(f"{base}/x", data=b"x", headers=ASYNC) as resp:
        assert resp.status == 202


async def test_the_source_checks_too(redis_url, redis_client, caplog):
    await redis_client.config_set("maxmemory-policy", "allkeys-random")
    await redis_client.config_set("appendonly", "no")
    settings = SourceSettings(redis_url=redis_url, health_port=0, redis_check_interval=CHECK)
    source = Source(settings)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(CHECK * 6)
        with pytest.raises(Exception, match="maxmemory-policy allkeys-random"):
            await source.ready()
        assert len(lines(caplog, "maxmemory-policy allkeys-random")) == 1
        assert len(lines(caplog, "without AOF")) == 1
        await redis_client.config_set("maxmemory-policy", "noeviction")
        await asyncio.sleep(CHECK * 4)
        await source.ready()
    finally:
        source.stop()
        await asyncio.wait_for(task, 10)
