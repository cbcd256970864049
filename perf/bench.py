"""Component benchmarks, measured side by side in one run and reported as ratios.

1. producer acceptance: wrk POSTs 1 KiB bodies to the producer (its own HTTP/1.1
   server on httptools, real Redis) and to a bare aiohttp handler, with 1 and 2
   worker processes each;
2. drain: queued requests per second moved from the stream to the app (the source
   replaying in-process, as the local stack and the manifests run it), against direct
   sync calls through the gateway; the requests are queued while the source is stopped
   (SIGSTOP) and the drain is timed from letting it go on;
3. added latency: 202 -> final record for an app that answers at once, minus a
   direct sync call, one request at a time;
4. memory: Redis bytes per queued 1 KiB request, and the producer's, source's and
   consumer's resident memory with 10,000 and 100,000 requests queued;
5. fairness: 500 requests of 10 s to one Service, then 20 to another whose app answers
   at once: that one's 202 -> final p50 and max (again with 64 hung requests instead);
6. many Services: 1,000 Services with 10 queued requests each drained, against one
   Service with as many (queued first, then timed, as in 2);
7. the client API: accept throughput with a new ``Idempotency-Key`` on every request
   against none, and ``Prefer: respond-async, wait=10`` answered with the app's response
   against a sync call, one at a time;
8. Redis Cluster: the producer and the drain on one redis-server against a 3-master
   cluster, and keys per master for 1,000 Services (perf/bench_cluster.py);
9. large bodies: the producer's and the source's peak memory under 120 requests of
   5.5 MB at once to three Services, against their manifests' memory limits
   (perf/bench_bodies.py).

Everything runs on 127.0.0.1 (a throwaway redis-server, the producer, and the local
stack); the table goes to perf/results/bench-<UTC timestamp>/ (markdown and JSON)
and to stdout. Numbers depend on the machine and on what else runs on it: the
load average is recorded with the results.

    python perf/bench.py [--only 1,3,7] [--seconds 15] [--workers 1,2]

A missed target is printed as MISSED, on its own line, after the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import redis
from multidict import CIMultiDictProxy

import figures
import machine
import servers
import wrk
from async_component.cli import HelpFormatter
from async_component.dataplane.enqueuer import Enqueuer
from async_component.dataplane.envelope import Envelope
from async_component.dataplane.queues import Layout
from async_component.dataplane.records import Record, record_key
from async_component.local.redisserver import RedisServer
from async_component.settings import DEFAULT_KEY_PREFIX, DEFAULT_STREAM
from figures import Figure, at_least, at_most, ratio

RESULTS = Path(__file__).resolve().parent / "results"
KIB = 1024
MIB = 1024 * 1024
SYNC_SERVICE = "helloworld-sleep"
OTHER_SERVICE = "helloworld-sleep-always"


def queue_stream(target_host: str) -> str:
    """The stream the producer queues ``target_host``'s requests in."""
    return Layout(DEFAULT_KEY_PREFIX, DEFAULT_STREAM).for_host(target_host).stream


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- 1. producer acceptance


def bench_producer(seconds: float, worker_counts: list[int], rounds: int = 3) -> tuple[list[Figure], list[str]]:
    """Bare handler and producer run side by side, loaded in alternating rounds, so a burst of
    load from elsewhere on the machine hits both rather than one."""
    found: list[Figure] = []
    notes: list[str] = []
    with RedisServer() as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        for workers in worker_counts:
            threads = min(workers, 2)  # one wrk thread cannot saturate two workers
            client.flushall()
            with servers.bare(workers) as bare, servers.producer(redis_server.url, workers) as producer:
                progress(f"1. wrk -> bare aiohttp and producer, {workers} worker(s), "
                         f"{rounds} alternating rounds of {seconds / rounds:.0f} s each")
                for server in (bare, producer):  # connections, script load, first batches: not counted
                    wrk.run(server.url + "/", seconds=2, threads=threads)
                base_rounds, producer_rounds = [], []
                base_cpu, producer_cpu, redis_cpu = [0.0], [0.0], [0.0]
                queued = 0
                for _ in range(rounds):
                    with cpu_used(bare.pid) as used:
                        base_rounds.append(wrk.run(bare.url + "/", seconds=seconds / rounds, threads=threads))
                    base_cpu[0] += used[0]
                    emptied(client)
                    with cpu_used(producer.pid) as used, cpu_used(redis_server.process.pid) as used_by_redis:
                        producer_rounds.append(wrk.run(producer.url + "/", seconds=seconds / rounds, threads=threads))
                    producer_cpu[0] += used[0]
                    redis_cpu[0] += used_by_redis[0]
                    queued += client.xlen(queue_stream(wrk.DEFAULT_TARGET))
                base, result = wrk.combine(base_rounds), wrk.combine(producer_rounds)
            client.flushall()
            label = f"1 producer, {workers} worker{'s' if workers > 1 else ''}"
            share = ratio(result.rate, base.rate)
            floor = 1.0 if workers == 1 else 0.8  # one worker must keep up with a bare handler (issue #12)
            found += [
                Figure(label, "throughput, 1 KiB POST, 64 connections", result.rate, "req/s",
                       f"bare aiohttp {base.rate:,.0f} req/s (p99 {base.p99_ms:.1f} ms), same run", share,
                       f">= {floor:g} x bare", at_least(share, floor)),
                Figure(label, "p99 latency", result.p99_ms, "ms",
                       f"archived Go producer p99 7-11 ms; bare {base.p99_ms:.1f} ms", None, "<= 10 ms",
                       at_most(result.p99_ms, 10.0)),
                Figure(label, "202s acknowledged by Redis (stream entries / 202s)", queued, "requests",
                       f"{result.requests:,} answers, {result.errors} errors", ratio(queued, result.requests),
                       ">= 1.0 and no errors", queued >= result.requests and result.errors == 0),
            ]
            notes.append(f"{label}: p50 {result.p50_ms:.2f} ms, max {result.max_ms:.1f} ms; "
                         f"bare p50 {base.p50_ms:.2f} ms, max {base.max_ms:.1f} ms; rounds (producer/bare req/s): "
                         + ", ".join(f"{p.rate:,.0f}/{b.rate:,.0f}" for p, b in zip(producer_rounds, base_rounds))
                         + f"; CPU per request: producer {per_request_us(producer_cpu, result.requests)} µs + "
                         f"redis-server {per_request_us(redis_cpu, result.requests)} µs, "
                         f"bare {per_request_us(base_cpu, base.requests)} µs")
        client.close()
    return found, notes


