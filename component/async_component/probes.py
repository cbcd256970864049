"""``/healthz``, ``/readyz`` and ``/metrics`` for every process.

Liveness says the event loop answers; readiness asks the process's own check
(usually: Redis answers PING), so Kubernetes stops routing to a pod that could
not honour a 202.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[None]]
"""Raises (anything) when the process cannot do its work."""

LIVE = {"status": "ok"}
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


async def readiness(ready: ReadyCheck | None) -> tuple[int, dict[str, str]]:
    """Status and document of ``/readyz``."""
    if ready is not None:
        try:
            await ready()
        except Exception as exc:  # any failure means "not ready", with the reason
            return 503, {"status": "not ready", "reason": f"{type(exc).__name__}: {exc}"}
    return 200, {"status": "ready"}


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def add_probe_routes(app: web.Application, registry: CollectorRegistry, ready: ReadyCheck | None = None) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(LIVE)

    async def readyz(request: web.Request) -> web.Response:
        status, document = await readiness(ready)
        return web.json_response(document, status=status)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics_text(registry), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
