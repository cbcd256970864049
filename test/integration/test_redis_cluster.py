"""The data plane on a Redis Cluster of three masters (redis-server processes on loopback, no replicas).

A producer (``REDIS_URL=redis+cluster://...``) and a source delivering
in-process serve Services whose keys hash to different masters, through one
gateway-like server that tells the Services apart by their Host header.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.crc import key_slot
from redis.exceptions import OutOfMemoryError

from async_component.dataplane import idempotency, producer, sink
from async_component.dataplane.envelope import Envelope, binary_event
from async_component.dataplane.records import record_key
from async_component.dataplane.redischeck import RedisCheck, RedisEvicts
from async_component.dataplane.redisconn import make_redis
from async_component.dataplane.replay import Replayer
from async_component.local.ports import free_port
from async_component.local.rediscluster import RedisCluster
from async_component.protocol import POLICY_HEADER, STATUS_PATH_PREFIX, DeliveryPolicy
from async_component.settings import ConsumerSettings, ProducerSettings, RedisSettings, ReplaySettings, SourceSettings

from .aioserve import serve
from .scripted import LOOPBACK_TARGETS, ScriptedServer, serving
from .sourcerun import eventually, has, running, source_process

DEAD_LETTERS = "async-requests-dead"


class Gateway(ScriptedServer):
    """Every Service's replays: ``/status/<code>`` answers that code, ``/hang`` is held (then 503), ``/held/...``
    held (then 200), anything else 200 with the Service's name and the path."""

    async def record(self, request: web.Request) -> tuple[str, str]:
        return request.headers["Host"].split(".")[0], request.path_qs

    async def handle(self, request: web.Request) -> web.Response:
        service, path = await self.record(request)
        self.seen.append((service, path))
        if request.path == "/hang" or self.hold:
            await self.release.wait()
            return web.Response(status=503)
        if request.path.startswith("/held/"):  # answered once released
            await self.release.wait()
        status = int(request.path.rsplit("/", 1)[1]) if request.path.startswith("/status/") else 200
        self.answered.append(((service, path), status))
        return web.Response(status=status, text=f"{service} {path}")


@pytest.fixture(scope="module")
def cluster():
    """Three masters shared by the module's tests; those that stop a master use their own (``redis_cluster``)."""
    with RedisCluster(3) as local:
        yield local


def host(service: str) -> str:
    return f"{service}.default.svc.cluster.local"


