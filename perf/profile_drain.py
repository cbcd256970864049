"""Profile a source draining queued requests in-process: the numbers behind perf/profiling.md's section 2.

A throwaway redis-server, an aiohttp app that answers at once and one source
(replaying in-process, default settings) share this process, so cProfile sees
the source's own work; requests are queued the way the producer queues them.

    python perf/profile_drain.py --services 1 --each 5000
    python perf/profile_drain.py --services 1000 --each 10 --visibility-timeout 3 --sort tottime
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from aiohttp import web

from async_component.cli import HelpFormatter
from async_component.dataplane.enqueuer import Enqueuer
from async_component.dataplane.envelope import envelope_json
from async_component.dataplane.queues import Layout
from async_component.dataplane.source import Source
from async_component.local.ports import free_port
from async_component.local.redisserver import RedisServer
from async_component.settings import SourceSettings


async def drain(redis_url: str, args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = aioredis.Redis.from_url(redis_url)
    layout = Layout("async", "async-requests")
    enqueuer = Enqueuer(client, layout=layout, max_queued=10**9)
    total = args.services * args.each
    hosts = [f"s{n % args.services}.default.svc.cluster.local" for n in range(total)]
    await asyncio.gather(*(enqueuer.enqueue(layout.for_host(host), envelope_json(
        f"r{n}", "GET", f"http://{host}/", [], b"", time.time())) for n, host in enumerate(hosts)))
    source = Source(SourceSettings(redis_url=redis_url, health_port=0, consumer_name="profiled",
                                   visibility_timeout=args.visibility_timeout,
                                   target_gateway_url=f"http://127.0.0.1:{port}"))
    task = asyncio.create_task(source.run())
    delivered = source.metrics.delivered_as["delivered"]
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    while delivered._value.get() < total:
        await asyncio.sleep(0.01)
    profile.disable()
    print(f"{args.services} Service(s) x {args.each}: {total / (time.perf_counter() - started):,.0f} deliveries/s")
    source.stop()
    await task
    await client.aclose()
    await runner.cleanup()
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--services", type=int, default=1, help="Services the requests are spread over")
    parser.add_argument("--each", type=int, default=5000, help="requests queued per Service")
    parser.add_argument("--visibility-timeout", type=float, default=30.0, help="the source's VISIBILITY_TIMEOUT")
    parser.add_argument("--sort", default="cumulative", help="pstats sort key")
    parser.add_argument("--lines", type=int, default=30, help="profile lines printed")
    args = parser.parse_args()
    with RedisServer() as server:
        asyncio.run(drain(server.url, args))


if __name__ == "__main__":
    main()
