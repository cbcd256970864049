"""Per-Service queues against a real redis-server: fairness, retries first, idle Services, several sources.

Requests are queued the way the producer queues them (:class:`Enqueuer`) for
Services ``<name>.default.svc.cluster.local``; sources replay them in-process
through one gateway-like server (``TARGET_GATEWAY_URL``) that tells the
Services apart by their Host header.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import time

import pytest
from aiohttp import web

from async_component.dataplane.enqueuer import Enqueuer
from async_component.dataplane.envelope import Envelope, envelope_json
from async_component.dataplane.queues import Layout
from async_component.dataplane.records import FAILED, RETRYING, SUCCEEDED, Record, record_key
from async_component.settings import SourceSettings

from .scripted import ScriptedServer, serving
from .sourcerun import DEAD, eventually, running, source_process

LAYOUT = Layout("async", "async-requests")


def host(service: str) -> str:
    return f"{service}.default.svc.cluster.local"


class Gateway(ScriptedServer):
    """Every Service's replays: ``/hang`` is held until released, ``/slow`` waits ``slow`` seconds,
    ``/status/<code>`` answers that (with ``Retry-After`` from the query), anything else 200 at once."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = 1.0
        self.started: list[tuple[str, str, str]] = []
        self.finished: list[tuple[str, str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        seen = (request.headers["Host"].split(".")[0], request.path_qs, request.headers.get("Async-Attempt", ""))
        self.started.append(seen)
        if request.path == "/hang":
            await self.release.wait()
            return web.Response(status=503)
        if request.path == "/slow":
            await asyncio.sleep(self.slow)
        status = 200
        headers = {}
        if request.path.startswith("/status/"):
            status = int(request.path.rsplit("/", 1)[1])
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            if self.statuses:
                status = self.statuses.pop(0)
        self.finished.append(seen)
        return web.Response(status=status, text="done", headers=headers)

    def in_flight(self, service: str) -> int:
        return (sum(1 for s in self.started if s[0] == service)
                - sum(1 for s in self.finished if s[0] == service))


@pytest.fixture
async def gateway():
    async with serving(Gateway()) as server:
        yield server


def settings_for(redis_url: str, gateway: Gateway, **changes) -> SourceSettings:
    base = SourceSettings(redis_url=redis_url, visibility_timeout=1.0, health_port=0, concurrency=8,
                          max_inflight_per_service=2, consumer_name="first", retry_base_delay=0.05,
                          retry_max_delay=0.1, request_timeout=30.0, target_gateway_url=gateway.url.rstrip("/"))
    return dataclasses.replace(base, **changes)


@contextlib.asynccontextmanager
async def enqueuer(redis_client):
    queue = Enqueuer(redis_client, layout=LAYOUT)
    try:
        yield queue
    finally:
        await queue.close()


async def accept(enqueue: Enqueuer, service: str, path: str) -> str:
    """Queue one request as the producer does; its request id."""
    request_id = f"{service}-{path.strip('/').replace('/', '-')}-{time.monotonic_ns()}"
    document = envelope_json(request_id, "GET", f"http://{host(service)}{path}", [], b"", time.time())
    await enqueue.enqueue(LAYOUT.for_host(host(service)), document)
    return request_id


async def record(redis_client, service: str, request_id: str) -> Record | None:
    raw = await redis_client.get(record_key("async", request_id, host(service)))
    return None if raw is None else Record.from_json(raw)


def all_in(redis_client, state: str, requests: list[tuple[str, str]]):
    async def check() -> bool:
        for service, request_id in requests:
            found = await record(redis_client, service, request_id)
            if found is None or found.state != state:
                return False
        return True
    return check


# --- fairness


async def test_a_hung_and_a_slow_service_hold_only_their_own_slots(redis_url, redis_client, gateway):
    gateway.slow = 5.0
    async with enqueuer(redis_client) as enqueue:
        for n in range(10):
            await accept(enqueue, "hung", "/hang")
            await accept(enqueue, "slow", "/slow")
        async with running(settings_for(redis_url, gateway), stop_grace=0.5) as source:
            assert await eventually(lambda: _true(gateway.in_flight("hung") == 2 and gateway.in_flight("slow") == 2))
            hung = {"namespace": "default", "service": "hung"}
            metric = source.registry.get_sample_value
            assert metric("async_service_in_flight", hung) == 2
            assert await eventually(lambda: _true(metric("async_service_queued", hung) == 8))
            assert metric("async_service_oldest_queued_age_seconds", hung) > 0
            quick = [("quick", await accept(enqueue, "quick", f"/q/{n}")) for n in range(10)]
            assert await eventually(all_in(redis_client, SUCCEEDED, quick))
            # the other two are still held at their cap, with their backlogs queued
            assert gateway.in_flight("hung") == 2 and gateway.in_flight("slow") == 2
            assert await redis_client.xlen(LAYOUT.for_host(host("hung")).stream) == 10


async def _true(value: bool) -> bool:
    return value


async def test_services_with_work_are_served_in_turn(redis_url, redis_client, gateway):
    """One source slot: requests of three Services alternate rather than one Service's backlog going first."""
    async with enqueuer(redis_client) as enqueue:
        for service in ("a", "b", "c"):
            for n in range(4):
                await accept(enqueue, service, f"/n/{n}")
        async with running(settings_for(redis_url, gateway, concurrency=1, max_inflight_per_service=1)):
            assert await eventually(lambda: _true(len(gateway.finished) == 12))
    order = [service for service, _, _ in gateway.started]
    assert all(len(set(order[n:n + 3])) == 3 for n in range(0, 12, 3)), order


async def test_large_bodies_are_held_within_body_memory_limit_and_every_service_still_gets_its_turn(
        redis_url, redis_client, gateway):
    """Requests of 300 kB for two Services that hang, with BODY_MEMORY_LIMIT 1 MB: the first Service gets three
    replays (not its cap of four), the second one (it had nothing in flight), and a third Service with small
    requests still gets every one of its requests through; the rest stay queued until bodies are settled."""
    body = b"x" * 300_000
    full_collections = []

    def on_collect(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full_collections.append(info)

    settings = settings_for(redis_url, gateway, max_inflight_per_service=4, body_memory_limit=1_000_000,
                            max_attempts=1)
    async with enqueuer(redis_client) as enqueue:
        async def big(service: str) -> tuple[str, str]:
            request_id = f"{service}-{time.monotonic_ns()}"
            document = envelope_json(request_id, "POST", f"http://{host(service)}/hang", [], body, time.time())
            await enqueue.enqueue(LAYOUT.for_host(host(service)), document)
            return service, request_id
        try:
            async with running(settings, stop_grace=0.1) as source:
                held = [await big("a")]
                assert await eventually(lambda: _true(gateway.in_flight("a") == 1))  # now the source knows its size
                held += [await big("a") for _ in range(5)] + [await big("b") for _ in range(4)]
                assert await eventually(lambda: _true(gateway.in_flight("a") == 3 and gateway.in_flight("b") == 1))
                quick = [("quick", await accept(enqueue, "quick", f"/q/{n}")) for n in range(5)]
                assert await eventually(all_in(redis_client, SUCCEEDED, quick))
                assert (gateway.in_flight("a"), gateway.in_flight("b")) == (3, 1)
                assert 4 * len(body) < source.registry.get_sample_value("async_source_held_bytes") < 5 * len(body)
                gc.callbacks.append(on_collect)
                gateway.release.set()  # each hung replay ends 503: failed (one attempt), and the next ones start
                assert await eventually(all_in(redis_client, FAILED, held), 20)
                assert source.registry.get_sample_value("async_source_held_bytes") == 0
            # 3 MB settled: a full collection each 500 kB (half the limit) frees what cycles held of them
            assert len(full_collections) >= 4
        finally:
            gateway.release.set()
            if on_collect in gc.callbacks:
                gc.callbacks.remove(on_collect)


async def test_entries_reclaimed_from_a_dead_source_do_not_take_it_past_body_memory_limit(
        redis_url, redis_client, gateway):
    """Three requests of 300 kB left pending by a source that died, BODY_MEMORY_LIMIT 1 MB, a cap of four: four more
    arrive when the heir first reclaims, not yet knowing how large its entries are. It reclaims the three and
    reads no fourth while they hang (before: it filled the cap after the reclaim, past the limit); once they end,
    the other four go through."""
    body = b"x" * 300_000
    settings = settings_for(redis_url, gateway, max_inflight_per_service=4, body_memory_limit=1_000_000,
                            max_attempts=1, visibility_timeout=2.0)
    queue = LAYOUT.for_host(host("a"))
    async with enqueuer(redis_client) as enqueue:
        async def big() -> tuple[str, str]:
            request_id = f"a-{time.monotonic_ns()}"
            document = envelope_json(request_id, "POST", f"http://{host('a')}/hang", [], body, time.time())
            await enqueue.enqueue(queue, document)
            return "a", request_id
        held = [await big() for _ in range(3)]
        await redis_client.xgroup_create(queue.stream, settings.group, id="0", mkstream=True)
        [[_, entries]] = await redis_client.xreadgroup(settings.group, "dead", {queue.stream: ">"}, count=3)
        assert len(entries) == 3
        await asyncio.sleep(settings.visibility_timeout)  # the dead source's entries may now be reclaimed
        try:
            async with running(settings, stop_grace=0.1) as source:
                # the heir found only entries held by another: it reclaims on its first read after a quarter of the
                # visibility timeout, and looks at the queue again after the whole of it unless woken
                await asyncio.sleep(settings.visibility_timeout / 2)
                assert gateway.in_flight("a") == 0
                held += [await big() for _ in range(4)]
                assert await eventually(lambda: _true(gateway.in_flight("a") == 3))
                assert source.metrics.reclaimed._value.get() == 3
                await asyncio.sleep(1.0)  # a few reads later
                assert gateway.in_flight("a") == 3
                assert source.registry.get_sample_value("async_source_held_bytes") < 1_000_000
                gateway.release.set()
                assert await eventually(all_in(redis_client, FAILED, held), 20)
            assert len(gateway.started) == 7
        finally:
            gateway.release.set()


# --- retries


async def test_a_due_retry_goes_before_the_services_newer_requests(redis_url, redis_client, gateway):
    queue = LAYOUT.for_host(host("a"))
    retry = Envelope.new("GET", f"http://{host('a')}/the-retry", [], b"", request_id="retried").next_attempt()
    await redis_client.zadd(queue.retries, {retry.to_json(): time.time() - 1})
    await redis_client.zadd(LAYOUT.active, {queue.member: 1.0})
    async with enqueuer(redis_client) as enqueue:
        for n in range(5):
            await accept(enqueue, "a", f"/newer/{n}")
    async with running(settings_for(redis_url, gateway, concurrency=1, max_inflight_per_service=1)):
        assert await eventually(lambda: _true(len(gateway.finished) == 6))
    assert gateway.started[0] == ("a", "/the-retry", "2")
    assert [path for _, path, _ in gateway.started[1:]] == [f"/newer/{n}" for n in range(5)]


async def test_retry_after_of_a_503_sets_the_next_attempts_delay(redis_url, redis_client, gateway):
    gateway.statuses = [503]  # then the path's own status: 200 below
    async with enqueuer(redis_client) as enqueue:
        request_id = await accept(enqueue, "a", "/status/200?retry_after=1")
    settings = settings_for(redis_url, gateway, retry_base_delay=60.0, retry_max_delay=120.0)
    async with running(settings):
        assert await eventually(all_in(redis_client, RETRYING, [("a", request_id)]))
        retrying = await record(redis_client, "a", request_id)
        assert 0.9 <= retrying.next_attempt_at - retrying.updated_at <= 1.1  # not the 60 s backoff
        assert await eventually(all_in(redis_client, SUCCEEDED, [("a", request_id)]))
    assert [attempt for _, _, attempt in gateway.started] == ["1", "2"]


async def test_retry_after_is_capped_by_the_longest_retry_delay(redis_url, redis_client, gateway):
    gateway.statuses = [429]
    async with enqueuer(redis_client) as enqueue:
        request_id = await accept(enqueue, "a", "/status/200?retry_after=3600")
    async with running(settings_for(redis_url, gateway, retry_base_delay=0.1, retry_max_delay=0.5)):
        assert await eventually(all_in(redis_client, RETRYING, [("a", request_id)]))
        retrying = await record(redis_client, "a", request_id)
        assert retrying.next_attempt_at - retrying.updated_at <= 0.5
        assert await eventually(all_in(redis_client, SUCCEEDED, [("a", request_id)]))


async def test_a_request_waiting_for_a_retry_longer_than_the_retention_keeps_its_record(
        redis_url, redis_client, gateway):
    gateway.statuses = [503]
    async with enqueuer(redis_client) as enqueue:
        request_id = await accept(enqueue, "a", "/status/200?retry_after=2")
    key = record_key("async", request_id, host("a"))
    async with running(settings_for(redis_url, gateway, status_retention=0.5, retry_max_delay=5.0)):
        assert await eventually(all_in(redis_client, RETRYING, [("a", request_id)]))
        await asyncio.sleep(1.0)
        assert (await record(redis_client, "a", request_id)).state == RETRYING
        assert await redis_client.ttl(key) == -1  # no expiry while pending
        assert await eventually(all_in(redis_client, SUCCEEDED, [("a", request_id)]))
        assert 0 < await redis_client.pttl(key) <= 500  # one retention after it finished


async def test_a_dead_letter_names_its_service_the_reason_and_the_last_status(redis_url, redis_client, gateway):
    async with enqueuer(redis_client) as enqueue:
        request_id = await accept(enqueue, "a", "/status/400")
    async with running(settings_for(redis_url, gateway)) as source:
        assert await eventually(all_in(redis_client, FAILED, [("a", request_id)]))
    labels = {"namespace": "default", "service": "a"}
    outcomes = {outcome: source.registry.get_sample_value("async_service_outcomes_total", {**labels, "outcome": outcome})
                for outcome in ("failed", "dead_lettered", "succeeded")}
    assert outcomes == {"failed": 1, "dead_lettered": 1, "succeeded": None}
    assert source.registry.get_sample_value("async_service_delivery_latency_seconds_count", labels) == 1
    [(_, dead)] = await redis_client.xrange(DEAD)
    assert dead[b"service"] == b"default/a"
    assert dead[b"status"] == b"400" and dead[b"error"] == b"the Service answered 400"
    assert Envelope.from_stream_fields(dead).id == request_id


# --- idle Services, several sources, crashes


async def test_a_drained_service_leaves_the_active_set_and_idle_services_cost_no_commands(
        redis_url, redis_client, gateway):
    async with enqueuer(redis_client) as enqueue:
        done = [(f"s{n}", await accept(enqueue, f"s{n}", "/once")) for n in range(1000)]
    async with running(settings_for(redis_url, gateway, concurrency=32)):
        assert await eventually(all_in(redis_client, SUCCEEDED, done), 60)
        assert await eventually(lambda: _zero(redis_client.zcard(LAYOUT.active)))
        assert await redis_client.keys("async:*:rq") == []  # no retry streams where no retry came due
        await asyncio.sleep(0.5)
        before = await _commands(redis_client)
        await asyncio.sleep(2.0)
        spent = await _commands(redis_client) - before
    # 1,000 idle Services, each with its stream and group still in Redis: the same few commands a second
    # as with none (looks at the active set and the retry set, the wake stream's blocking read), not one per Service
    assert spent < 100, spent


async def _zero(awaitable) -> bool:
    return await awaitable == 0


async def _commands(redis_client) -> int:
    stats = await redis_client.info("commandstats")
    return sum(value["calls"] for name, value in stats.items()
               if name not in ("cmdstat_info",))


async def test_several_sources_share_a_backlog_over_many_services(redis_url, redis_client, gateway):
    gateway.slow = 0.05
    async with enqueuer(redis_client) as enqueue:
        requests = [(f"s{n % 20}", await accept(enqueue, f"s{n % 20}", "/slow")) for n in range(200)]
    settings = settings_for(redis_url, gateway)
    async with running(dataclasses.replace(settings, consumer_name="one")) as one, \
            running(dataclasses.replace(settings, consumer_name="two")) as two, \
            running(dataclasses.replace(settings, consumer_name="three")) as three:
        assert await eventually(all_in(redis_client, SUCCEEDED, requests), 60)
    shares = [source.metrics.delivered.labels("delivered").value for source in (one, two, three)]
    assert sum(shares) == 200 and min(shares) > 0, shares
    assert len(gateway.finished) == 200


async def test_kill_9_of_the_source_with_several_services_queued_loses_nothing(redis_url, redis_client, gateway):
    gateway.slow = 0.3
    async with enqueuer(redis_client) as enqueue:
        requests = [(service, await accept(enqueue, service, "/slow")) for service in ("a", "b", "c")
                    for _ in range(6)]
    env = {"TARGET_GATEWAY_URL": gateway.url.rstrip("/"), "MAX_INFLIGHT_PER_SERVICE": "2", "CONSUMER_NAME": "doomed"}
    doomed = source_process(redis_url, env)
    try:
        assert await eventually(lambda: _true(len(gateway.started) >= 4), 20)
        doomed.kill()
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    finished_before = len(gateway.finished)
    assert finished_before < 18
    async with running(settings_for(redis_url, gateway, consumer_name="heir")):
        assert await eventually(all_in(redis_client, SUCCEEDED, requests), 30)
    for service in ("a", "b", "c"):
        queue = LAYOUT.for_host(host(service))
        assert await redis_client.xlen(queue.stream) == 0


# --- idle slots lent to a Service that answers quickly


def most_in_flight(gateway: Gateway, service: str):
    """Samples the Service's replays in flight every few milliseconds; the list's max is the most seen."""
    seen = [0]

    async def watch() -> None:
        while True:
            seen.append(gateway.in_flight(service))
            await asyncio.sleep(0.005)
    return seen, asyncio.create_task(watch())


async def most_in_flight_draining(redis_url, redis_client, gateway: Gateway, requests: list[tuple[str, str]]) -> int:
    """Drain ``requests`` (all of one Service) with one source: the most of them it had in flight at once."""
    seen, watcher = most_in_flight(gateway, requests[0][0])
    try:
        async with running(settings_for(redis_url, gateway)):
            assert await eventually(all_in(redis_client, SUCCEEDED, requests), 30)
    finally:
        watcher.cancel()
    return max(seen)


async def accept_as(enqueue: Enqueuer, service: str, request_id: str, path: str, policy: str = "") -> tuple[str, str]:
    """Queue one request with this id (and delivery policy) as the producer does."""
    document = envelope_json(request_id, "GET", f"http://{host(service)}{path}", [], b"", time.time(), policy=policy)
    await enqueue.enqueue(LAYOUT.for_host(host(service)), document)
    return service, request_id


async def test_a_lone_service_that_answers_quickly_borrows_idle_slots_beyond_its_cap(
        redis_url, redis_client, gateway):
    """Cap 2 of 8 slots: a Service alone with a backlog uses all 8 (the reserve is beyond them)."""
    gateway.slow = 0.1
    async with enqueuer(redis_client) as enqueue:
        requests = [("a", await accept(enqueue, "a", "/slow")) for _ in range(120)]
    assert await most_in_flight_draining(redis_url, redis_client, gateway, requests) == 8


async def test_a_service_that_gets_work_while_another_borrows_starts_at_once(redis_url, redis_client, gateway):
    gateway.slow = 0.5  # quick enough to borrow, long enough that the borrowed slots stay taken a while
    async with enqueuer(redis_client) as enqueue:
        for _ in range(200):
            await accept(enqueue, "a", "/slow")
        async with running(settings_for(redis_url, gateway)):
            assert await eventually(lambda: _true(gateway.in_flight("a") == 8), 10)
            sent = time.monotonic()
            quick = [("b", await accept(enqueue, "b", f"/q/{n}")) for n in range(2)]
            assert await eventually(all_in(redis_client, SUCCEEDED, quick))
            waited = time.monotonic() - sent
            assert gateway.in_flight("a") <= 8
    assert waited < 0.4, f"the reserve's slots were free: no wait for a's borrowed ones ({waited:.2f}s)"


def most_in_flight_in_all(gateway: Gateway):
    """Samples every Service's replays in flight together every few milliseconds; the list's max is the most seen."""
    seen = [0]

    async def watch() -> None:
        while True:
            seen.append(len(gateway.started) - len(gateway.finished))
            await asyncio.sleep(0.005)
    return seen, asyncio.create_task(watch())


async def test_the_reserve_opens_beyond_concurrency_only_while_a_service_borrows(redis_url, redis_client, gateway):
    """CONCURRENCY 8, caps of 2: Services that never borrow (they hang) hold 8 in all; while one borrows every
    slot, Services that get work share one cap's worth beyond it (2), never more."""
    async with enqueuer(redis_client) as enqueue:
        for service in ("h1", "h2", "h3", "h4", "h5"):
            for _ in range(3):
                await accept(enqueue, service, "/hang")
    seen, watcher = most_in_flight_in_all(gateway)
    try:
        async with running(settings_for(redis_url, gateway), stop_grace=0.1):
            assert await eventually(lambda: _true(len(gateway.started) == 8), 5)
            await asyncio.sleep(0.5)
    finally:
        watcher.cancel()
        gateway.release.set()
    assert max(seen) == 8, "no Service borrowed: the reserve stays closed"

    await redis_client.flushall()
    gateway.started.clear(), gateway.finished.clear()
    gateway.release.clear()
    gateway.slow = 0.5
    async with enqueuer(redis_client) as enqueue:
        for _ in range(200):
            await accept(enqueue, "a", "/slow")
        seen, watcher = most_in_flight_in_all(gateway)
        try:
            async with running(settings_for(redis_url, gateway)):
                assert await eventually(lambda: _true(gateway.in_flight("a") == 8), 10)
                others = [(service, await accept(enqueue, service, "/slow")) for service in ("b", "c")
                          for _ in range(4)]
                assert await eventually(all_in(redis_client, SUCCEEDED, others), 15)
        finally:
            watcher.cancel()
    # the reserve opened (more than CONCURRENCY at once), and only by one cap's worth, however b and c came in
    assert 8 < max(seen) <= 10


@pytest.mark.parametrize("path", ["/hang", "/slow"])
async def test_a_hung_or_slow_service_never_borrows(redis_url, redis_client, gateway, path):
    gateway.slow = 1.5  # longer than the source lets a borrower take
    async with enqueuer(redis_client) as enqueue:
        for _ in range(20):
            await accept(enqueue, "a", path)
    seen, watcher = most_in_flight(gateway, "a")
    try:
        async with running(settings_for(redis_url, gateway), stop_grace=0.1):
            await asyncio.sleep(3.5)
    finally:
        watcher.cancel()
        gateway.release.set()
    assert max(seen) == 2


async def test_a_service_with_its_own_max_inflight_never_borrows(redis_url, redis_client, gateway):
    gateway.slow = 0.05
    async with enqueuer(redis_client) as enqueue:
        requests = [await accept_as(enqueue, "a", f"own-cap-{n}", "/slow", "v1;inflight=3") for n in range(60)]
    assert await most_in_flight_draining(redis_url, redis_client, gateway, requests) == 3


async def test_a_services_answer_frees_its_slot_while_the_outcome_is_written(redis_url, redis_client, gateway):
    """A cap counts the requests the Service holds: once it answered, only the outcome is left to write (in
    batches, beside the next replays), and a source holds at most twice CONCURRENCY deliveries (replays and
    answers waiting to be written)."""
    async with enqueuer(redis_client) as enqueue:
        requests = [("a", await accept(enqueue, "a", f"/q/{n}")) for n in range(20)]
    written = asyncio.Event()
    async with running(settings_for(redis_url, gateway, concurrency=4, max_inflight_per_service=2)) as source:
        replayer = source.delivery.replayer
        write = replayer._set_batch

        async def held(items):  # the outcomes' writes wait, as on a slow Redis
            await written.wait()
            return await write(items)
        replayer._set_batch = held  # before the source starts: its batcher of outcomes writes through it
        assert await eventually(lambda: _true(len(gateway.finished) == 8), 5)
        await asyncio.sleep(0.3)
        # twice CONCURRENCY answers waiting to be written: nothing more is read until some are
        assert (len(gateway.started), len(gateway.finished)) == (8, 8)
        assert await all_in(redis_client, SUCCEEDED, requests[:1])() is False
        written.set()
        assert await eventually(all_in(redis_client, SUCCEEDED, requests), 10)
    assert len(gateway.started) == 20


async def test_a_service_that_answers_quickly_gets_its_next_requests_while_the_source_reads(
        redis_url, redis_client, gateway):
    """Entries are read ahead for a Service that borrows: as its answers free slots, its next requests start at
    once, without waiting for the next read (here Redis is paused, so that read cannot come back)."""
    gateway.slow = 0.3
    async with enqueuer(redis_client) as enqueue:
        requests = [("a", await accept(enqueue, "a", f"/slow?n={n}")) for n in range(100)]
    async with running(settings_for(redis_url, gateway)):
        assert await eventually(lambda: _true(len(gateway.finished) >= 24 and gateway.in_flight("a") == 8), 10)
        await redis_client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        paused, before = time.monotonic(), len(gateway.started)
        await asyncio.sleep(1.0)
        during = len(gateway.started) - before
        assert time.monotonic() - paused < 1.4, "the check must fall inside the pause"
        assert await eventually(all_in(redis_client, SUCCEEDED, requests), 30)
    assert during >= 2, f"{during} requests started while no read could come back"


async def test_requests_read_ahead_for_a_service_that_hangs_read_queued_not_running(
        redis_url, redis_client, gateway):
    """A Service answers quickly, so the source reads its entries ahead; then it hangs. The requests read ahead
    wait for its slots, and their status is ``queued`` again (not ``running``) while they do."""
    async with enqueuer(redis_client) as enqueue:
        for n in range(40):
            await accept(enqueue, "a", f"/q/{n}")
        hanging = [("a", await accept(enqueue, "a", "/hang")) for _ in range(30)]
    try:
        async with running(settings_for(redis_url, gateway), stop_grace=0.1):
            assert await eventually(lambda: _true(gateway.in_flight("a") == 8), 10)
            await asyncio.sleep(1.8)  # longer than a borrower may wait (BORROW_AGE) and one look at the queues
            records = [await record(redis_client, service, request_id) for service, request_id in hanging]
            states = [None if found is None else found.state for found in records]
            assert gateway.in_flight("a") == 8
            assert states.count("running") == 8, states
            assert states.count(None) == 22, states  # read from their entries: queued
    finally:
        gateway.release.set()



async def test_read_ahead_requests_it_could_not_mark_queued_again_are_logged(redis_url, redis_client, gateway,
                                                                               caplog):
    """Redis refusing the DEL (here an ACL without it) leaves them reading ``running``: the log says so."""
    await redis_client.execute_command("ACL", "SETUSER", "nodel", "on", "nopass", "~*", "&*", "+@all", "-del")
    async with enqueuer(redis_client) as enqueue:
        for n in range(40):
            await accept(enqueue, "a", f"/q/{n}")
        hanging = [("a", await accept(enqueue, "a", "/hang")) for _ in range(30)]
    refused = redis_url.replace("redis://", "redis://nodel:any@", 1)
    try:
        with caplog.at_level("WARNING", logger="async_component.dataplane.source"):
            async with running(settings_for(refused, gateway), stop_grace=0.1):
                assert await eventually(lambda: _true(gateway.in_flight("a") == 8), 10)
                await asyncio.sleep(1.8)  # longer than a borrower may wait (BORROW_AGE) and one look at the queues
                states = [None if found is None else found.state
                          for found in [await record(redis_client, service, request_id)
                                        for service, request_id in hanging]]
    finally:
        gateway.release.set()
    assert states.count("running") > 8, states  # read ahead and still marked: the DEL was refused
    assert "could not mark" in caplog.text and "NoPermissionError" in caplog.text, caplog.text


async def test_a_reclaim_redis_refuses_is_logged(redis_url, redis_client, gateway, caplog):
    """Entries a stopped source left pending, and an heir whose XAUTOCLAIM Redis refuses (an ACL without it):
    they are not taken, and the heir's log says why, instead of nothing."""
    await redis_client.execute_command("ACL", "SETUSER", "noclaim", "on", "nopass", "~*", "&*", "+@all",
                                       "-xautoclaim")
    async with enqueuer(redis_client) as enqueue:
        await accept(enqueue, "a", "/hang")
    async with running(settings_for(redis_url, gateway), stop_grace=0.1):
        assert await eventually(lambda: _true(gateway.in_flight("a") == 1), 10)
    refused = redis_url.replace("redis://", "redis://noclaim:any@", 1)
    with caplog.at_level("WARNING", logger="async_component.dataplane.source"):
        async with running(settings_for(refused, gateway, consumer_name="heir"), stop_grace=0.1):
            async def warned() -> bool:
                return "cannot reclaim" in caplog.text
            assert await eventually(warned, 10), caplog.text
    gateway.release.set()
    assert "NoPermissionError" in caplog.text
    stream = LAYOUT.for_host(host("a")).stream
    assert (await redis_client.xpending(stream, "async-source"))["consumers"] == [
        {"name": b"first", "pending": 1}]

async def test_a_stopping_source_gives_back_the_requests_it_read_ahead_as_queued(redis_url, redis_client, gateway):
    """Stopped while requests read ahead wait for slots a hung Service holds: they stay pending for another
    source, and read ``queued``, not ``running``."""
    async with enqueuer(redis_client) as enqueue:
        for n in range(40):
            await accept(enqueue, "a", f"/q/{n}")
        hanging = [("a", await accept(enqueue, "a", "/hang")) for _ in range(30)]
    stream = LAYOUT.for_host(host("a")).stream
    try:
        async with running(settings_for(redis_url, gateway), stop_grace=0.1) as source:
            assert await eventually(lambda: _true(gateway.in_flight("a") == 8), 10)
            assert await eventually(lambda: _true(len(source.ahead) > 0), 5), "nothing read ahead: nothing tested"
            read_ahead = len(source.ahead)  # a read still out may add more before the source stops
        states = [None if found is None else found.state
                  for found in [await record(redis_client, service, request_id) for service, request_id in hanging]]
        assert states.count("running") == 8 and states.count(None) == 22, states
        assert (await redis_client.xpending(stream, "async-source"))["pending"] >= 8 + read_ahead
    finally:
        gateway.release.set()
