"""Scenarios that need a real cluster: Knative's own config and its RedisStreamSource.

Collected only with ``--backend kourier`` or ``--backend istio`` (see conftest).
"""

from __future__ import annotations

import aiohttp
import pytest

from backend import SERVICE_CONDITIONAL, SERVICE_PLAIN, Backend
from client import Client
from kind import switches


@pytest.fixture
async def client(backend: Backend):
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield Client(backend, session)


async def test_async_class_as_cluster_default_makes_unannotated_services_conditionally_async(backend, client):
    with switches.async_by_default(backend):
        accepted = await client.request(SERVICE_PLAIN, "GET", "/default-class?sleep=0", prefer_async=True)
        assert accepted.status == 202, accepted.body
        final, _ = await client.follow(SERVICE_PLAIN, accepted)
        assert final.status == 200
        sync = await client.request(SERVICE_PLAIN, "GET", "/default-class-sync?sleep=0")
        assert sync.status == 200
    reply = await client.request(SERVICE_PLAIN, "GET", "/restored?sleep=0", prefer_async=True)
    assert reply.status == 200  # the default class is back: the header is ignored again


async def test_knative_redis_stream_source_delivers_instead_of_ours(backend, client):
    with switches.redis_stream_source(backend):
        accepted = await client.request(SERVICE_CONDITIONAL, "POST", "/via-rss?sleep=0&tag=x", data=b"payload",
                                        prefer_async=True)
        assert accepted.status == 202, accepted.body
        final, _ = await client.follow(SERVICE_CONDITIONAL, accepted, timeout=120)
        assert final.status == 200
        echo = final.json()
        assert echo["path"] == "/via-rss" and echo["query_string"] == "sleep=0&tag=x"
        assert echo["body_length"] == len(b"payload")
