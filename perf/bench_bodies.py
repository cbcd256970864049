"""Benchmark 9, large bodies: the memory of the producer, the source and the consumer under a burst of large requests.

Three Services (the local stack's ``helloworld-sleep``, ``-always`` and ``-policy``)
each get ``count`` async requests of ``size`` bytes at once, through the gateway;
the app sleeps ``sleep`` seconds on each, so the source holds its deliveries
for a while; 5 s is the policy Service's per-attempt timeout, so its requests
time out, are tried again (6 attempts) and most end failed, as a Service too slow
for its timeout does. A client that gets 503 (the producer's BODY_MEMORY_LIMIT) tries
again after its Retry-After, as a client should, so every request is accepted.
The producer's and the source's resident memory is sampled every 0.2 s until
every request is finished, then once more 3 s later (memory given back). The
same burst then goes to a second stack whose source posts CloudEvents to the
consumer (the RedisStreamSource topology), whose memory is sampled too; there
one source sends the consumer at most what it holds itself. Last, ``events``
events of the same size are posted straight to a stack's consumer at once, as
several sources or a RedisStreamSource may send them.

Judged: each component's peak against the memory limit its manifest gives it
(``component/config/base``), and every request accepted and finished. Before
2026-12-02 the source peaked at 1.8 GB here and kept 350 MB when idle
(perf/README.md, "Large bodies"); the consumer, before it had a bound of its own,
1,107 MiB under 100 events posted at once.

Run through ``python perf/bench.py --only 9``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path

import aiohttp
import yaml

import machine
from figures import Figure, at_most, ratio

BENCH = "9 large bodies"
SERVICES = ("helloworld-sleep", "helloworld-sleep-always", "helloworld-sleep-policy")
MIB = 1024 * 1024
CONFIG = Path(__file__).resolve().parent.parent / "component" / "config" / "base"


def memory_limit(component: str) -> int:
    """The memory limit of the component's container in its base manifest (a Deployment, or the producer's Knative
    Service), in bytes (``<n>Mi`` or ``<n>Gi``)."""
    for doc in yaml.safe_load_all((CONFIG / f"{component}.yaml").read_text()):
        if doc and doc.get("kind") in ("Deployment", "Service") and "template" in doc.get("spec", {}):
            limit = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
            number, unit = limit[:-2], limit[-2:]
            return int(number) * {"Mi": MIB, "Gi": 1024 * MIB}[unit]
    raise LookupError(f"no workload with a memory limit in {component}.yaml")


async def burst(stack, components: tuple[str, ...], count: int, size: int, sleep: float
                ) -> tuple[dict[str, int], dict[str, int], collections.Counter, int, float]:
    """Peak and after RSS per component, finished requests by state, 503s retried, seconds until all finished."""
    pids = {component: stack.pid(component) for component in components}
    peak = dict.fromkeys(components, 0)
    body = os.urandom(size // 2).hex().encode()  # text, as most large bodies are (JSON, CSV): no base64 in Redis
    sampling = True

    async def sample() -> None:
        while sampling:
            for component, pid in pids.items():
                peak[component] = max(peak[component], machine.rss_bytes(pid))
            await asyncio.sleep(0.2)

    retried = 0
    started = time.monotonic()
    sampler = asyncio.create_task(sample())
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(service: str) -> tuple[str, str]:
            nonlocal retried
            headers = {"Host": stack.host(service), "Prefer": "respond-async"}
            while True:
                async with session.post(f"{stack.gateway_url}/?sleep={sleep:g}", data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 503 and "Retry-After" in response.headers:
                        retried += 1
                        await asyncio.sleep(float(response.headers["Retry-After"]))
                        continue
                    if response.status != 202:
                        raise RuntimeError(f"{service}: expected 202, got {response.status}")
                    return service, response.headers["Location"]

        accepted = await asyncio.gather(*(one(service) for service in SERVICES for _ in range(count)))
        finished: collections.Counter = collections.Counter()
        pending = list(accepted)
        while pending and time.monotonic() - started < 900:
            still = []
            for service, location in pending:
                async with session.get(stack.gateway_url + location, headers={"Host": stack.host(service)}) as response:
                    await response.read()
                    state = response.headers.get("Async-Request-State", "")
                if state in ("queued", "running", "retrying"):
                    still.append((service, location))
                else:
                    finished[state] += 1
            pending = still
            if pending:
                await asyncio.sleep(1.0)
    took = time.monotonic() - started
    await asyncio.sleep(3.0)
    sampling = False
    await sampler
    after = {component: machine.rss_bytes(pid) for component, pid in pids.items()}
    return peak, after, finished, retried, took


async def events_burst(stack, events: int, size: int, sleep: float) -> tuple[int, int, collections.Counter, float]:
    """Post ``events`` CloudEvents of ``size`` straight to the consumer at once; its peak and after RSS, their
    answers by status, seconds until all were answered."""
    from async_component.dataplane import envelope as wire
    from async_component.dataplane.envelope import Envelope

    pid = stack.pid("consumer")
    peak, sampling = 0, True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, machine.rss_bytes(pid))
            await asyncio.sleep(0.1)

    body = os.urandom(size // 2).hex().encode()
    url = f"http://{stack.host(SERVICES[0]).split('.')[0]}.default.svc.{stack.cluster_domain}/?sleep={sleep:g}"
    source = wire.event_source("redis://bench", "bench")
    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(n: int) -> int:
            headers, data = wire.binary_event(source, f"{n}-0", Envelope.new("POST", url, [], body).to_stream_fields())
            async with session.post(stack.consumer_url + "/", data=data, headers=headers) as response:
                await response.read()
                return response.status

        statuses = collections.Counter(await asyncio.gather(*(one(n) for n in range(events))))
    took = time.monotonic() - started
    await asyncio.sleep(3.0)
    sampling = False
    await sampler
    return peak, machine.rss_bytes(pid), statuses, took


def run(count: int = 40, size: int = 5_500_000, sleep: float = 5.0, events: int = 100
        ) -> tuple[list[Figure], list[str]]:
    from bench import local_stack, progress

    total = count * len(SERVICES)
    found, notes = [], []
    for replay_in_source, components in ((True, ("producer", "source")), (False, ("producer", "source", "consumer"))):
        topology = "" if replay_in_source else ", the source posting to the consumer"
        progress(f"9. {total} requests of {size / 1e6:.1f} MB at once to {len(SERVICES)} Services, the app sleeping"
                 f" {sleep:g} s on each{topology}")
        with local_stack(replay_in_source=replay_in_source) as stack:
            peak, after, states, retried, took = asyncio.run(burst(stack, components, count, size, sleep))
        finished = sum(states.values())
        for component in components:
            limit = memory_limit(component)
            share = ratio(peak[component], limit)
            found.append(Figure(BENCH, f"{component} peak RSS, {total} bodies of {size / 1e6:.1f} MB at once{topology}",
                                peak[component] / MIB, "MiB", f"its manifest's memory limit {limit / MIB:.0f} MiB;"
                                f" {after[component] / MIB:.0f} MiB 3 s after the last request finished", share,
                                "<= 1.0 x the limit", at_most(share, 1.0)))
        found.append(Figure(BENCH, f"requests accepted and finished{topology}", finished, "requests",
                            f"{total} sent; {retried} answers of 503 retried after their Retry-After",
                            ratio(finished, total), "all", finished == total))
        notes.append(f"9{topology}: {total} requests of {size:,} bytes, the app sleeping {sleep:g} s on each: {finished}"
                     f" finished in {took:.0f} s ({', '.join(f'{n} {state}' for state, n in states.most_common())});"
                     f" the producer answered 503 {retried} times (BODY_MEMORY_LIMIT), each retried after its"
                     " Retry-After")
    progress(f"9. {events} events of {size / 1e6:.1f} MB posted straight to the consumer at once, the app sleeping"
             f" {sleep:g} s on each")
    with local_stack() as stack:
        peak, after, statuses, took = asyncio.run(events_burst(stack, events, size, sleep))
    limit = memory_limit("consumer")
    share = ratio(peak, limit)
    found.append(Figure(BENCH, f"consumer peak RSS, {events} events of {size / 1e6:.1f} MB posted to it at once",
                        peak / MIB, "MiB", f"its manifest's memory limit {limit / MIB:.0f} MiB; {after / MIB:.0f} MiB"
                        " 3 s after the last was answered", share, "<= 1.0 x the limit", at_most(share, 1.0)))
    notes.append(f"9, events posted to the consumer: {events} of {size:,} bytes answered in {took:.0f} s"
                 f" ({', '.join(f'{n} x {status}' for status, n in sorted(statuses.items()))})")
    return found, notes