def emptied(client: redis.Redis, timeout: float = 60.0) -> None:
    """Redis as a round finds it: nothing queued, and an append-only file rewritten to match.

    Rounds of wrk against the producer queue ~150 MB each with no source draining it. Left in place, every
    round met a larger dataset than the one before, so Redis's AOF rewrites (each a fork of the whole
    dataset, then a child writing it on the same two cores) grew through the run and fell on whichever
    side was loaded then: benchmark 7's ratio read 0.76-0.85 from run to run, and 0.78-0.84 with each
    round started this way (0.806-0.810 in longer runs of a harness; perf/profiling.md).
    """
    deadline = time.monotonic() + timeout

    def rewritten() -> None:
        while True:
            persistence = client.info("persistence")
            if not (persistence.get("aof_rewrite_in_progress") or persistence.get("aof_rewrite_scheduled")):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis did not finish rewriting its AOF within {timeout:g} s")
            time.sleep(0.05)

    rewritten()  # one Redis started on its own, as the last round grew the file
    client.flushall()
    for _ in range(5):
        try:
            client.bgrewriteaof()
            break
        except redis.ResponseError as exc:  # Redis started one on its own since: let it end, then ask again
            if "already in progress" not in str(exc):
                raise
            rewritten()
    rewritten()


@contextlib.contextmanager
def cpu_used(pid: int) -> Iterator[list[float]]:
    """CPU seconds ``pid`` and its descendants used inside the block (read from the list afterwards)."""
    used: list[float] = []
    before = machine.cpu_seconds(pid)
    yield used
    used.append(machine.cpu_seconds(pid) - before)


def per_request_us(used: list[float], requests: int) -> str:
    return f"{used[0] * 1e6 / requests:.0f}" if requests else "-"


# --- 4a. Redis bytes per queued request (no source: entries stay queued)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def fill(url: str, client: redis.Redis, stream: str, total: int, *, path: str = "/",
         target_host: str = wrk.DEFAULT_TARGET, limit_seconds: float = 90) -> int:
    """Queue 1 KiB requests through the producer at ``url`` until ``stream`` holds about ``total``.

    wrk runs for its whole ``-d`` even once every thread stopped, so it runs in
    short rounds, each capped at what is still missing.
    """
    deadline = time.monotonic() + limit_seconds
    while (missing := total - client.xlen(stream)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stream} holds {total - missing:,} of {total:,} requests after {limit_seconds:.0f} s")
        wrk.run(url + path, seconds=1, max_requests=missing, target_host=target_host)
    return client.xlen(stream)


def bench_storage(size: int) -> tuple[list[Figure], list[str]]:
    with RedisServer() as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        with servers.producer(redis_server.url, 1) as producer:
            empty = used_memory(client)
            progress(f"4. queueing {size:,} requests of 1 KiB with no source running")
            stream = queue_stream(wrk.DEFAULT_TARGET)
            queued = fill(producer.url, client, stream, size)
            per_request = (used_memory(client) - empty) / queued
            stream_bytes = client.memory_usage(stream, samples=0) / queued
        client.close()
    return [
        Figure("4 storage", f"Redis memory per queued 1 KiB request ({queued:,} queued)", per_request, "B",
               "1 KiB body", ratio(per_request, KIB), "<= 1.5 KiB (1,536 B)", at_most(per_request, 1.5 * KIB)),
    ], [f"4: MEMORY USAGE of the stream / entries {stream_bytes:,.0f} B (Redis's estimate); "
        f"no status record is written until the consumer starts the request"]


def rss_figure(label: str, rss: dict[int, int], small: int, large: int) -> Figure:
    growth = ratio(rss[large], rss[small])
    return Figure("4 memory", f"{label} RSS with {large:,} queued", rss[large] / MIB, "MiB",
                  f"{rss[small] / MIB:.1f} MiB with {small:,} queued", growth,
                  "no growth with the queue (<= 1.1 x)", at_most(growth, 1.1))


# --- the local stack (2, 3, 4b)


APP_LOG_LEVEL = "INFO"
"""The sample app logs a line per request in every benchmark's stack, the components nothing (WARNING): the app did
so whatever the stack's level until 2026-12-01, when the issues' targets were set and every result before was
measured. Benchmark 2 also drains in as many stacks with the app quiet (``QUIET_APP``), each right after a judged
one, where a request costs the stack less on both sides and the drain's own cost weighs more."""

QUIET_APP = "WARNING"


