"""The throwaway Redis Cluster the local stack and the tests run on: three masters that share the
slots, keep serving theirs while one is down, and take a killed master back with its data."""

from __future__ import annotations

import time

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from async_component.local.rediscluster import SLOTS, RedisCluster, slot_ranges


def test_slot_ranges_cover_every_slot_once_and_evenly() -> None:
    for masters in (1, 2, 3, 5):
        ranges = slot_ranges(masters)
        assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
        assert all(high + 1 == low for (_, high), (low, _) in zip(ranges, ranges[1:]))
        sizes = [high - low + 1 for low, high in ranges]
        assert max(sizes) - min(sizes) <= 1


def _tags_on_each_master(cluster: RedisCluster, client: ClusterClient) -> dict[int, str]:
    """One hash tag per master, found by asking the cluster which slot a tag hashes to."""
    found: dict[int, str] = {}
    for n in range(1000):
        tag = f"default/service-{n}"
        index = cluster.index_of_slot(client.keyslot(f"{{{tag}}}"))
        found.setdefault(index, tag)
        if len(found) == len(cluster.nodes):
            return found
    raise AssertionError("no tag for some master")


def _client(cluster: RedisCluster) -> ClusterClient:
    return cluster.cluster_client(asynchronous=False, socket_timeout=2)


def test_three_masters_share_the_keys_and_survive_one_down(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert redis_cluster.url.count(",") == 2
    client = _client(redis_cluster)
    try:
        tags = _tags_on_each_master(redis_cluster, client)
        for index, tag in tags.items():
            client.set(f"{{{tag}}}:k", f"on-{index}")
        # Each master holds exactly the key whose tag hashes to its slots.
        for index, tag in tags.items():
            with redis_cluster.client(index) as node:
                assert node.dbsize() == 1
                assert node.get(f"{{{tag}}}:k") == f"on-{index}".encode()

        time.sleep(1.2)  # appendfsync everysec: what a kill -9 keeps is what was fsynced
        redis_cluster.kill(1)
        with redis_cluster.client(0) as node:
            assert node.get(f"{{{tags[0]}}}:k") == b"on-0"
        with pytest.raises(redis.ConnectionError):
            with redis_cluster.client(1) as node:
                node.ping()
        # The others go on serving their own slots once they have marked it failed (no full coverage
        # needed; with it, they would answer CLUSTERDOWN for every key).
        dead = f"127.0.0.1:{redis_cluster.nodes[1].port}"
        deadline = time.monotonic() + 15
        with redis_cluster.client(2) as node:
            while "fail" not in node.cluster("NODES")[dead]["flags"].split(","):
                assert time.monotonic() < deadline, "the masters never marked the killed one failed"
                time.sleep(0.1)
        with redis_cluster.client(2) as node:
            node.set(f"{{{tags[2]}}}:while-down", "yes")
            assert node.get(f"{{{tags[2]}}}:while-down") == b"yes"

        redis_cluster.restart(1)
        with redis_cluster.client(1) as node:
            assert node.get(f"{{{tags[1]}}}:k") == b"on-1"
    finally:
        client.close()