def services_on_each_master(local: RedisCluster, prefix: str) -> list[str]:
    """One Service name per master, the i-th on the i-th master."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < len(local.nodes):
        name = f"{prefix}-{n}"
        found.setdefault(local.index_of_slot(key_slot(f"{{default/{name}}}".encode())), name)
        n += 1
    return [found[i] for i in range(len(local.nodes))]


@contextlib.asynccontextmanager
async def data_plane(url: str, gateway: Gateway, *, source: bool = True, source_options: dict | None = None,
                     **changes):
    """A producer on a free port (yields its base URL) and, unless ``source`` is False, a source replaying
    in-process through ``gateway`` (``Source(..., **source_options)``)."""
    common = dict(redis_url=url, **LOOPBACK_TARGETS)
    settings = ProducerSettings(port=free_port(), host="127.0.0.1", **common)
    server = producer.make_server(settings)
    await server.start(settings.host, settings.port)
    source_settings = SourceSettings(health_port=0, visibility_timeout=2.0, retry_base_delay=0.05,
                                     retry_max_delay=0.1, target_gateway_url=gateway.url.rstrip("/"),
                                     consumer_name=f"source-{time.monotonic_ns()}", **common)
    try:
        if source:
            async with running(dataclasses.replace(source_settings, **changes), **(source_options or {})):
                yield f"http://127.0.0.1:{settings.port}"
        else:
            yield f"http://127.0.0.1:{settings.port}"
    finally:
        await server.close()


class Client:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base, self.session = base, session

    async def post(self, service: str, path: str, **headers: str) -> aiohttp.ClientResponse:
        async with self.session.post(self.base + path, headers={"Async-Original-Host": host(service),
                                                                "Prefer": "respond-async", **headers}) as response:
            await response.read()
            return response

    async def accept(self, service: str, path: str, **headers: str) -> str:
        response = await self.post(service, path, **headers)
        assert response.status == 202, await response.text()
        return response.headers["Location"]

    async def status(self, service: str, location: str, method: str = "GET") -> tuple[int, str, bytes]:
        async with self.session.request(method, self.base + location,
                                        headers={"Async-Original-Host": host(service)}) as response:
            return response.status, response.headers.get("Async-Request-State", ""), await response.read()

    async def finish(self, service: str, location: str, timeout: float = 15.0) -> tuple[int, str, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            status, state, body = await self.status(service, location)
            if status != 202:
                return status, state, body
            assert time.monotonic() < deadline, f"{service} {location} still {state}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def client_of(base: str):
    async with aiohttp.ClientSession() as session:
        yield Client(base, session)


def request_id(location: str) -> str:
    return location.removeprefix(STATUS_PATH_PREFIX).rpartition(".")[2]


async def nodes_holding(local: RedisCluster, key: str) -> list[int]:
    """Which of the cluster's nodes hold ``key``: SCAN of each node's own keys (a read of a key would be MOVED)."""
    holding = []
    for i, url in enumerate(local.node_urls):
        node = aioredis.Redis.from_url(url)
        try:
            if [found async for found in node.scan_iter(match=key)]:
                holding.append(i)
        finally:
            await node.aclose()
    return holding


@pytest.fixture
async def gateway():
    async with serving(Gateway()) as server:
        yield server


async def test_services_on_different_masters_are_each_served_end_to_end(cluster, gateway):
    services = services_on_each_master(cluster, "served")
    async with data_plane(cluster.url, gateway) as base, client_of(base) as client:
        locations = await asyncio.gather(*(client.accept(service, f"/hello/{n}")
                                           for n in range(5) for service in services))
        finals = await asyncio.gather(*(client.finish(services[n % 3], location)
                                        for n, location in enumerate(locations)))
        assert [(status, state) for status, state, _ in finals] == [(200, "succeeded")] * 15
        assert {body for _, _, body in finals} == {f"{s} /hello/{n}".encode() for n in range(5) for s in services}
        # each Service's record is on its own master
        for i, service in enumerate(services):
            key = record_key("async", request_id(locations[i]), host(service))
            assert await nodes_holding(cluster, key) == [i]


async def test_the_per_service_cap_and_round_robin_hold_across_masters(cluster, gateway):
    """A hung Service on each master: each holds its own 2 slots of the source's 8, no more, no fewer."""
    services = services_on_each_master(cluster, "capped")
    async with data_plane(cluster.url, gateway, concurrency=8, max_inflight_per_service=2) as base, \
            client_of(base) as client:
        held = [(service, await client.accept(service, f"/hang?n={n}")) for n in range(4) for service in services]
        deadline = time.monotonic() + 10
        while len(gateway.seen) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # room for a seventh, which must not come
        assert sorted(service for service, _ in gateway.seen) == sorted(services * 2)
        gateway.release.set()  # each ends failed (503 to every attempt), leaving the cluster empty for the others
        assert {(await client.finish(service, location))[1] for service, location in held} == {"failed"}


async def test_idempotency_cancel_and_wait_work_on_a_cluster(cluster, gateway):
    first, second, third = services_on_each_master(cluster, "features")
    url = cluster.url
    async with data_plane(url, gateway, source=False) as base, client_of(base) as client:
        # no source yet: these stay queued
        keyed = await client.accept(first, "/keyed", **{"Idempotency-Key": '"abc"'})
        assert await client.accept(first, "/keyed", **{"Idempotency-Key": '"abc"'}) == keyed
        again = await client.post(first, "/other", **{"Idempotency-Key": '"abc"'})
        assert again.status == 422
        canceled = await client.accept(second, "/canceled", **{"Idempotency-Key": "withdrawn"})
        status, state, _ = await client.status(second, canceled, "DELETE")
        assert (status, state) == (200, "canceled")
    keys = [(0, idempotency.key_name("async", host(first), "abc")),
            (1, idempotency.key_name("async", host(second), "withdrawn"))]
    assert [await key_ttl(cluster, i, key) for i, key in keys] == [-1, -1]  # pending: no expiry
    async with data_plane(url, gateway) as base, client_of(base) as client:
        waited = await client.post(third, "/waited", Prefer="respond-async, wait=10")
        assert waited.status == 200
        assert await waited.text() == f"{third} /waited"
        assert (await client.finish(first, keyed))[:2] == (200, "succeeded")
        assert (await client.status(second, canceled))[:2] == (410, "canceled")
        deadline = time.monotonic() + 10  # the canceled entry is settled (and its key kept) by the source
        while await key_ttl(cluster, 1, keys[1][1]) < 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert [await key_ttl(cluster, i, key) > 86_000_000 for i, key in keys] == [True, True], "as long as the result"
    assert (first, "/keyed") in gateway.seen and (second, "/canceled") not in gateway.seen
    assert gateway.seen.count((first, "/keyed")) == 1