@contextlib.contextmanager
def local_stack(*, replay_in_source: bool = True, app_dir: Path | None = None, redis_cluster: int = 0,
                app_log_level: str = APP_LOG_LEVEL) -> Iterator:
    """The stack as ``async-component local`` runs it, or (False) with the source posting to the consumer;
    ``redis_cluster``: on a Redis Cluster of that many masters; ``app_log_level``: the sample app's."""
    from async_component.local.stack import LocalStack
    from async_component.local.ports import free_port

    progress("starting the local stack" + ("" if replay_in_source else ", the source posting to the consumer")
             + (f", on a {redis_cluster}-master Redis Cluster" if redis_cluster else ""))
    stack = LocalStack(port=free_port(), sleep_seconds=0, log_level="WARNING", app_log_level=app_log_level,
                       replay_in_source=replay_in_source,
                       app_dir=app_dir, redis_cluster=redis_cluster)
    with stack:
        yield stack


class StackClient:
    """The bench's view of a running stack: HTTP through the gateway, Redis beside it."""

    def __init__(self, stack, session: aiohttp.ClientSession, client) -> None:
        self.stack = stack
        self.session = session
        self.redis = client
        self.host = stack.host(SYNC_SERVICE)
        self.prefix = getattr(stack, "key_prefix", DEFAULT_KEY_PREFIX)
        self.layout = Layout(self.prefix, getattr(stack, "stream", DEFAULT_STREAM),
                             cluster=getattr(stack, "redis_cluster", None) is not None)
        self.cluster_domain = getattr(stack, "cluster_domain", "cluster.local")

    def target(self, service: str) -> str:
        """The host a Service's requests are queued for (Async-Original-Host)."""
        return f"{service}.default.svc.{self.cluster_domain}"

    async def call(self, *, prefer_async: bool = False, path: str = "/?sleep=0",
                   service: str = SYNC_SERVICE) -> tuple[int, CIMultiDictProxy[str]]:
        headers = {"Host": self.stack.host(service), **({"Prefer": "respond-async"} if prefer_async else {})}
        async with self.session.get(self.stack.gateway_url + path, headers=headers) as response:
            await response.read()
            return response.status, response.headers

    async def accept(self, path: str = "/?sleep=0", service: str = SYNC_SERVICE) -> tuple[str, float]:
        """An async request: its id and the wall-clock time its 202 arrived."""
        status, headers = await self.call(prefer_async=True, path=path, service=service)
        arrived = time.time()
        if status != 202:
            raise RuntimeError(f"expected 202 from {service} with Prefer: respond-async, got {status}")
        return headers["Async-Request-Id"], arrived

    async def record(self, request_id: str, service: str = SYNC_SERVICE) -> Record | None:
        raw = await self.redis.get(record_key(self.prefix, request_id, self.target(service)))
        return None if raw is None else Record.from_json(raw)

    async def final_record(self, request_id: str, timeout: float = 30.0, interval: float = 0.0005,
                           service: str = SYNC_SERVICE) -> Record:
        deadline = time.monotonic() + timeout
        while (record := await self.record(request_id, service)) is None or not record.finished:
            if time.monotonic() > deadline:
                raise RuntimeError(f"request {request_id} not finished after {timeout:g}s: {record}")
            await asyncio.sleep(interval)
        return record


@contextlib.asynccontextmanager
async def stack_client(stack, connections: int = 64):
    import redis.asyncio as aioredis

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        if getattr(stack, "redis_cluster", None) is not None:
            client = stack.redis_cluster.cluster_client()
        else:
            client = aioredis.Redis.from_url(stack.redis_url)
        try:
            yield StackClient(stack, session, client)
        finally:
            await client.aclose()


# --- 2. drain


async def sync_rate(client: StackClient, count: int, concurrency: int) -> float:
    """Sync calls per second through the gateway, ``concurrency`` at a time."""
    left = iter(range(count))

    async def worker() -> None:
        for _ in left:
            status, _ = await client.call()
            if status != 200:
                raise RuntimeError(f"sync call answered {status}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def drain_rate(client: StackClient, count: int, target_hosts: list[str], timeout: float, *,
                     queued_first: bool = False, measured: Callable[[], contextlib.AbstractContextManager] | None = None
                     ) -> tuple[float, int]:
    """Queue ``count`` envelopes at once, spread over ``target_hosts`` (as the producer writes them: each in its
    Service's queue), and time until all are finished.

    ``queued_first``: queue them all while the stack's source is stopped (SIGSTOP), then time the drain from
    letting it go on (SIGCONT): queued requests drained per second, without this process's own enqueueing
    competing with the source for the 2 cores. Otherwise (the method before 2026-11-30, 21:30 UTC) the clock
    starts before the first enqueue. ``measured``: a context (say, CPU counters) around the timed part alone.
    """
    redis_client, layout = client.redis, client.layout
    envelopes = [Envelope.new("GET", f"http://{target_hosts[n % len(target_hosts)]}/?sleep=0", [("Accept", "*/*")],
                              b"") for n in range(count)]
    hosts = [e.url.split("/")[2] for e in envelopes]
    streams = list(dict.fromkeys(layout.for_host(host).stream for host in hosts))  # in the order queued
    enqueuer = Enqueuer(redis_client, layout=layout, max_queued=count + 1)

    async def enqueue() -> None:
        for chunk in range(0, count, 1000):
            await asyncio.gather(*(enqueuer.enqueue(layout.for_host(host), envelope.to_json()) for host, envelope
                                   in zip(hosts[chunk:chunk + 1000], envelopes[chunk:chunk + 1000])))
        await enqueuer.close()

    with contextlib.ExitStack() as timed:
        if queued_first:
            with source_stopped(client.stack):
                await enqueue()
                if measured is not None:
                    timed.enter_context(measured())
                started = time.perf_counter()
        else:
            if measured is not None:
                timed.enter_context(measured())
            started = time.perf_counter()
            await enqueue()
        deadline = time.monotonic() + timeout
        streams, left = await queued_in(redis_client, streams)
        while streams:
            if time.monotonic() > deadline:
                raise RuntimeError(f"about {left:,} of {count:,} requests still queued after {timeout:g}s")
            # half the time the rate so far says is left, within 2-50 ms: a few dozen looks (~0.25 ms of this
            # process's CPU each) for a drain of seconds, the end seen within ~2 ms of it
            seconds = time.perf_counter() - started
            await asyncio.sleep(min(0.05, max(0.002, seconds * left / max(1, count - left) / 2)))
            streams, left = await queued_in(redis_client, streams)
        elapsed = time.perf_counter() - started
    succeeded = 0
    mget = getattr(redis_client, "mget_nonatomic", redis_client.mget)  # a cluster's records are in many slots
    for chunk in range(0, count, 1000):
        raws = await mget([record_key(client.prefix, e.id, host) for e, host in
                                        zip(envelopes[chunk:chunk + 1000], hosts[chunk:chunk + 1000])])
        succeeded += sum(1 for raw in raws if raw is not None and Record.from_json(raw).state == "succeeded")
    return count / elapsed, succeeded


