"""Fixtures shared by unit and integration tests: a real redis-server per test."""

from __future__ import annotations

import aiohttp
import pytest
import redis.asyncio as aioredis

from async_component.local.redisserver import RedisServer


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http():
    """A client session that hands back bodies exactly as sent (no decompression)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