async def key_ttl(local: RedisCluster, node: int, key: str) -> int:
    """PTTL of ``key`` on the node that holds it."""
    async with aioredis.Redis.from_url(local.node_urls[node]) as client:
        return await client.pttl(key)


async def test_retries_and_dead_letters_on_a_cluster(cluster, gateway):
    services = services_on_each_master(cluster, "failing")[:2]
    async with data_plane(cluster.url, gateway, max_attempts=3) as base, client_of(base) as client:
        locations = [await client.accept(service, "/status/503") for service in services]
        finals = [await client.finish(service, location) for service, location in zip(services, locations)]
    assert [(status, state) for status, state, _ in finals] == [(503, "failed")] * 2  # the last answer, recorded
    assert [gateway.seen.count((service, "/status/503")) for service in services] == [3, 3]
    for i, service in enumerate(services):  # each Service's dead letters are in its own stream, on its master
        stream = f"{DEAD_LETTERS}:{{default/{service}}}"
        assert await nodes_holding(cluster, stream) == [i]
        async with aioredis.Redis.from_url(cluster.node_urls[i]) as node:
            [(_, fields)] = await node.xrange(stream)
        assert fields[b"service"] == f"default/{service}".encode()
        assert fields[b"status"] == b"503"


async def test_completion_events_of_services_on_different_masters_reach_their_sinks(cluster, gateway):
    services = services_on_each_master(cluster, "notified")
    async with serving(Gateway()) as sink:
        policy = DeliveryPolicy(on_success_sink=sink.url.rstrip("/") + "/events").encode()
        async with data_plane(cluster.url, gateway) as base, client_of(base) as client:
            locations = [await client.accept(service, "/notify", **{POLICY_HEADER: policy}) for service in services]
            for service, location in zip(services, locations):
                assert (await client.finish(service, location))[:2] == (200, "succeeded")
            deadline = time.monotonic() + 10
            while len(sink.seen) < len(services) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    assert sorted(sink.seen) == [("127", "/events")] * len(services)


async def test_entries_of_a_killed_source_are_reclaimed_on_every_master(cluster, gateway):
    services = services_on_each_master(cluster, "reclaimed")
    gateway.hold = True  # the first source never gets an answer
    async with data_plane(cluster.url, gateway, source=False) as base, client_of(base) as client:
        locations = [await client.accept(service, "/once") for service in services]
        first = source_process(cluster.url, {"TARGET_GATEWAY_URL": gateway.url.rstrip("/"), "CONSUMER_NAME": "doomed",
                                             "ALLOWED_HOSTS": ",".join(LOOPBACK_TARGETS["allowed_hosts"])})
        try:
            deadline = time.monotonic() + 15
            while len(gateway.seen) < len(services) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sorted(gateway.seen) == sorted((service, "/once") for service in services)
        finally:
            first.kill()
            first.wait()
        gateway.hold = False
        gateway.release.set()
        async with running(SourceSettings(redis_url=cluster.url, health_port=0, visibility_timeout=1.0,
                                          target_gateway_url=gateway.url.rstrip("/"), consumer_name="heir",
                                          **LOOPBACK_TARGETS)):
            finals = [await client.finish(service, location) for service, location in zip(services, locations)]
    assert [(status, state) for status, state, _ in finals] == [(200, "succeeded")] * 3
    assert sorted(seen for seen, _ in gateway.answered) == sorted((service, "/once") for service in services)



