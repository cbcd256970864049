"""The Redis address our CloudEvents name, as RedisStreamSource's ADDRESS would."""

from __future__ import annotations

import pytest

from async_component.dataplane.redisconn import redis_address
from async_component.settings import RedisSettings


@pytest.mark.parametrize("url, address", [
    ("redis://redis.redis.svc.cluster.local:6379/0", "redis://redis.redis.svc.cluster.local:6379/0"),
    ("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"),
    ("redis://redis:6379", "redis://redis:6379"),
    ("redis://:s3cret@redis:6379/0", "redis://redis:6379/0"),
    ("rediss://default:s3cret@redis.example.com:6380/1", "rediss://redis.example.com:6380/1"),
    ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
])
def test_redis_address_keeps_the_database_never_credentials(url, address):
    assert redis_address(RedisSettings(redis_url=url)) == address