@contextlib.contextmanager
def source_stopped(stack) -> Iterator[None]:
    """The stack's source stopped (SIGSTOP) inside the block, and let go on (SIGCONT) as it ends, whatever happens."""
    pid = stack.pid("source")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


FIRST_QUEUED = """
for i, stream in ipairs(KEYS) do
  local length = redis.call('XLEN', stream)
  if length > 0 then return {i, length} end
end
return {0, 0}
"""
"""The position of the first of KEYS that holds entries (0: none does), and how many it holds."""


async def queued_in(redis_client, streams: list[str]) -> tuple[list[str], int]:
    """The streams that may still hold entries, from the first that does, and about how many entries they hold.

    A drained stream stays drained (nothing is queued meanwhile), so each look drops those found drained
    and costs this process and Redis little however many streams there are: a script over at most 50 of
    them, which answers the first holding entries and its length (so the estimate is that length times the
    streams left). On a cluster, whose streams are in many slots, one XLEN each in a pipeline (exact).
    """
    if not hasattr(redis_client, "mget_nonatomic"):  # one redis-server
        while streams:
            first, length = await redis_client.eval(FIRST_QUEUED, len(streams[:50]), *streams[:50])
            if first:
                return streams[first - 1:], length * (len(streams) - first + 1)
            streams = streams[50:]
        return [], 0
    left, total = [], 0
    for chunk in range(0, len(streams), 1000):
        async with redis_client.pipeline(transaction=False) as pipe:
            for stream in streams[chunk:chunk + 1000]:
                pipe.xlen(stream)
            lengths = await pipe.execute()
        total += sum(lengths)
        left += [stream for stream, length in zip(streams[chunk:chunk + 1000], lengths) if length]
    return left, total


SYNC_CONCURRENCY = 32
"""Sync calls in flight in the drain comparison: the source's default CONCURRENCY."""


async def measure_drain(client: StackClient, count: int, how: str) -> tuple[float, float, list[str], float]:
    """Sync calls per second, then queued requests drained per second (queued first, then timed), with notes on
    both and on the drain timed from the first enqueue (the method before 2026-11-30, 21:30 UTC)."""
    request_id, _ = await client.accept()
    target_host = (await client.final_record(request_id)).host
    stack = client.stack
    progress(f"2. {count:,} sync calls through the gateway, {SYNC_CONCURRENCY} at a time")
    with cpu_per_request(stack, count) as sync_cpu:
        sync = await sync_rate(client, count, SYNC_CONCURRENCY)
    progress(f"2. draining {count:,} requests queued while the source was stopped ({how})")
    drain_cpu: dict[str, float] = {}
    drained, succeeded = await drain_rate(client, count, [target_host], timeout=120, queued_first=True,
                                          measured=lambda: cpu_per_request(stack, count, drain_cpu))
    progress(f"2. draining {count:,} requests timed from the first enqueue, the method before ({how})")
    while_cpu: dict[str, float] = {}
    while_queued, succeeded_while = await drain_rate(client, count, [target_host], timeout=120,
                                                     measured=lambda: cpu_per_request(stack, count, while_cpu))
    if succeeded != count or succeeded_while != count:
        raise RuntimeError(f"only {succeeded:,} and {succeeded_while:,} of {count:,} drained requests were "
                           "recorded as succeeded")
    return sync, drained, [
        f"2 ({how}): {succeeded:,} of {count:,} drained requests recorded as succeeded; CPU ms per request, "
        f"sync calls: {fmt_cpu(sync_cpu)}; drain (queued first): {fmt_cpu(drain_cpu)}",
        f"2 ({how}): timed from the first enqueue, the bench's enqueueing competing with the drain (as before "
        f"2026-11-30, 21:30 UTC, but with the new look for drained streams): {while_queued:,.0f} req/s = {ratio(while_queued, sync):.2f} x sync; "
        f"CPU ms per request: {fmt_cpu(while_cpu)}",
    ], drain_cpu.get("source", 0.0) * 1000


def drain_figure(count: int, how: str, drained: float, sync: float, judged: bool) -> Figure:
    share = ratio(drained, sync)
    return Figure("2 drain", f"queued requests delivered to the app, {how} ({count:,} queued first, then timed; app answers at once)",
                  drained, "req/s",
                  f"sync calls through the gateway {sync:,.0f} req/s ({SYNC_CONCURRENCY} at a time), same run", share,
                  ">= 0.8 x sync" if judged else "", at_least(share, 0.8) if judged else None)