async def test_a_wake_up_handled_while_a_full_scan_reads_its_slot_empty_leaves_the_slot_polled(cluster, gateway):
    """The race: a Service's queue drained (its mark gone); a full scan reads its slot's active set empty, and
    meanwhile a new request for it is accepted and its wake-up handled. The queue is served (it woke), but the
    slot must stay among those polled: the request's retry is found only by a poll, and the producer wakes a
    marked queue only once, so otherwise both waited for the read of every slot every 60 s."""
    service = services_on_each_master(cluster, f"raced-{time.monotonic_ns()}")[0]
    member, slot = f"default/{service}", key_slot(f"{{default/{service}}}".encode())
    settings = SourceSettings(redis_url=cluster.url, health_port=0, visibility_timeout=2.0, retry_base_delay=0.5,
                              retry_max_delay=0.5, target_gateway_url=gateway.url.rstrip("/"), consumer_name="raced",
                              **LOOPBACK_TARGETS)
    async with data_plane(cluster.url, gateway, source=False) as base, client_of(base) as client, \
            running(settings) as source:
        assert (await client.finish(service, await client.accept(service, "/first")))[:2] == (200, "succeeded")
        read_slots, raced = source._scan_master, []

        async def scan_racing_a_wake_up(name, slots, full: bool, sweep: bool, now: float):
            found = await read_slots(name, slots, full, sweep, now)
            if full and not raced and slot not in source.busy_slots and member in source.queues:
                state = source.queues[member]  # read empty and dropped: the wake-up comes before the reply
                woken = state.woken
                raced.append(await client.accept(service, "/status/503"))

                async def woke() -> bool:
                    return state.woken > woken
                assert await eventually(woke)
            return found

        source._scan_master = scan_racing_a_wake_up

        async def raced_once() -> bool:
            return bool(raced)
        assert await eventually(raced_once, 15)
        started = time.monotonic()

        async def retried() -> bool:
            return gateway.seen.count((service, "/status/503")) >= 2
        assert await eventually(retried, 15), "the retry waited for the read of every slot"
        assert time.monotonic() - started < 10

async def test_a_source_posting_to_the_consumer_serves_a_cluster_too(cluster, gateway):
    """SINK_URL: the source hands each entry to the consumer as a CloudEvent; the consumer's replay core
    records the outcome, the source settles the entry."""
    services = services_on_each_master(cluster, "posted")
    consumer = ConsumerSettings(redis_url=cluster.url, port=free_port(), host="127.0.0.1",
                                target_gateway_url=gateway.url.rstrip("/"), **LOOPBACK_TARGETS)
    runner = await serve(sink.make_app(consumer), consumer.port, consumer.host)
    try:
        async with data_plane(cluster.url, gateway, sink_url=f"http://127.0.0.1:{consumer.port}/") as base, \
                client_of(base) as client:
            locations = [await client.accept(service, "/posted") for service in services]
            finals = [await client.finish(service, location) for service, location in zip(services, locations)]
    finally:
        await runner.cleanup()
    assert [(status, state) for status, state, _ in finals] == [(200, "succeeded")] * 3
    async with make_redis(RedisSettings(redis_url=cluster.url)) as client:  # settled: the queues are empty
        assert [await client.xlen(f"async:{{default/{service}}}:q") for service in services] == [0, 0, 0]


async def test_an_evicting_master_is_found_among_the_others(cluster):
    check = RedisCheck(make_redis(RedisSettings(redis_url=cluster.url)), 60, who="producer")
    try:
        await check.check()
        assert check.evicting is None and not check.without_aof
        with cluster.client(1) as node:
            node.config_set("maxmemory-policy", "allkeys-lru")
        try:
            await check.check()
            with pytest.raises(RedisEvicts, match="allkeys-lru"):
                check.require()
        finally:
            with cluster.client(1) as node:
                node.config_set("maxmemory-policy", "noeviction")
    finally:
        await check.redis.aclose()


async def test_final_writes_of_one_batch_fail_only_where_their_master_refused(cluster):
    """Two outcomes written in one batch, the first with its completion event: the second's master is out of
    memory. The first is written; the second gets its own error, so its replay answers 503 and comes again."""
    first, second = services_on_each_master(cluster, "refused")[:2]
    replayer = Replayer(ReplaySettings(redis_url=cluster.url), CollectorRegistry())
    await replayer.start()
    keys = [record_key("async", f"r-{service}", host(service)) for service in (first, second)]
    notice = {"data": "{}"}
    try:
        with cluster.client(1) as node:
            node.config_set("maxmemory", 1)
        written = [replayer.sets.submit((key, '{"state": "succeeded"}', None, 60_000, notice if n == 0 else None,
                                         None, True)) for n, key in enumerate(keys)]  # in one loop pass: one batch
        results = await asyncio.gather(*written, return_exceptions=True)
    finally:
        with cluster.client(1) as node:
            node.config_set("maxmemory", 0)
        await replayer.stop()
    assert results[0] is None
    assert isinstance(results[1], OutOfMemoryError)


