"""Benchmark 8, Redis Cluster (issue #17): one redis-server against a 3-master cluster, in one run.

- the producer (1 worker) loaded by wrk with requests for three Services, one on
  each master, on one server and on the cluster, in alternating rounds;
- the drain of requests queued for 30 Services, the source replaying in-process,
  on the local stack with one server and with the cluster;
- keys per master once 1,000 Services have each had a request queued: the spread
  should be even within 20 % of the mean.

Run through ``python perf/bench.py --only 8``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import aiohttp

import servers
import wrk
from async_component.dataplane.queues import slot_of
from async_component.local.rediscluster import RedisCluster, slot_ranges
from async_component.local.redisserver import RedisServer
from async_component.protocol import ORIGINAL_HOST_HEADER
from figures import Figure, ratio

BENCH = "8 Redis Cluster"
MASTERS = 3
DRAIN_SERVICES = 30
SPREAD_SERVICES = 1000


def service_host(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


def hosts_one_per_master(masters: int = MASTERS) -> list[str]:
    """Hosts of Services whose queues hash to each master of an evenly split cluster, in master order."""
    ranges = slot_ranges(masters)
    found: dict[int, str] = {}
    for n in itertools.count():
        slot = slot_of(f"default/bench-{n}")
        master = next(i for i, (low, high) in enumerate(ranges) if low <= slot <= high)
        found.setdefault(master, service_host(f"bench-{n}"))
        if len(found) == masters:
            return [found[i] for i in range(masters)]
    raise AssertionError("unreachable")


def _queued(client, hosts: list[str]) -> int:
    """Entries in the Services' queues (the producer's 202s that Redis holds)."""
    from bench import queue_stream

    return sum(client.xlen(queue_stream(host)) for host in hosts)


def bench_producer(seconds: float, rounds: int = 3) -> tuple[list[Figure], list[str]]:
    from bench import cpu_used, per_request_us, progress

    hosts = hosts_one_per_master()
    with RedisServer() as single, RedisCluster(MASTERS) as cluster, \
            servers.producer(single.url, 1) as one, servers.producer(cluster.url, 1) as many:
        progress(f"8. wrk -> producer on one redis-server and on a {MASTERS}-master cluster, {rounds} alternating "
                 f"rounds of {seconds / rounds:.0f} s each, requests for {len(hosts)} Services (one a master)")
        for server in (one, many):
            wrk.run(server.url + "/", seconds=2, target_hosts=hosts)
        import redis

        single_client = redis.Redis.from_url(single.url)
        cluster_client = cluster.cluster_client(asynchronous=False)
        warm = (_queued(single_client, hosts), _queued(cluster_client, hosts))
        one_rounds, many_rounds = [], []
        cpu = {"producer": [0.0], "redis-server": [0.0], "producer on the cluster": [0.0], "the masters": [0.0]}
        for _ in range(rounds):
            with cpu_used(one.pid) as used, cpu_used(single.process.pid) as by_redis:
                one_rounds.append(wrk.run(one.url + "/", seconds=seconds / rounds, target_hosts=hosts))
            cpu["producer"][0] += used[0]
            cpu["redis-server"][0] += by_redis[0]
            with contextlib.ExitStack() as stack:
                used = stack.enter_context(cpu_used(many.pid))
                by_masters = [stack.enter_context(cpu_used(node.process.pid)) for node in cluster.nodes]
                many_rounds.append(wrk.run(many.url + "/", seconds=seconds / rounds, target_hosts=hosts))
            cpu["producer on the cluster"][0] += used[0]
            cpu["the masters"][0] += sum(m[0] for m in by_masters)
        base, result = wrk.combine(one_rounds), wrk.combine(many_rounds)
        queued = _queued(cluster_client, hosts) - warm[1]
        single_client.close()
        cluster_client.close()
    share = ratio(result.rate, base.rate)
    figures = [
        Figure(BENCH, f"producer throughput, 1 worker, 1 KiB POST, 64 connections, {len(hosts)} Services (one a master)",
               result.rate, "req/s", f"one redis-server {base.rate:,.0f} req/s (p99 {base.p99_ms:.1f} ms), same run",
               share, "", None),
        Figure(BENCH, "producer p99 latency on the cluster", result.p99_ms, "ms",
               f"one redis-server {base.p99_ms:.1f} ms", None, "", None),
        Figure(BENCH, "202s acknowledged by the cluster (stream entries / 202s)", queued, "requests",
               f"{result.requests:,} answers, {result.errors} errors", ratio(queued, result.requests),
               ">= 1.0 and no errors", queued >= result.requests and result.errors == 0),
    ]
    notes = [f"8 producer: CPU per request on one server: producer {per_request_us(cpu['producer'], base.requests)} µs"
             f" + redis-server {per_request_us(cpu['redis-server'], base.requests)} µs; on the cluster: producer "
             f"{per_request_us(cpu['producer on the cluster'], result.requests)} µs + the masters "
             f"{per_request_us(cpu['the masters'], result.requests)} µs; p50 {base.p50_ms:.2f} / {result.p50_ms:.2f} ms"]
    return figures, notes


async def _drain(stack, count: int) -> float:
    from bench import drain_rate, stack_client

    async with stack_client(stack) as client:
        rate, succeeded = await drain_rate(client, count, [client.target(f"bench-{n}") for n in range(DRAIN_SERVICES)],
                                           timeout=300)
    if succeeded != count:
        raise RuntimeError(f"only {succeeded:,} of {count:,} drained requests were recorded as succeeded")
    return rate


def bench_drain(count: int) -> tuple[list[Figure], list[str]]:
    import shutil

    from bench import local_stack, many_services_app_dir, progress

    folder = many_services_app_dir(DRAIN_SERVICES)
    rates = {}
    try:
        for masters in (0, MASTERS):
            with local_stack(app_dir=folder, redis_cluster=masters) as stack:
                progress(f"8. draining {count:,} requests queued for {DRAIN_SERVICES} Services"
                         + (f" on a {masters}-master cluster" if masters else " on one redis-server"))
                rates[masters] = asyncio.run(_drain(stack, count))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [Figure(BENCH, f"drain, {count:,} queued over {DRAIN_SERVICES} Services, the source replaying in-process",
                   rates[MASTERS], "req/s", f"one redis-server {rates[0]:,.0f} req/s, same run",
                   ratio(rates[MASTERS], rates[0]), "", None)], []


async def _one_request_each(url: str, services: int) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        async def send(n: int) -> int:
            headers = {ORIGINAL_HOST_HEADER: service_host(f"bench-{n}"), "Prefer": "respond-async"}
            async with session.post(url + "/", data=b"x" * 1024, headers=headers) as response:
                await response.read()
                return response.status
        return await asyncio.gather(*(send(n) for n in range(services)))


def bench_key_spread(services: int = SPREAD_SERVICES) -> tuple[list[Figure], list[str]]:
    from bench import progress

    with RedisCluster(MASTERS) as cluster, servers.producer(cluster.url, 1) as producer:
        progress(f"8. one request queued for each of {services:,} Services on a {MASTERS}-master cluster")
        statuses = asyncio.run(_one_request_each(producer.url, services))
        if statuses.count(202) != services:
            raise RuntimeError(f"expected {services:,} 202s, got {sorted(set(statuses))}")
        counts = []
        for index in range(MASTERS):
            with cluster.client(index) as node:
                counts.append(node.dbsize())
    mean = sum(counts) / len(counts)
    spread = max(abs(c - mean) for c in counts) / mean
    return [Figure(BENCH, f"keys per master, {services:,} Services with a request queued each", max(counts), "keys",
                   f"per master {', '.join(f'{c:,}' for c in counts)}; mean {mean:,.0f}", ratio(max(counts), mean),
                   "every master within 20 % of the mean", spread <= 0.2)], []


def run(seconds: float, drain: int) -> tuple[list[Figure], list[str]]:
    found: list[Figure] = []
    notes: list[str] = []
    for figures, more in (bench_producer(seconds), bench_drain(drain), bench_key_spread()):
        found += figures
        notes += more
    return found, notes
