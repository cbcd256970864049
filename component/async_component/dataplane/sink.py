"""The consumer: the CloudEvents sink a RedisStreamSource (or our source, given ``SINK_URL``) posts to.

``POST /`` takes one event carrying a stream entry (binary or structured mode,
decoded by :mod:`.envelope`), hands the queued request to the replay core
(:class:`.replay.Replayer`) and answers with what it came to: 2xx once the
outcome is recorded, 400 for an event that is no queued request, 503 while
Redis is unavailable (or when the event waited for room so long that its
sender would give up before the replay ended). The sender acknowledges the
entry; this process never touches the stream's consumer group.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from .. import logs, probes
from ..protocol import DELIVERY_TIMEOUT_HEADER
from ..settings import ConsumerSettings
from .envelope import Envelope, EnvelopeError, event_envelope
from . import heap, targets
from .bytebudget import ByteBudget
from .redisconn import redis_address
from .replay import MOVER_INTERVAL, Replayer, replay_grace, replay_route

try:  # less CPU per event; plain asyncio works too
    from uvloop import new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
    new_event_loop = asyncio.new_event_loop

log = logging.getLogger(__name__)

MAX_EVENT_SIZE = 64 * 1024 * 1024
"""Largest event accepted: a 6 MB body grows by a third in base64, plus JSON escaping."""

async def read_body(request: web.Request) -> bytes:
    """The event's body, at most MAX_EVENT_SIZE (413 past it), read from the stream: ``request.read()`` would keep
    it on the request, which outlives the replay (a burst of 5.5 MB events took the consumer to 575 MiB with the
    events it replays bounded to 64 MiB, 188 MiB without that copy)."""
    if (request.content_length or 0) > MAX_EVENT_SIZE:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_EVENT_SIZE, actual_size=request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_EVENT_SIZE:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_EVENT_SIZE, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


class EventEndpoint:
    """``POST /``: one CloudEvent carrying a stream entry, answered with what the replay core made of it.

    An event whose ``source`` names the single stream (``STREAM_NAME``: Knative's RedisStreamSource
    reading it) has its retries sent back to that stream; any other goes to its Service's queue.
    Its body is read once ``BODY_MEMORY_LIMIT`` has room for it (:mod:`.bytebudget`).
    """

    def __init__(self, replayer: Replayer, single_source_suffix: str, body_memory_limit: int,
                 registry: CollectorRegistry) -> None:
        self.replayer = replayer
        self.single_source_suffix = single_source_suffix
        self.budget = ByteBudget(body_memory_limit)
        self.held_back = False
        """Events are waiting for room: logged once until none waits."""
        Gauge("async_consumer_held_bytes", "Bytes of events (by Content-Length; a chunked one counts as 64 MiB"
              " until read) being replayed, which BODY_MEMORY_LIMIT bounds",
              registry=registry).set_function(lambda: self.budget.held)
        Gauge("async_consumer_waiting_events", "Events waiting, unread, for room under BODY_MEMORY_LIMIT",
              registry=registry).set_function(lambda: self.budget.waiting)

    async def receive(self, request: web.Request) -> web.Response:
        event_id = request.headers.get("ce-id", "?")
        size = request.content_length
        size = MAX_EVENT_SIZE if size is None else size  # chunked: as large as it may be, until it is read
        budget = self.budget
        arrived = time.monotonic()
        if not self.held_back and budget.must_wait(size):
            self.held_back = True
            log.warning("consumer holds %d bytes of events (BODY_MEMORY_LIMIT %d): the next events wait, unread,"
                        " until replays end", budget.held, budget.limit)
        waited = await budget.take(size)
        since = time.monotonic() - arrived if waited else 0.0
        try:
            try:
                body = await read_body(request)
                if len(body) < size:  # chunked: its replay holds what it is, not what it might have been
                    budget.give(size - len(body))
                    size = len(body)
                envelope = event_envelope(request.headers, body)
                del body  # the envelope holds what the replay needs: not the event a second time while it runs
            except ConnectionResetError:  # aiohttp fails the read of a body whose sender has gone
                log.warning("event %s: its sender left before the event was read%s; not replayed (a sender that"
                            " gave up posts it again)", event_id, " (it waited for room under BODY_MEMORY_LIMIT)"
                            if waited else "")
                return web.json_response({"error": "the sender left before the event was read"}, status=400)
            except EnvelopeError as exc:
                answer = self.replayer.malformed(event_id, str(exc))
            else:
                late = self._too_late(request, envelope, since) if waited else None
                if late:
                    log.warning("event %s (request %s) waited %.1fs for room under BODY_MEMORY_LIMIT: %s; answered"
                                " 503, not replayed (its sender posts it again)", event_id, envelope.id, since, late)
                    return web.json_response({"error": f"the event waited {since:.1f}s for room: {late}"},
                                             status=503, headers={"Retry-After": "1"})
                from_single = request.headers.get("ce-source", "").endswith(self.single_source_suffix)
                answer = await self.replayer.handle(
                    event_id, envelope, retry_queue=self.replayer.layout.single if from_single else None)
        finally:
            budget.give(size)
            if self.held_back and not budget.waiting:
                self.held_back = False
                log.info("consumer: no event waits for room under BODY_MEMORY_LIMIT any more")
        return web.json_response(answer.doc, status=answer.status)

    def _too_late(self, request: web.Request, envelope: Envelope, since: float) -> str | None:
        """Why the event's sender would give up before its replay could end (None: it would not, or sends no
        deadline): it would post the event again while the replay ran, and the Service would be called twice."""
        deadline = request.headers.get(DELIVERY_TIMEOUT_HEADER)
        try:
            deadline_s = float(deadline) if deadline is not None else None
        except ValueError:
            deadline_s = None
        if deadline_s is None:
            return None
        timeout = self.replayer.terms(envelope).timeout
        if since + timeout < deadline_s:
            return None
        return f"its sender waits {deadline_s:g}s in all, and the replay may take {timeout:g}s more"


def make_app(settings: ConsumerSettings, *, redis: aioredis.Redis | None = None,
             mover_interval: float = MOVER_INTERVAL) -> web.Application:
    """The consumer; creates its Redis client on startup unless ``redis`` is given (then the caller closes it)."""
    registry = CollectorRegistry()
    replayer = Replayer(settings, registry, redis=redis, mover_interval=mover_interval)

    async def replaying(app: web.Application):
        await replayer.start()
        yield
        await replayer.stop()

    app = web.Application(client_max_size=MAX_EVENT_SIZE)
    probes.add_probe_routes(app, registry, replayer.ready)
    app.router.add_post("/", EventEndpoint(replayer, "/" + settings.stream, settings.body_memory_limit,
                                           registry).receive)
    app.cleanup_ctx.append(replaying)
    return app


validate = targets.validate
"""For the CLI: an ALLOWED_HOSTS entry that is no host name or suffix is an error at start."""


def run(settings: ConsumerSettings) -> int:
    logs.configure("consumer", settings.log_level)
    heap.release_large_blocks()
    log.info("consumer listening on %s:%d, redis %s, stream %s, replaying %s", settings.host, settings.port,
             redis_address(settings), settings.stream, replay_route(settings))
    # on SIGTERM, the replays in flight finish (aiohttp's default 60 s would cut a longer one: replayed twice)
    web.run_app(make_app(settings), host=settings.host, port=settings.port, access_log=None, print=None,
                loop=new_event_loop(), shutdown_timeout=replay_grace(settings))
    return 0
