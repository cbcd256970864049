"""The Redis address our CloudEvents name, as RedisStreamSource's ADDRESS would."""

from __future__ import annotations

import pytest

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from async_component.dataplane.redisconn import make_redis, redis_address
from async_component.settings import RedisSettings


@pytest.mark.parametrize("url, address", [
    ("redis://redis.redis.svc.cluster.local:6379/0", "redis://redis.redis.svc.cluster.local:6379/0"),
    ("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"),
    ("redis://redis:6379", "redis://redis:6379"),
    ("redis://:s3cret@redis:6379/0", "redis://redis:6379/0"),
    ("rediss://default:s3cret@redis.example.com:6380/1", "rediss://redis.example.com:6380/1"),
    ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("redis+cluster://user:s3cret@10.0.0.1:7000,10.0.0.2:7000", "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"),
])
def test_redis_address_keeps_the_database_never_credentials(url, address):
    assert redis_address(RedisSettings(redis_url=url)) == address


@pytest.mark.parametrize("url, cluster, nodes", [
    ("redis://127.0.0.1:6379/0", False, None),
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", True, [("10.0.0.1", 7000), ("10.0.0.2", 7001)]),
    ("redis+cluster://redis-cluster", True, [("redis-cluster", 6379)]),
])
def test_a_cluster_url_builds_redis_pys_cluster_client_with_every_node_to_start_from(url, cluster, nodes):
    client = make_redis(RedisSettings(redis_url=url))
    assert isinstance(client, RedisCluster if cluster else Redis)
    if cluster:
        assert [(node.host, node.port) for node in client.nodes_manager.startup_nodes.values()] == nodes


def test_a_cluster_urls_credentials_are_used_and_win_over_the_separate_ones():
    client = make_redis(RedisSettings(redis_url="redis+cluster://alice:p%40ss@10.0.0.1:7000",
                                      redis_username="bob", redis_password="other"))
    kwargs = client.get_connection_kwargs()
    assert (kwargs["username"], kwargs["password"]) == ("alice", "p@ss")
