"""A fake HTTP server that answers from a script: the sink a source posts to, or the Service a replay reaches."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from async_component.local.ports import free_port

from .aioserve import serve

LOOPBACK_TARGETS = {"allowed_hosts": ("127.0.0.1", ".svc.cluster.local"), "allowed_ports": range(1, 65536)}
"""Target-host policy settings under which a replay may reach these fake Services (loopback, any free port)."""


class ScriptedServer:
    """Answers each request with the next of ``statuses`` (then 200), after ``delay``.

    While ``hold`` is set it keeps requests until ``release`` is set, then answers 503.
    :meth:`record` says what to remember of a request (``seen``, in arrival order; ``answered``
    pairs it with the status sent); :meth:`reply` builds the answer from the request, the status and that.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.statuses: list[int] = []
        self.delay = 0.0
        self.hold = False
        self.release = asyncio.Event()
        self.seen: list[Any] = []
        self.answered: list[tuple[Any, int]] = []
        self.runner: web.AppRunner | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}/"

    async def record(self, request: web.Request) -> Any:
        return request.path

    def reply(self, request: web.Request, status: int, seen: Any) -> web.Response:
        return web.Response(status=status)

    async def handle(self, request: web.Request) -> web.Response:
        seen = await self.record(request)
        self.seen.append(seen)
        if self.hold:
            await self.release.wait()
            return web.Response(status=503)
        await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        self.answered.append((seen, status))
        return self.reply(request, status, seen)

    def succeeded(self) -> list[Any]:
        """What was recorded of the requests answered 2xx."""
        return [seen for seen, status in self.answered if status < 300]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = await serve(app, self.port, handler_cancellation=True)

    async def stop(self) -> None:
        self.release.set()
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def serving(server: ScriptedServer):
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