DRAIN_STACKS = 3
"""Fresh stacks the judged drain is measured in, each against its own sync calls. Every process seeds its string
hashing at random when it starts, and one seed runs the gateway ~25 % slower than another (perf/profiling.md,
"Hash seeds"), which moved one stack's ratio by up to 0.08: one stack is one draw, the figure is the median
stack's, and the notes give every stack's."""

HOW_IN_PROCESS = "the source replaying in-process"


async def drain_in_fresh_stack(count: int, app_log_level: str = APP_LOG_LEVEL
                               ) -> tuple[float, float, list[str], float]:
    """:func:`measure_drain` in a stack of its own (benchmark 2's other draws)."""
    with local_stack(app_log_level=app_log_level) as stack:
        async with stack_client(stack) as client:
            return await measure_drain(client, count, HOW_IN_PROCESS)


def median_draw(draws: list[tuple[float, float, list[str], float]], what: str = HOW_IN_PROCESS
                ) -> tuple[float, float, float, str]:
    """The draw whose drain / sync ratio is the median (sync rate, drain rate, source µs), and a note on all."""
    ordered = sorted(draws, key=lambda draw: ratio(draw[1], draw[0]))
    sync, drained, _, source_us = ordered[len(ordered) // 2]
    return sync, drained, source_us, (
        f"2 ({what}): drain / sync in {len(draws)} fresh stacks, in the order run: "
        + ", ".join(f"{ratio(d, s):.2f} ({d:,.0f} / {s:,.0f} req/s, source {us:.0f} µs)" for s, d, _, us in draws)
        + "; the figures are the median stack's")


def quiet_app_drain(draws: list[tuple[float, float, list[str], float]], count: int) -> tuple[list[Figure], list[str]]:
    """Benchmark 2 in stacks whose app logs nothing per request (context, not judged: see APP_LOG_LEVEL), each run
    right after a judged stack, so that both see the machine alike: the median stack's figure, and every stack's."""
    sync, drained, _, summary = median_draw(draws, "the app quiet")
    notes = [f"quiet stack {n}: 2 (the app quiet): {note}" for n, draw in enumerate(draws, 1) for note in draw[2]]
    return [Figure("2 drain", f"the same, the app logging nothing per request ({count:,} queued first, then timed)",
                   drained, "req/s", f"sync calls through the gateway {sync:,.0f} req/s, same stack",
                   ratio(drained, sync), "", None)], [*notes, summary]


async def bench_drain_and_latency(stack, count: int, samples: int,
                                  others: list[tuple[float, float, list[str], float]] = ()) -> tuple[list[Figure], list[str]]:
    """``others``: :func:`drain_in_fresh_stack` draws made before, judged with this stack's."""
    how = HOW_IN_PROCESS
    async with stack_client(stack) as client:
        draw = await measure_drain(client, count, how)
        progress(f"3. {samples} sync calls, then {samples} async calls, one at a time")
        sync_ms, async_ms, seen_ms = await added_latency(client, samples)
    notes = []
    for n, other in enumerate(others, 1):
        notes += [f"stack {n}: {note}" for note in other[2]]
    notes += [f"stack {len(others) + 1}: {note}" for note in draw[2]] if others else list(draw[2])
    sync, drained, source_us, summary = median_draw([*others, draw])
    notes.append(summary)
    added = statistics.median(async_ms) - statistics.median(sync_ms)
    return [
        drain_figure(count, how, drained, sync, judged=True),
        Figure("2 drain", "the source's CPU per delivery, recording the outcome included", source_us, "µs",
               "the source process's CPU time over the drain / requests", None, "<= 150 µs",
               at_most(source_us, 150.0)),
        Figure("3 added latency", "median 202 -> final record, one at a time", statistics.median(async_ms), "ms",
               f"median sync call {statistics.median(sync_ms):.2f} ms", None, "", None),
        Figure("3 added latency", "async minus sync (medians)", added, "ms", "", None, "<= 5 ms", at_most(added, 5.0)),
    ], [
        *notes,
        f"3: p90 202 -> final record {quantile(async_ms, 0.9):.2f} ms, sync p90 {quantile(sync_ms, 0.9):.2f} ms; "
        f"the client polling Redis saw the final state after a median {statistics.median(seen_ms):.2f} ms",
    ]


COMPONENTS = ("gateway", "app", "producer", "source", "consumer", "redis")


@contextlib.contextmanager
def cpu_per_request(stack, count: int, result: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    """CPU milliseconds per request spent by each process of the stack, and by this one (the client), in
    ``result`` (a new dict by default) once the block ends."""
    def snapshot() -> dict[str, float]:
        found = {name: machine.cpu_seconds(stack.pid(name)) for name in COMPONENTS}
        found["bench process"] = machine.cpu_seconds(os.getpid(), with_descendants=False)
        return found

    result = {} if result is None else result
    before = snapshot()
    yield result
    after = snapshot()
    result.update({name: (after[name] - before[name]) * 1000 / count for name in before})


def fmt_cpu(per_request: dict[str, float]) -> str:
    parts = [f"{name} {ms:.2f}" for name, ms in per_request.items() if ms >= 0.005]
    return ", ".join(parts) + f" (total {sum(per_request.values()):.2f})"


def quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- 3. added latency


async def added_latency(client: StackClient, samples: int) -> tuple[list[float], list[float], list[float]]:
    """Sync call times, and for async ones: 202 -> the consumer's final write, and 202 -> the client saw it."""
    for _ in range(10):  # warm connections and code paths
        await client.call()
    sync_ms = []
    for _ in range(samples):
        started = time.perf_counter()
        status, _ = await client.call()
        sync_ms.append((time.perf_counter() - started) * 1000)
    async_ms, seen_ms = [], []
    for _ in range(samples):
        request_id, arrived = await client.accept()
        record = await client.final_record(request_id)
        seen_ms.append((time.time() - arrived) * 1000)
        async_ms.append((record.updated_at - arrived) * 1000)
    return sync_ms, async_ms, seen_ms


# --- 4b. resident memory with a long queue


async def bench_drain_via_consumer(stack, count: int) -> tuple[list[Figure], list[str]]:
    """The RedisStreamSource topology: context for the judged in-process figure, not judged itself."""
    how = "the source posting CloudEvents to the consumer"
    async with stack_client(stack) as client:
        sync, drained, notes, _ = await measure_drain(client, count, how)
    return [drain_figure(count, how, drained, sync, judged=False)], notes


def bench_queue_memory(stack, sizes: tuple[int, int], components: dict[str, str]) -> list[Figure]:
    """Fill the stack's queue with requests the app sleeps on, so it stays full, and read the RSS of
    ``components`` (process name -> label)."""
    small, large = sizes
    client = redis.Redis.from_url(stack.redis_url)
    target_host = asyncio.run(_target_host(stack))
    rss: dict[str, dict[int, int]] = {component: {} for component in components}
    for size in sizes:
        progress(f"4. queueing {size:,} requests the app sleeps on, {', '.join(components)} measured")
        fill(stack.producer_url, client, queue_stream(target_host), size, path="/?sleep=600", target_host=target_host)
        time.sleep(1.0)
        for component in rss:
            rss[component][size] = machine.rss_bytes(stack.pid(component))
    client.close()
    return [rss_figure(components[component], values, small, large) for component, values in rss.items()]


async def _target_host(stack) -> str:
    async with stack_client(stack) as client:
        request_id, _ = await client.accept()
        return (await client.final_record(request_id)).host


# --- 5. fairness


async def flood_then_measure(stack, flood: int, flood_path: str, others: int) -> list[float]:
    """Accept ``flood`` requests to one Service, then ``others`` to another; seconds from each of those 202s
    to its outcome being recorded."""
    async with stack_client(stack) as client:
        progress(f"5. {flood} requests {flood_path} to {SYNC_SERVICE}, then {others} to {OTHER_SERVICE}")
        await asyncio.gather(*(client.accept(flood_path) for _ in range(flood)))

        async def one() -> float:
            """From sending the request (its 202 can reach this busy client after the outcome is recorded)."""
            sent = time.time()
            request_id, _ = await client.accept(service=OTHER_SERVICE)
            record = await client.final_record(request_id, timeout=300, interval=0.01, service=OTHER_SERVICE)
            return record.updated_at - sent

        return list(await asyncio.gather(*(one() for _ in range(others))))


def fairness_figures(label: str, seconds: list[float]) -> list[Figure]:
    p50, worst = statistics.median(seconds), max(seconds)
    return [
        Figure("5 fairness", f"{label}: the other Service's request -> final, p50", p50, "s",
               f"{len(seconds)} requests, app answers at once", None, "<= 0.5 s", at_most(p50, 0.5)),
        Figure("5 fairness", f"{label}: the other Service's request -> final, max", worst, "s",
               "one source, default settings", None, "<= 2 s", at_most(worst, 2.0)),
    ]


def bench_fairness() -> tuple[list[Figure], list[str]]:
    found = []
    for label, flood, path in (("500 x 10 s queued", 500, "/?sleep=10"), ("64 hung", 64, "/?sleep=3600")):
        with local_stack() as stack:  # a fresh stack each: the flood outlives the measurement
            found += fairness_figures(label, asyncio.run(flood_then_measure(stack, flood, path, 20)))
    return found, ["5: today's single stream took 160 s (issue #12) for the first scenario"]


# --- 6. many Services


def many_services_app_dir(services: int) -> Path:
    """test/app with ``services`` more conditionally async Services, all served by the one sample app."""
    import shutil
    import tempfile

    from async_component.local.cluster import find_app_dir

    folder = Path(tempfile.mkdtemp(prefix="bench-app-"))
    source = find_app_dir()
    for path in source.iterdir():
        if path.suffix in (".py", ".yml"):
            shutil.copy(path, folder / path.name)
    for n in range(services):
        (folder / f"bench-{n}.yml").write_text(
            f"apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: bench-{n}\n"
            f"  namespace: default\n  annotations:\n"
            f"    networking.knative.dev/ingress.class: async.ingress.networking.knative.dev\n"
            f"spec:\n  template:\n    spec:\n      containers:\n        - image: dev.local/helloworld-sleep:0.1.0\n")
    return folder


async def drain_many(stack, services: int, each: int) -> tuple[dict[str, float], list[str]]:
    """Drain rates of ``services * each`` requests for one Service and spread over ``services``: queued first, then
    timed (as judged), and timed from the first enqueue (the method before 2026-11-30, 21:30 UTC); with notes."""
    count = services * each
    rates: dict[str, float] = {}
    notes = []
    async with stack_client(stack) as client:
        spreads = (("one", [client.target(SYNC_SERVICE)]), ("many", [client.target(f"bench-{n}") for n in range(services)]))
        for queued_first in (True, False):
            how = "queued first" if queued_first else "timed from the first enqueue, the method before"
            for label, hosts in spreads:
                progress(f"6. draining {count:,} requests queued for {len(hosts):,} Service(s), {how}")
                cpu: dict[str, float] = {}
                rate, succeeded = await drain_rate(client, count, hosts, timeout=300, queued_first=queued_first,
                                                   measured=lambda: cpu_per_request(stack, count, cpu))
                if succeeded != count:
                    raise RuntimeError(f"drained requests recorded as succeeded: {succeeded:,} of {count:,}")
                rates[(label, queued_first)] = rate
                notes.append(f"6 ({len(hosts):,} Service(s) x {count // len(hosts):,}, {how}): {rate:,.0f} req/s; "
                             f"CPU ms per request: {fmt_cpu(cpu)}")
    old = ratio(rates[("many", False)], rates[("one", False)])
    notes.append(f"6: timed from the first enqueue (as before 2026-11-30, 21:30 UTC, but with the new look for drained "
                 f"streams), many / one = {old:.2f}")
    return rates, notes


def bench_many_services(services: int = 1000, each: int = 10) -> tuple[list[Figure], list[str]]:
    import shutil

    folder = many_services_app_dir(services)
    try:
        with local_stack(app_dir=folder) as stack:
            rates, notes = asyncio.run(drain_many(stack, services, each))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    one, many = rates[("one", True)], rates[("many", True)]
    share = ratio(many, one)
    return [Figure("6 many Services", f"drain, {services:,} Services x {each} queued (queued first, then timed)",
                   many, "req/s", f"one Service with {services * each:,} queued {one:,.0f} req/s, same run", share,
                   ">= 0.8 x one Service", at_least(share, 0.8))], notes


# --- 7. the client API: Idempotency-Key's cost at accept, Prefer: wait's added latency


def bench_idempotency(seconds: float, rounds: int = 3) -> tuple[list[Figure], list[str]]:
    """One producer, loaded in alternating rounds with and without a new Idempotency-Key on every request."""
    with RedisServer() as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        with servers.producer(redis_server.url, 1) as producer:
            progress(f"7. wrk -> producer with and without Idempotency-Key, {rounds} alternating rounds of "
                     f"{seconds / rounds:.0f} s each")
            for keys in (False, True):
                wrk.run(producer.url + "/", seconds=2, keys=keys)
            plain_rounds, keyed_rounds = [], []
            cpu = {True: [0.0, 0.0], False: [0.0, 0.0]}  # producer, redis-server
            for n in range(rounds):
                # ABBA: neither side always comes second, after the other has warmed or loaded the machine
                for keys in ((False, True) if n % 2 == 0 else (True, False)):
                    emptied(client)
                    with cpu_used(producer.pid) as used, cpu_used(redis_server.process.pid) as used_by_redis:
                        (keyed_rounds if keys else plain_rounds).append(
                            wrk.run(producer.url + "/", seconds=seconds / rounds, keys=keys))
                    cpu[keys][0] += used[0]
                    cpu[keys][1] += used_by_redis[0]
                    if keys:
                        keyed_queued = client.xlen(queue_stream(wrk.DEFAULT_TARGET))
                        key_bytes = client.memory_usage(next(client.scan_iter(match="*:idem:*", count=1000)),
                                                        samples=0)
            plain, keyed = wrk.combine(plain_rounds), wrk.combine(keyed_rounds)
        client.close()
    share = ratio(keyed.rate, plain.rate)
    return [
        Figure("7 client API", "throughput with a new Idempotency-Key on every request, 1 worker", keyed.rate,
               "req/s", f"without a key {plain.rate:,.0f} req/s, same run", share, ">= 0.8 x without",
               at_least(share, 0.8) and keyed.errors == 0),
    ], [f"7: with keys p50 {keyed.p50_ms:.2f} ms, p99 {keyed.p99_ms:.1f} ms, {keyed.errors} errors; without "
        f"p50 {plain.p50_ms:.2f} ms, p99 {plain.p99_ms:.1f} ms; the last keyed round queued {keyed_queued:,} "
        f"requests for {keyed_rounds[-1].requests:,} answers (every key new); one key costs Redis about "
        f"{key_bytes} B; CPU per request with keys: producer {per_request_us(cpu[True][:1], keyed.requests)} µs + "
        f"redis-server {per_request_us(cpu[True][1:], keyed.requests)} µs, without: producer "
        f"{per_request_us(cpu[False][:1], plain.requests)} µs + redis-server {per_request_us(cpu[False][1:], plain.requests)} µs"]


async def wait_latency(client: StackClient, samples: int) -> tuple[list[float], list[float]]:
    """Sync calls, then ``Prefer: respond-async, wait=10`` calls of the always-async Service, one at a time."""
    always = client.stack.host(OTHER_SERVICE)
    waited_headers = {"Host": always, "Prefer": "respond-async, wait=10"}

    async def waited() -> None:
        async with client.session.get(client.stack.gateway_url + "/?sleep=0", headers=waited_headers) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"a wait=10 call answered {response.status}, not the app's 200")

    for _ in range(10):  # warm connections and code paths
        await client.call()
        await waited()
    sync_ms, wait_ms = [], []
    for _ in range(samples):
        started = time.perf_counter()
        await client.call()
        sync_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await waited()
        wait_ms.append((time.perf_counter() - started) * 1000)
    return sync_ms, wait_ms


async def bench_wait(stack, samples: int) -> tuple[list[Figure], list[str]]:
    async with stack_client(stack) as client:
        progress(f"7. {samples} sync calls and {samples} wait=10 calls, one at a time, interleaved")
        sync_ms, wait_ms = await wait_latency(client, samples)
    added = statistics.median(wait_ms) - statistics.median(sync_ms)
    return [
        Figure("7 client API", "Prefer: respond-async, wait=10 answered with the app's 200, minus a sync call "
               "(medians, app answers at once)", added, "ms",
               f"median sync call {statistics.median(sync_ms):.2f} ms, wait call {statistics.median(wait_ms):.2f} ms",
               None, "<= 5 ms", at_most(added, 5.0)),
    ], [f"7: wait p90 {quantile(wait_ms, 0.9):.2f} ms, sync p90 {quantile(sync_ms, 0.9):.2f} ms"]




# --- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Component benchmarks on 127.0.0.1, reported as ratios. "
                                     "Exits 1 when a target is missed (after writing the results).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9", help="comma-separated benchmarks to run (1-9)")
    parser.add_argument("--seconds", type=float, default=15.0, help="wrk duration per producer/bare run")
    parser.add_argument("--workers", default="1,2", help="producer (and bare handler) worker counts to compare")
    parser.add_argument("--drain", type=int, default=5000, help="requests queued at once for the drain benchmark")
    parser.add_argument("--samples", type=int, default=200, help="one-at-a-time requests for the added latency")
    parser.add_argument("--queue", default="10000,100000", help="the two queue lengths of the memory benchmark")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where bench-<timestamp>/ goes")
    parser.add_argument("--quiet-load", type=float, default=0,
                        help="first wait (up to 10 min) until the 1-minute load average is below this; 0: start at once")
    args = parser.parse_args(argv)
    try:
        args.only = {int(x) for x in args.only.split(",")}
        args.workers = [int(x) for x in args.workers.split(",")]
        args.queue = tuple(int(x) for x in args.queue.split(","))
    except ValueError:
        parser.error("--only, --workers and --queue take comma-separated integers")
    if not args.only <= {1, 2, 3, 4, 5, 6, 7, 8, 9} or len(args.queue) != 2 or args.queue[0] >= args.queue[1]:
        parser.error("--only takes 1-9; --queue takes two increasing lengths")
    return args