async def test_a_master_killed_costs_only_its_own_services_their_202s(redis_cluster, gateway):
    alive, also_alive, doomed = services_on_each_master(redis_cluster, "killed")
    url = redis_cluster.url
    async with data_plane(url, gateway, source=False) as base, client_of(base) as client:
        before = [(service, await client.accept(service, "/before")) for service in (alive, doomed)]
    redis_cluster.kill(2)
    async with data_plane(url, gateway) as base, client_of(base) as client:
        # in one batch: the other masters' Services are accepted, the dead master's refused
        answers = await asyncio.gather(*(client.post(service, f"/during/{n}")
                                         for n in range(5) for service in (alive, also_alive, doomed)))
        by_service = {service: [r.status for n, r in enumerate(answers) if n % 3 == i]
                      for i, service in enumerate((alive, also_alive, doomed))}
        assert by_service == {alive: [202] * 5, also_alive: [202] * 5, doomed: [503] * 5}
        accepted = [(service, r.headers["Location"]) for service, r in
                    zip([alive, also_alive, doomed] * 5, answers) if r.status == 202] + before[:1]
        finals = await asyncio.gather(*(client.finish(service, location) for service, location in accepted))
        assert [(status, state) for status, state, _ in finals] == [(200, "succeeded")] * 11
        assert (await client.status(doomed, before[1][1]))[0] == 503  # unreadable while its master is down
        redis_cluster.restart(2)
        # what it had accepted is back (AOF), and found by the source that started while it was down
        assert (await client.finish(doomed, before[1][1], timeout=30))[:2] == (200, "succeeded")
        assert (await client.finish(doomed, await client.accept(doomed, "/after")))[:2] == (200, "succeeded")


async def test_a_hung_master_holds_up_only_its_own_services(redis_cluster, gateway):
    """A master that stops answering (SIGSTOP: connections open, no replies) is not a refusing one: its Services'
    requests wait for it, but the producer's batches of the other masters go on."""
    alive, also_alive, hung = services_on_each_master(redis_cluster, "hung")
    async with data_plane(redis_cluster.url, gateway, source=False) as base, client_of(base) as client:
        for service in (alive, also_alive, hung):
            await client.accept(service, "/first")
        master = redis_cluster.nodes[2].process
        master.send_signal(signal.SIGSTOP)
        try:
            stuck = asyncio.create_task(client.post(hung, "/stuck"))
            await asyncio.sleep(0.2)  # its batch is out, waiting for the hung master
            answers = [await client.post(service, f"/meanwhile/{n}") for n in range(3) for service in (alive, also_alive)]
            assert [response.status for response in answers] == [202] * 6
            assert not stuck.done()
        finally:
            master.send_signal(signal.SIGCONT)
        assert (await stuck).status in (202, 503)  # written, or not known to be: never a 202 for nothing


async def test_a_hung_master_holds_up_no_other_masters_deliveries(redis_cluster, gateway):
    """A source whose work includes a hung master's (a wake-up subscription, reads of its active sets and of its
    Service's queue, the outcomes of its replays) goes on reading, replaying and recording the other masters'
    Services meanwhile. Before, each pass of its loop and each batch of outcomes waited for the hung master (up to
    the socket timeout, here longer than the test), and a wake-up subscription held there heard nothing."""
    alive, also_alive, hung = services_on_each_master(redis_cluster, "stalled")
    redis = make_redis(RedisSettings(redis_url=redis_cluster.url), socket_timeout=60)
    try:
        async with data_plane(redis_cluster.url, gateway, source_options={"redis": redis}) as base, \
                client_of(base) as client:
            for service in (alive, also_alive, hung):  # every master known to the source, its scripts loaded
                assert (await client.finish(service, await client.accept(service, "/first")))[:2] == (200, "succeeded")
            # within the source's bound of entries held: past it, what waits for the hung master's writes would
            # hold back every read until the socket timeout
            held = [await client.accept(hung, f"/held/{n}") for n in range(12)]
            assert await eventually(lambda: has(gateway.seen, 4))
            master = redis_cluster.nodes[2].process
            master.send_signal(signal.SIGSTOP)
            try:
                gateway.release.set()  # the hung master's replays are answered: their outcomes wait for it
                await asyncio.sleep(0.3)
                locations = [(service, await client.accept(service, f"/meanwhile/{n}"))
                             for n in range(5) for service in (alive, also_alive)]
                finals = await asyncio.gather(*(client.finish(service, location, timeout=10)
                                                for service, location in locations))
                assert [(status, state) for status, state, _ in finals] == [(200, "succeeded")] * 10
            finally:
                master.send_signal(signal.SIGCONT)
            # nothing of the hung master's is lost
            assert {(await client.finish(hung, location, timeout=30))[:2] for location in held} == {(200, "succeeded")}
    finally:
        await redis.aclose()


