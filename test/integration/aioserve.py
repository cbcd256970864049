"""Serving an aiohttp app on a free loopback port: what every integration test's fake Service, sink and
consumer needs."""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, port: int, host: str = "127.0.0.1", **runner_options) -> web.AppRunner:
    """Listening once this returns; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