def run(args: argparse.Namespace) -> tuple[list[Figure], list[str]]:
    found: list[Figure] = []
    notes: list[str] = []

    def step(result: tuple[list[Figure], list[str]] | list[Figure]) -> None:
        more, extra = result if isinstance(result, tuple) else (result, [])
        found.extend(more)
        notes.extend(extra)

    if 1 in args.only:
        step(bench_producer(args.seconds, args.workers))
    if 7 in args.only:
        step(bench_idempotency(args.seconds))
    if 4 in args.only:
        step(bench_storage(args.queue[0]))
    others, quiet = [], []
    if 2 in args.only:
        for n in range(1, DRAIN_STACKS):
            progress(f"2. stack {n} of {DRAIN_STACKS}")
            others.append(asyncio.run(drain_in_fresh_stack(args.drain)))
            progress(f"2. a stack whose app logs nothing per request, {n} of {DRAIN_STACKS}")
            quiet.append(asyncio.run(drain_in_fresh_stack(args.drain, QUIET_APP)))
    if args.only & {2, 3, 4, 7}:
        with local_stack() as stack:
            if args.only & {2, 3}:
                if 2 in args.only:
                    progress(f"2. stack {DRAIN_STACKS} of {DRAIN_STACKS}")
                measured, more = asyncio.run(bench_drain_and_latency(stack, args.drain, args.samples, others))
                step(([f for f in measured if int(f.bench[0]) in args.only], more))
            if 7 in args.only:
                step(asyncio.run(bench_wait(stack, args.samples)))
            if 4 in args.only:  # last: it leaves the app sleeping on requests
                step(bench_queue_memory(stack, args.queue, {"producer": "producer",
                                                            "source": "source (replaying in-process)"}))
    if 2 in args.only:
        progress(f"2. a stack whose app logs nothing per request, {DRAIN_STACKS} of {DRAIN_STACKS}")
        quiet.append(asyncio.run(drain_in_fresh_stack(args.drain, QUIET_APP)))
        step(quiet_app_drain(quiet, args.drain))
    if args.only & {2, 4}:
        with local_stack(replay_in_source=False) as stack:
            if 2 in args.only:
                step(asyncio.run(bench_drain_via_consumer(stack, args.drain)))
            if 4 in args.only:
                step(bench_queue_memory(stack, args.queue, {"consumer": "consumer (replaying the source's events)"}))
    if 5 in args.only:
        step(bench_fairness())
    if 6 in args.only:
        step(bench_many_services())
    if 8 in args.only:
        import bench_cluster

        step(bench_cluster.run(args.seconds, args.drain))
    if 9 in args.only:
        import bench_bodies

        step(bench_bodies.run())
    return found, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quiet_load:
        machine.wait_for_quiet(args.quiet_load, 600)
    started = machine.utc_now()
    facts = machine.facts(started)
    clock = time.monotonic()
    found, notes = run(args)
    found.sort(key=lambda f: f.bench[0])  # by benchmark number, in the order measured within one
    facts["load after the run (this run included)"] = machine.load()
    facts["duration"] = f"{time.monotonic() - clock:.0f} s"
    facts["command"] = "python perf/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    folder = args.results / f"bench-{machine.stamp(started)}"
    folder.mkdir(parents=True, exist_ok=True)
    text = figures.report_markdown("Component benchmarks", facts, found, notes)
    (folder / "bench.md").write_text(text)
    (folder / "bench.json").write_text(figures.to_json(found, facts) + "\n")
    print(text)
    print(f"results: {folder}/bench.md and bench.json")
    for figure in figures.missed(found):
        print(f"MISSED: {figure.bench}: {figure.name}: {figures.fmt_value(figure.value, figure.unit)}"
              f" (target {figure.target})", file=sys.stderr)
    if status := figures.exit_status(found):
        print(f"bench: MISSED {len(figures.missed(found))} target(s): {figures.summary_line(found)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
