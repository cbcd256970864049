"""The ceiling for the producer: an aiohttp handler that reads the body and answers 202.

Nothing else: no Redis, no envelope, no headers. It runs the way the producer runs
(N processes sharing the port with SO_REUSEPORT, on uvloop), so ``bench.py`` can report the
producer's throughput as a fraction of what aiohttp itself manages on this machine.

    python perf/bare.py --port 8090 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys

import uvloop
from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202)


def make_app() -> web.Application:
    app = web.Application(client_max_size=6_000_000)
    app.router.add_route("*", "/{tail:.*}", accept)
    return app


def serve(host: str, port: int, reuse_port: bool) -> None:
    """On uvloop, as the producer runs, so the two are compared like for like."""
    web.run_app(make_app(), host=host, port=port, reuse_port=reuse_port, print=None, access_log=None,
                loop=uvloop.new_event_loop())


def run(host: str, port: int, workers: int) -> None:
    """One process serves directly; more fork and share the port, the parent only waits."""
    if workers == 1:
        serve(host, port, False)
        return
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=serve, args=(host, port, True), daemon=True) for _ in range(workers)]
    for child in children:
        child.start()

    def stop(*_: object) -> None:
        for child in children:
            child.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    run(args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
