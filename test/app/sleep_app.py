"""The sample Knative Service: sleeps, then echoes the request it received.

Standalone (only aiohttp), so the same file runs in its container image, in the
local stack and in tests (import it by file path). The echo lets tests check
what reached the Service after the gateway, the producer, the stream and the
consumer handled the request: method, path, query, every header in order with
repeats, and the body's length and SHA-256.

Query parameters steer one request:
  ``sleep=<seconds>``      sleep this long instead of SLEEP_SECONDS
  ``status=<code>``        answer this status (still with the echo body)
  ``fail_attempts=<n>``    answer 503 while the ``Async-Attempt`` header is <= n
                           (no header counts as attempt 1)

It logs a line per request at ``LOG_LEVEL`` INFO (the default); WARNING or
ERROR keeps only problems. A request whose caller hangs up stops sleeping (and
says so in its line), so a stopping gateway or a caller's timeout never leaves
the app holding it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import os
import sys
from collections.abc import Mapping

from aiohttp import web

log = logging.getLogger("sleep_app")

ATTEMPT_HEADER = "Async-Attempt"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_SLEEP_SECONDS = 3600.0
MAX_BODY_BYTES = 10 * 1024 * 1024
CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Settings:
    sleep_seconds: float = 10.0
    port: int = 8080
    host: str = "0.0.0.0"
    max_body_bytes: int = MAX_BODY_BYTES
    log_level: str = "INFO"
    """LOG_LEVEL: a line per request at INFO; WARNING and up keep only problems (the local stack passes its own)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read PORT (set by Knative), SLEEP_SECONDS, HOST and LOG_LEVEL; exit with one line when invalid."""
        environ = os.environ if environ is None else environ
        sleep = _seconds(environ.get("SLEEP_SECONDS", "10"))
        if sleep is None:
            raise SystemExit(f"sleep_app: SLEEP_SECONDS={environ['SLEEP_SECONDS']!r} must be 0-{MAX_SLEEP_SECONDS:g} seconds")
        try:
            port = int(environ.get("PORT", "8080"))
        except ValueError:
            raise SystemExit(f"sleep_app: PORT={environ['PORT']!r} must be a port number") from None
        level = environ.get("LOG_LEVEL", "INFO").upper()
        if level not in LOG_LEVELS:
            raise SystemExit(f"sleep_app: LOG_LEVEL={environ['LOG_LEVEL']!r} must be one of {', '.join(LOG_LEVELS)}")
        return cls(sleep_seconds=sleep, port=port, host=environ.get("HOST", "0.0.0.0"), log_level=level)


class BadQuery(ValueError):
    """A query parameter the app cannot honour: answered with 400."""


def _seconds(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= MAX_SLEEP_SECONDS else None


def _integer(query: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise BadQuery(f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return value


def _attempt(request: web.Request) -> int:
    try:
        return int(request.headers.get(ATTEMPT_HEADER, "1"))
    except ValueError:
        return 1


def _text(raw: bytes) -> str:
    """Bytes that are not UTF-8 as surrogate escapes (JSON \\udcXX), so a client can tell exactly what arrived."""
    return raw.decode("utf-8", "surrogateescape")


def _echo(request: web.Request, digest: str, length: int, slept: float) -> dict:
    query: dict[str, list[str]] = {}
    for key, value in request.query.items():
        query.setdefault(key, []).append(value)
    return {
        "method": request.method,
        "path": request.path,
        "query_string": request.query_string,
        "query": query,
        "headers": [[_text(k), _text(v)] for k, v in request.raw_headers],
        "body_sha256": digest,
        "body_length": length,
        "slept": slept,
    }


def make_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            raw_sleep = request.query.get("sleep")
            sleep = settings.sleep_seconds if raw_sleep is None else _seconds(raw_sleep)
            if sleep is None:
                raise BadQuery(f"sleep must be a number of seconds from 0 to {MAX_SLEEP_SECONDS:g}, got {raw_sleep!r}")
            status = _integer(request.query, "status", 200, 599) or 200
            fail_attempts = _integer(request.query, "fail_attempts", 0, 1_000_000)
        except BadQuery as exc:
            return _error(request, 400, str(exc))

        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(CHUNK):
            length += len(chunk)
            if length > settings.max_body_bytes:
                return _error(request, 413, f"body larger than {settings.max_body_bytes} bytes")
            digest.update(chunk)

        try:
            await asyncio.sleep(sleep)
        except asyncio.CancelledError:  # handler_cancellation: the caller hung up (or timed out)
            log.info("%s %s host=%s attempt=%s: the caller hung up while it slept", request.method,
                     request.path_qs, request.host, request.headers.get(ATTEMPT_HEADER, "-"))
            raise
        attempt = _attempt(request)
        if fail_attempts is not None and attempt <= fail_attempts:
            status = 503
        log.info("%s %s host=%s attempt=%s body=%dB slept=%gs -> %d", request.method, request.path_qs,
                 request.host, request.headers.get(ATTEMPT_HEADER, "-"), length, sleep, status)
        return web.json_response(_echo(request, digest.hexdigest(), length, sleep), status=status)

    # headers as large as a cluster's gateway passes on (Envoy: 60 KiB), not aiohttp's 8190 bytes a field
    app = web.Application(handler_args={"max_line_size": 64 * 1024, "max_field_size": 64 * 1024})
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _error(request: web.Request, status: int, message: str) -> web.Response:
    log.info("%s %s -> %d: %s", request.method, request.path_qs, status, message)
    return web.json_response({"error": message}, status=status)


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s sleep_app %(levelname)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    log.info("listening on %s:%d, default sleep %gs", settings.host, settings.port, settings.sleep_seconds)
    web.run_app(make_app(settings), host=settings.host, port=settings.port, print=None, shutdown_timeout=5,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
