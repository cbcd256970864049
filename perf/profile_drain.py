"""Profile a source draining queued requests in-process: the numbers behind perf/profiling.md's section 2.

A throwaway redis-server, an aiohttp app that answers at once (in a child
process, so the profile and the CPU time are the source's alone) and one
source (replaying in-process, default settings) in this process; requests are
queued the way the producer queues them. Prints the drain rate and the
source's CPU time per delivery (this process's, from the kernel), then the
profile (``--no-profile``: without the profiler's overhead, for the CPU time).

    python perf/profile_drain.py --services 1 --each 5000
    python perf/profile_drain.py --services 1000 --each 10 --visibility-timeout 3 --sort tottime
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import pstats
import resource
import time

from aiohttp import web

import machine

from async_component.cli import HelpFormatter
from async_component.dataplane.enqueuer import Enqueuer
from async_component.dataplane.envelope import envelope_json
from async_component.dataplane.queues import Layout
from async_component.dataplane.source import Source, new_event_loop
from async_component.local.ports import free_port
from async_component.local.redisserver import RedisServer
from async_component.settings import SourceSettings


def serve_app(port: int) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def app_ready(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the app did not start")


async def drain(redis_url: str, port: int, args: argparse.Namespace, redis_pid: int) -> None:
    import redis.asyncio as aioredis

    await app_ready(port)
    client = aioredis.Redis.from_url(redis_url)
    layout = Layout("async", "async-requests")
    enqueuer = Enqueuer(client, layout=layout, max_queued=10**9)
    total = args.services * args.each
    hosts = [f"s{n % args.services}.default.svc.cluster.local" for n in range(total)]
    await asyncio.gather(*(enqueuer.enqueue(layout.for_host(host), envelope_json(
        f"r{n}", "GET", f"http://{host}/", [], b"", time.time())) for n, host in enumerate(hosts)))
    settings = dict(redis_url=redis_url, health_port=0, consumer_name="profiled",
                    visibility_timeout=args.visibility_timeout, target_gateway_url=f"http://127.0.0.1:{port}")
    if args.max_inflight_per_service:
        settings["max_inflight_per_service"] = args.max_inflight_per_service
    source = Source(SourceSettings(**settings))
    task = asyncio.create_task(source.run())
    delivered = source.metrics.delivered_as["delivered"]
    # the CPU clock: a send() that wakes another process is then charged its CPU, not the time until this
    # process gets a core back (on 2 busy cores, much longer)
    profile = cProfile.Profile(time.process_time) if args.timer == "cpu" else cProfile.Profile()
    commands, usec = await command_counts(client), await command_usec(client)
    redis_cpu = machine.cpu_seconds(redis_pid)
    started, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    if args.profile:
        profile.enable()
    while delivered.value < total:
        await asyncio.sleep(0.01)
    if args.profile:
        profile.disable()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    redis_cpu = machine.cpu_seconds(redis_pid) - redis_cpu
    now = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{args.services} Service(s) x {args.each}: {total / elapsed:,.0f} deliveries/s, "
          f"the source's CPU {cpu * 1e6 / total:,.0f} µs per delivery (user {(now.ru_utime - usage.ru_utime) * 1e6 / total:,.0f}"
          f" + system {(now.ru_stime - usage.ru_stime) * 1e6 / total:,.0f})" + (" (profiled)" if args.profile else "")
          + f"; redis-server's CPU {redis_cpu * 1e6 / total:,.0f} µs per delivery")
    source.stop()
    await task
    after, usec_after = await command_counts(client), await command_usec(client)
    spent = {name: usec_after[name] - usec.get(name, 0) for name in usec_after}
    sent = {name: after.get(name, 0) - commands.get(name, 0) for name in after}
    print(f"Redis commands per delivery: {sum(sent.values()) / total:.2f} run (scripts' own included), of which "
          + ", ".join(f"{name} {count / total:.2f}" for name, count in sorted(sent.items(), key=lambda x: -x[1])[:6]))
    print("Redis's time in commands, µs per delivery: "
          + ", ".join(f"{name} {us / total:.1f}" for name, us in sorted(spent.items(), key=lambda x: -x[1])[:8]))
    await client.aclose()
    if args.profile:
        stats = pstats.Stats(profile)
        print(f"{stats.total_calls / total:,.0f} Python function calls per delivery (a measure of the work that "
              "does not move with the machine's load)")
        stats.sort_stats(args.sort).print_stats(args.lines)


async def command_counts(client) -> dict[str, int]:
    """Commands Redis ran so far, by name (``INFO commandstats``; a script's own commands included)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items() if name != "cmdstat_info"}


async def command_usec(client) -> dict[str, int]:
    """Microseconds Redis spent in each command so far (a script's own commands counted in it and by name)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["usec"] for name, value in stats.items() if name != "cmdstat_info"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--services", type=int, default=1, help="Services the requests are spread over")
    parser.add_argument("--each", type=int, default=5000, help="requests queued per Service")
    parser.add_argument("--visibility-timeout", type=float, default=30.0, help="the source's VISIBILITY_TIMEOUT")
    parser.add_argument("--max-inflight-per-service", type=int, default=0,
                        help="the source's MAX_INFLIGHT_PER_SERVICE (0: its default)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="measure without the profiler (its overhead inflates the CPU time)")
    parser.add_argument("--sort", default="cumulative", help="pstats sort key")
    parser.add_argument("--timer", choices=("cpu", "wall"), default="cpu",
                        help="what the profile's times are: this process's CPU time, or the wall clock")
    parser.add_argument("--lines", type=int, default=30, help="profile lines printed")
    args = parser.parse_args()
    port = free_port()
    app = multiprocessing.get_context("spawn").Process(target=serve_app, args=(port,), daemon=True)
    app.start()
    try:
        with RedisServer() as server:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:  # as the source process runs
                runner.run(drain(server.url, port, args, server.process.pid))
    finally:
        app.terminate()
        app.join()


if __name__ == "__main__":
    main()