async def test_prefer_wait_is_answered_at_once_whichever_master_hangs(redis_cluster, gateway):
    """A producer hears of finished requests through a subscription; held on one master only, a master that hung
    kept it open and silent, and every `Prefer: wait` request waited its whole time for an outcome it had."""
    services = services_on_each_master(redis_cluster, "awaited")
    redis = make_redis(RedisSettings(redis_url=redis_cluster.url), socket_timeout=60)
    try:
        async with data_plane(redis_cluster.url, gateway, source_options={"redis": redis}) as base, \
                client_of(base) as client:
            for service in services:
                assert (await client.finish(service, await client.accept(service, "/first")))[:2] == (200, "succeeded")
            for hung in range(3):
                service = services[(hung + 1) % 3]
                master = redis_cluster.nodes[hung].process
                master.send_signal(signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    answer = await client.post(service, f"/while-{hung}-hangs", Prefer="respond-async, wait=30")
                    took = time.monotonic() - started
                finally:
                    master.send_signal(signal.SIGCONT)
                assert answer.status == 200, f"master {hung} stopped: {answer.status}"
                assert took < 15, f"master {hung} stopped: answered after {took:.1f}s of its 30"
    finally:
        await redis.aclose()


async def test_after_every_master_restarted_the_first_delivery_is_replayed(redis_cluster, gateway):
    """While every master is down an event is answered 503 (delivered again later), never 400 (which a source
    dead-letters); the connections pooled before the masters restarted are closed, so the first command after
    the restart goes again on a fresh one, rather than answering 503 for a Redis that is back."""
    consumer = ConsumerSettings(redis_url=redis_cluster.url, port=free_port(), host="127.0.0.1",
                                target_gateway_url=gateway.url.rstrip("/"), **LOOPBACK_TARGETS)
    runner = await serve(sink.make_app(consumer), consumer.port, consumer.host)

    async def deliver(session: aiohttp.ClientSession, n: int) -> int:
        envelope = Envelope.new("POST", f"http://{host('restarted')}/event/{n}", [], b"x")
        headers, body = binary_event("redis://redis:6379/async-requests", f"1700000000000-{n}",
                                     envelope.to_stream_fields())
        async with session.post(f"http://127.0.0.1:{consumer.port}/", data=body, headers=headers) as response:
            return response.status

    try:
        async with aiohttp.ClientSession() as session:
            assert await deliver(session, 1) == 200
            for node in redis_cluster.nodes:
                node.kill()
            # the first finds its pooled connection dead; the next ones find no node to ask at all
            # (redis-py's RedisClusterException, which is no RedisError): 503 each time, never 400
            assert [await deliver(session, n) for n in (2, 3, 4)] == [503, 503, 503]
            await asyncio.to_thread(redis_cluster.start)
            assert await deliver(session, 5) == 200
    finally:
        await runner.cleanup()


async def test_a_master_that_lost_its_scripts_serves_while_another_is_down(redis_cluster, gateway):
    """Scripts are sent again to the master that lost them (it restarted), not loaded on every master first."""
    alive, _, doomed = services_on_each_master(redis_cluster, "reloaded")
    async with data_plane(redis_cluster.url, gateway) as base, client_of(base) as client:
        assert (await client.finish(alive, await client.accept(alive, "/before")))[:2] == (200, "succeeded")
        redis_cluster.kill(2)
        with redis_cluster.client(0) as node:
            node.script_flush()
        location = await client.accept(alive, "/after")
        assert (await client.finish(alive, location))[:2] == (200, "succeeded")
        assert (await client.post(doomed, "/refused")).status == 503
