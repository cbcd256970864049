"""A lean HTTP/1.1 server on httptools (llhttp), for the producer.

The producer's own work per request is small (check a header, join a Redis
batch, answer 202), so the HTTP server's cost decides its throughput. On the
development machine aiohttp's request machinery costs 60-80 µs of CPU per
request and one protocol object driving httptools' parser about 11 µs
(perf/profiling.md); with aiohttp the producer could not come near the
issue's target of 0.8 x a bare aiohttp handler. This server covers what a
producer behind Kourier, Istio or a kubelet probe meets: keep-alive and
pipelining (answers in request order), Content-Length and chunked bodies with
a size limit (413), a bound on the body bytes a worker holds at once (503),
``Expect: 100-continue``, HEAD, malformed requests (400,
then close), idle and slow connections timed out (a header block must be
complete within ``header_timeout``, a body must keep up a minimum rate, so a
client trickling bytes cannot hold a connection), a cap on open connections,
and a graceful stop. No TLS,
HTTP/2 or upgrades: the network layer in front terminates those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus

import httptools

log = logging.getLogger(__name__)

MAX_TARGET_BYTES = 8190
"""Longest request target (as aiohttp's default line limit)."""
MAX_HEADER_BYTES = 65536
"""All header names and values of one request together."""
MAX_HEADER_FIELDS = 100
"""Header fields of one request: a replay adds a few of its own, and its client (aiohttp) and the gateways in
its way (aiohttp locally, Envoy in a cluster) refuse a request with more than 128 (aiohttp) or 100 (Envoy)."""
HTTP_VERSIONS = ("1.1", "1.0")
MAX_PIPELINED = 32
"""Complete requests waiting on one connection before it stops reading."""
IDLE_TIMEOUT = 75.0
"""Seconds a keep-alive connection may wait for its next request."""
REQUEST_TIMEOUT = 60.0
"""Seconds a request that started arriving may go without a new byte."""
HEADER_TIMEOUT = 10.0
"""Seconds from a request's first byte to the end of its header block, however steadily it trickles in."""
BODY_MIN_RATE = 1024
"""Bytes per second a body must average: it gets ``header_timeout`` seconds, plus one per this many bytes."""
MAX_CONNECTIONS = 1000
"""Open connections per worker; more are answered 503 and closed."""
LINGER = 5.0
"""Seconds a refused request's unread body is still read (and dropped) after the answer, so that
closing with unread bytes does not reset the connection before the client read the answer."""
SWEEP_INTERVAL = 1.0
BUSY_RETRY_AFTER = "1"
"""Seconds a client refused for the body memory bound is asked to wait."""

_NONE: tuple[bytes, ...] = ()


class Request:
    """One request as received: raw target, raw headers (order and case kept), whole body."""

    __slots__ = ("method", "target", "version", "headers", "body", "keep_alive", "fields")

    def __init__(self, method: str, target: str, version: str, headers: list[tuple[bytes, bytes]],
                 body: bytes = b"", keep_alive: bool = True,
                 fields: dict[bytes, list[bytes]] | None = None) -> None:
        self.method = method
        self.target = target
        """As sent: origin form (``/path?query``) or absolute form."""
        self.version = version
        """"1.1" or "1.0"."""
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.fields = _fields(headers) if fields is None else fields
        """Each header's values by its name in lower case (the producer looks up five names per request:
        one pass over the headers instead of one per name)."""

    def values(self, name: bytes) -> Sequence[bytes]:
        """Every value of the header ``name`` (given in lower case), in order."""
        return self.fields.get(name, _NONE)

    @property
    def path(self) -> str:
        """The target's path, without the query; '' when the target has none."""
        if self.target.startswith("/"):
            return self.target.partition("?")[0]
        try:
            return (httptools.parse_url(self.target.encode("latin-1")).path or b"").decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            return ""


def _fields(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    fields: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lower = name.lower()
        values = fields.get(lower)
        if values is None:
            fields[lower] = [value]
        else:
            values.append(value)
    return fields


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        """Without Content-Length, Date and Connection, which the server writes."""


def json_response(status: int, document: object, headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    return Response(status, body, [("Content-Type", "application/json"), *headers])


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_date_second = 0
_date_line = b""


def _date() -> bytes:
    """The Date line, made once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_line = now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode("latin-1")
    return _date_line


def encode(response: Response, *, keep_alive: bool, head: bool = False, version: str = "1.1") -> bytes:
    """The response's bytes (header text as UTF-8, as aiohttp sends it)."""
    parts = [_STATUS_LINES.get(response.status) or _status_line(response.status), _date(),
             # a 204 has no body, and no Content-Length (RFC 9110, 8.6)
             b"" if response.status == 204 else b"Content-Length: %d\r\n" % len(response.body)]
    for name, value in response.headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        parts.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif version == "1.0":
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(response.body)
    return b"".join(parts)


def _plain(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them one after another, in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request | Response | bytes] = deque()
        """What to answer next: requests, refusals (written, then the connection closes), a 100 Continue."""
        self.runner: asyncio.Task | None = None
        self.last_active = 0.0
        self.in_message = False
        self.headers_done = False
        self.version = "1.1"
        self.chunk_open = False
        """Inside a chunk whose data has not all arrived."""
        self.chunk_checked = False
        self.chunk_bytes = 0
        self.started = 0.0
        """When the request's first byte came, then when its header block was complete."""
        self.refused = False
        self.paused = False
        self.writing_paused: asyncio.Future | None = None
        self.eof = False
        self.current = 0
        """What the request arriving counts in the server's ``held`` (its Content-Length once its headers are read,
        else its bytes so far); once it is whole, its body counts there until it is answered."""
        self._reset()

    def _reset(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.fields: dict[bytes, list[bytes]] = {}
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0

    # asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_active = self.loop.time()
        if len(self.server.connections) >= self.server.max_connections:
            self.refused = True
            self.server.over_capacity()
            transport.write(encode(_plain(503, "too many connections, try again later"), keep_alive=False))  # type: ignore[attr-defined]
            self._linger()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release(self.current + sum(len(item.body) for item in self.queue if type(item) is Request))
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.server.under_capacity()
        self.queue.clear()  # never answered: as if the client had not sent them
        if self.writing_paused is not None and not self.writing_paused.done():
            self.writing_paused.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self.refused:
            return
        try:
            self.parser.feed_data(data)
            if self.chunk_open and not self.chunk_checked:
                self._check_chunk_size(data)
        except httptools.HttpParserUpgrade:
            # the request asking for it is answered as plain HTTP, then the connection closes:
            # the other protocol is not spoken here
            self.refused = True
        except httptools.HttpParserError as exc:
            if not self.refused:
                self._refuse(400, f"malformed request: {exc}")

    def eof_received(self) -> bool:
        """The client sent all it will: answer what is queued, then close."""
        self.eof = True
        if self.runner is None:
            return False  # nothing to answer: asyncio closes the transport
        return True

    def pause_writing(self) -> None:
        self.writing_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writing_paused is not None and not self.writing_paused.done():
            self.writing_paused.set_result(None)
        self.writing_paused = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.in_message = True
        self.headers_done = False
        self.started = self.last_active  # when the bytes that hold its start arrived
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > MAX_TARGET_BYTES:
            self._refuse(414, f"the request target is longer than {MAX_TARGET_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, f"the request headers are larger than {MAX_HEADER_BYTES} bytes")
        elif self.headers_done:
            pass  # a chunked body's trailer: not part of the request that is replayed
        elif len(self.headers) >= MAX_HEADER_FIELDS:
            self._refuse(431, f"the request has more than {MAX_HEADER_FIELDS} header fields")
        elif not self.refused:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.started = self.last_active
        if self.refused:
            return
        self.fields = fields = _fields(self.headers)
        length = fields.get(b"content-length")
        length = length and length[-1]
        hosts = len(fields.get(b"host", _NONE))
        expect = fields.get(b"expect")
        expect = expect and expect[-1]
        self.version = version = self.parser.get_http_version()
        if version not in HTTP_VERSIONS:
            self._refuse(400, f"HTTP/{version} is not spoken here (HTTP/1.1 and HTTP/1.0 are)")
            return
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            self._refuse(400, "an HTTP/1.1 request must have exactly one Host header")
            return
        if length is not None:
            announced = int(length)  # llhttp let only digits through
            server = self.server
            if announced > server.max_body:
                self._refuse(413, f"the body is larger than {server.max_body} bytes")
                return
            if announced:  # held from now on (inline: every request with a body passes here)
                if server.max_held and server.held + announced > server.max_held and server.held:
                    self._busy()
                    return
                self.current = announced
                server.held += announced
        if expect is not None and version == "1.1":
            if expect.lower() != b"100-continue":
                self._refuse(417, f"unsupported Expect: {expect.decode('latin-1')}")
                return
            if self.runner is None and not self.queue:
                self.transport.write(_CONTINUE)
            else:
                self.queue.append(_CONTINUE)

    def on_chunk_header(self) -> None:
        self.chunk_open, self.chunk_checked, self.chunk_bytes = True, False, 0

    def on_chunk_complete(self) -> None:
        self.chunk_open = False

    def _check_chunk_size(self, data: bytes) -> None:
        """Refuse at once a chunk that announces more than the body limit allows (413).

        llhttp does not tell a chunk's size, and a client that announces a huge one need not send
        it. A chunk still open when ``data`` is consumed ends ``data``, so its size line ends where
        the chunk's bytes received so far begin. A line begun in an earlier read yields only its
        last digits, a smaller number: never a refusal by mistake.
        """
        self.chunk_checked = True
        end = len(data) - self.chunk_bytes
        if end <= 0 or data[end - 1:end] != b"\n":
            return  # the size line came in an earlier read
        start = data.rfind(b"\n", 0, end - 1) + 1
        digits = data[start:end].partition(b";")[0].strip(b" \t\r\n")
        try:
            size = int(digits, 16)
        except ValueError:
            return
        if size > self.server.max_body - (self.body_bytes - self.chunk_bytes):
            self._refuse(413, f"the body is larger than {self.server.max_body} bytes")
            self.body = []

    def on_body(self, chunk: bytes) -> None:
        if self.refused:
            return
        if self.chunk_open:
            self.chunk_bytes += len(chunk)
        self.body_bytes += len(chunk)
        if self.body_bytes > self.server.max_body:
            self._refuse(413, f"the body is larger than {self.server.max_body} bytes")
            self.body = []
            return
        if self.body_bytes > self.current:  # a body without Content-Length, counted as it comes
            grown = self.body_bytes - self.current
            server = self.server
            if server.max_held and server.held + grown > server.max_held and server.held > self.current:
                self._busy()
                self.body = []
                return
            self.current += grown
            server.held += grown
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.refused:
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.current = 0  # held now as the request's body, until it is answered
        self._push(self._request(body))
        if len(self.queue) >= MAX_PIPELINED and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    # answering

    def _request(self, body: bytes) -> Request:
        parser = self.parser
        return Request(parser.get_method().decode("latin-1"), self.target.decode("latin-1"),
                       self.version, self.headers, body, parser.should_keep_alive(), self.fields)

    def _refuse(self, status: int, message: str, headers: Iterable[tuple[str, str]] = (), reason: str = "") -> None:
        """Answer ``status`` after what is already queued, then close: the rest of the stream is not read."""
        if self.refused:
            return
        self.refused = True
        self._release(self.current)
        self.server.on_refused(status, reason)
        self._push(json_response(status, {"error": message}, headers))

    def _busy(self) -> None:
        server = self.server
        server.busy()
        self._refuse(503, f"this producer holds {server.held} bytes of request bodies not yet queued, its bound"
                     f" (BODY_MEMORY_LIMIT {server.max_held}); try again shortly",
                     (("Retry-After", BUSY_RETRY_AFTER),), "body_memory")

    def _release(self, size: int) -> None:
        """What the request arriving (and, the connection lost, those waiting) counted is held no more."""
        self.current = 0
        server = self.server
        server.held -= size
        if server.busy_since is not None and server.held < server.max_held // 2:
            server.calm()

    def _push(self, item: Request | Response | bytes) -> None:
        self.queue.append(item)
        if self.runner is None:
            self.runner = self.loop.create_task(self._answer())

    async def _answer(self) -> None:
        try:
            while self.queue:
                item = self.queue.popleft()
                if self.paused and len(self.queue) < MAX_PIPELINED // 2 and not self.refused:
                    self.paused = False
                    self.transport.resume_reading()
                if isinstance(item, bytes):
                    self.transport.write(item)
                    continue
                if isinstance(item, Response):
                    self.transport.write(encode(item, keep_alive=False))
                    self._linger()
                    return
                try:
                    response = await self.server.respond(item)
                except Exception:  # a bug: the client gets a 500, the log the traceback
                    log.exception("error answering %s %s", item.method, item.target[:200])
                    response = _plain(500, "internal error")
                if item.body:  # held no more (inline: once a request)
                    server = self.server
                    server.held -= len(item.body)
                    if server.busy_since is not None and server.held < server.max_held // 2:
                        server.calm()
                if self.transport.is_closing():
                    return
                # refused with nothing left to answer: the request asked for an upgrade
                keep_alive = item.keep_alive and not self.server.closing and not (self.refused and not self.queue)
                try:
                    data = encode(response, keep_alive=keep_alive, head=item.method == "HEAD", version=item.version)
                except ValueError as exc:
                    log.error("cannot answer %s %s: %s", item.method, item.target[:200], exc)
                    data = encode(_plain(500, "internal error"), keep_alive=keep_alive, version=item.version)
                self.transport.write(data)
                if not keep_alive:
                    self.transport.close()
                    return
                if self.writing_paused is not None:
                    await self.writing_paused
            if self.eof:
                self.transport.close()
        finally:
            self.runner = None
            self.last_active = self.loop.time()

    def _linger(self) -> None:
        """Close after the client stops sending (or :data:`LINGER` seconds); what it sends is dropped."""
        if self.eof or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)

    def sweep(self, now: float) -> None:
        """Close the connection if it waited too long for a request, or for the rest of one."""
        if self.runner is not None or self.transport.is_closing():
            return
        server = self.server
        if not self.in_message:
            if now - self.last_active > server.idle_timeout:
                self.transport.close()
        elif now - self.last_active > server.request_timeout:
            self._refuse(408, f"the request stalled for {server.request_timeout:g} seconds")
        elif not self.headers_done:
            if now - self.started > server.header_timeout:
                self._refuse(408, f"the request headers took longer than {server.header_timeout:g} seconds")
        elif now - self.started > server.header_timeout + self.body_bytes / server.body_min_rate:
            self._refuse(408, f"the body arrived slower than {server.body_min_rate} bytes per second")

    @property
    def idle(self) -> bool:
        return self.runner is None and not self.in_message and not self.queue


class Server:
    """Serves ``respond(request) -> Response`` on one listening socket."""

    def __init__(self, respond: Callable[[Request], Awaitable[Response]], *, max_body: int,
                 idle_timeout: float = IDLE_TIMEOUT, request_timeout: float = REQUEST_TIMEOUT,
                 header_timeout: float = HEADER_TIMEOUT, body_min_rate: int = BODY_MIN_RATE,
                 max_connections: int = MAX_CONNECTIONS, max_held: int = 0,
                 on_refused: Callable[[int, str], None] = lambda status, reason: None) -> None:
        """``max_held``: body bytes held at once, past which a request is refused with 503 unless no other request
        holds any (so one of ``max_body`` is always taken; 0: no bound); ``on_refused(status, reason)`` for each
        request the server answers on its own (``reason`` "body_memory" for that bound, else '')."""
        self.respond = respond
        self.max_body = max_body
        self.max_held = max_held
        self.held = 0
        """Body bytes of the requests not answered yet, on every connection (see ``_Connection.current``)."""
        self.busy_since: float | None = None
        """When a request was first refused for ``max_held`` (None: not since the bytes held went under half)."""
        self.refused_busy = 0
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.body_min_rate = body_min_rate
        self.max_connections = max_connections
        self.turned_away = 0
        """Connections refused since the cap was last reached (0: below the cap)."""
        self.on_refused = on_refused
        self.on_startup: list[Callable[[], Awaitable[None]]] = []
        """Run before the socket listens, in order."""
        self.on_closing: list[Callable[[], None]] = []
        """Called when :meth:`close` begins, before waiting for the requests in progress."""
        self.on_cleanup: list[Callable[[], Awaitable[None]]] = []
        """Run after the last connection closed (or the start failed), in order."""
        self.connections: set[_Connection] = set()
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Run the startup hooks, then listen; raises OSError when the port cannot be had."""
        self.loop = asyncio.get_running_loop()
        for hook in self.on_startup:
            await hook()
        try:
            self._server = await self.loop.create_server(lambda: _Connection(self), host, port,
                                                         reuse_port=reuse_port or None, backlog=1024)
        except BaseException:
            await self._cleanup()
            raise
        self._sweeper = self.loop.create_task(self._sweep())

    def calm(self) -> None:
        log.info("holding %d bytes of request bodies, under half of BODY_MEMORY_LIMIT again; %d requests were"
                 " refused meanwhile", self.held, self.refused_busy)
        self.busy_since, self.refused_busy = None, 0

    def busy(self) -> None:
        if self.busy_since is None:
            self.busy_since = time.monotonic()
            log.warning("holding %d bytes of request bodies not yet queued (BODY_MEMORY_LIMIT %d): new requests"
                        " get 503 until some are answered", self.held, self.max_held)
        self.refused_busy += 1

    def over_capacity(self) -> None:
        if not self.turned_away:
            log.warning("connection cap reached: %d connections open in this worker (MAX_CONNECTIONS); "
                        "new connections get 503 until some close", self.max_connections)
        self.turned_away += 1
        self.on_refused(503, "")

    def under_capacity(self) -> None:
        if self.turned_away and len(self.connections) < self.max_connections:
            log.info("below the connection cap again; %d connections were refused meanwhile", self.turned_away)
            self.turned_away = 0

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace: float = 10.0) -> None:
        """Stop listening, let requests in progress be answered (``Connection: close``), then close."""
        if self.loop is None or self.closing:
            return
        self.closing = True
        if self._server is not None:
            self._server.close()
        for hook in self.on_closing:
            hook()
        deadline = self.loop.time() + grace
        while True:
            for connection in list(self.connections):
                if connection.idle:
                    connection.transport.close()
            if not self.connections or self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        await self._cleanup()

    async def _cleanup(self) -> None:
        for hook in self.on_cleanup:
            await hook()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL, self.idle_timeout / 2, self.request_timeout / 2,
                                    self.header_timeout / 2))
            now = self.loop.time()
            for connection in list(self.connections):
                connection.sweep(now)
