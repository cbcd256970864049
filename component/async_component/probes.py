"""``/healthz``, ``/readyz`` and ``/metrics`` for every aiohttp process.

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

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def add_probe_routes(app: web.Application, registry: CollectorRegistry, ready: ReadyCheck | None = None) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready is not None:
            try:
                await ready()
            except Exception as exc:  # any failure means "not ready", with the reason
                return web.json_response({"status": "not ready", "reason": f"{type(exc).__name__}: {exc}"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
