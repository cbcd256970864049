"""The replay's HTTP/1.1 client: keep-alive connections on an asyncio Protocol, responses parsed by httptools.

aiohttp's client request cost about a third of a source's CPU per delivery
(perf/profiling.md); a replay needs little of it: no redirects, cookies,
decompression or proxies. Here a request is written in one piece, its header
bytes exactly as queued (a value that is not UTF-8 included, see
:mod:`.rawhttp`), and the whole response is read. A connection serves one
request at a time and goes back to its pool when the response said it may
(HTTP/1.1 keep-alive, not ``Connection: close``), had a length, and came
whole; one idle longer than ``IDLE_SECONDS`` is closed rather than reused
(a server closes its idle ones too), as is one after a HEAD (its body length is
the GET's) or an error. Interim 1xx answers are skipped. A body longer than the
client's ``max_body`` is not read: the connection is dropped and
:class:`ResponseTooLarge` raised, so a Service cannot fill the source's memory
(and Redis, where the response would be recorded).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Iterable
from urllib.parse import urlsplit

import httptools

from .rawhttp import RawResponse, request_parts

IDLE_SECONDS = 10.0
"""An idle connection older than this is closed, not reused: below the usual servers' keep-alive timeouts."""
MAX_IDLE = 256
"""Idle connections kept per host and port."""
LARGE_BODY = 64 * 1024
"""A body this long is written after the head, not joined to it: one copy less of each large body in flight."""
MAX_ORIGINS = 1024


def split_origin(url: str) -> tuple[str, str]:
    """``scheme://host[:port]`` and the request target (``/path?query``) of ``url``."""
    scheme, _, rest = url.partition("://")
    end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter, 0, end)
        if found >= 0:
            end = found
    return url[:len(scheme) + 3 + end], rest[end:] or "/"


def _where(origin: str, url: str) -> tuple[str, str, int]:
    """Scheme, host and port to connect to; InvalidURL when there are none."""
    try:
        parts = urlsplit(origin)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidURL(f"{url[:200]!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidURL(f"{url[:200]!r}")
    return parts.scheme, parts.hostname, port


class InvalidURL(ValueError):
    """The URL names no host or port a connection can be opened to."""


class ResponseTooLarge(Exception):
    """The Service answered with a body longer than the client reads (its ``max_body``)."""

    def __init__(self, status: int, limit: int) -> None:
        super().__init__(f"the Service answered {status} with a body of more than {limit} bytes")
        self.status = status
        self.limit = limit


class Response(RawResponse):
    """A response, and whether its connection may serve another request."""

    __slots__ = ("interim", "framed", "length")

    def __init__(self) -> None:
        super().__init__()
        self.interim = False
        self.framed = False
        """Its length is known (Content-Length or chunked): a cut-off body is an error, not the end of it."""
        self.length = 0
        """The body's length as its Content-Length says (0: none said)."""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            self.framed = True
            if value.isdigit():  # the parser refuses any other
                self.length = int(value)
        elif lower == b"transfer-encoding" and b"chunked" in value.lower():
            self.framed = True

    def on_message_complete(self) -> None:
        if self.interim:  # a 1xx: the answer follows on the same connection
            self.interim = self.framed = self.head_done = False
            self.headers = []
            self.length = 0
            return
        self.complete = True


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.done: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.head_only = False
        self.keep_alive = False
        self.closed = False
        self.idle_since = 0.0
        self.max_body = 0
        """The longest body read (0: any)."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # nothing was asked: a server talking out of turn
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(exc)
            return
        response = self.response
        limit = self.max_body
        if limit and not self.head_only and (len(response.body) > limit
                                              or (response.head_done and response.length > limit)):
            self._end(ResponseTooLarge(response.status, limit))  # drops the connection, the rest unread
        elif response.complete:
            self._end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and response.head_done and not response.framed and not response.interim:
            response.complete = True  # the body ran to the close
            self._end(None)
        else:
            self._end(ConnectionResetError("the connection closed before a whole response"))

    # httptools: the response's callbacks (on_header is the response's own, see exchange), then these

    def on_headers_complete(self) -> None:
        response = self.response
        response.status = self.parser.get_status_code()
        response.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # only answers inside a callback
        if 100 <= response.status < 200:
            response.interim = True
        elif self.head_only:  # no body follows, whatever its headers say
            response.complete = True

    def on_body(self, chunk: bytes) -> None:
        body = self.response.body
        if not self.max_body or len(body) <= self.max_body:  # past it, the exchange ends after this read
            body += chunk

    def on_message_complete(self) -> None:
        self.response.on_message_complete()

    # one exchange

    def exchange(self, data: bytes | list[bytes], head_only: bool, loop: asyncio.AbstractEventLoop, timeout: float,
                 max_body: int = 0) -> asyncio.Future[Response]:
        """Write the request; the future gets the whole response, or TimeoutError (and the connection closed) past
        ``timeout`` seconds. A timer on the loop, not ``asyncio.timeout``: that looks the loop and the task up
        each time, and on Python 3.11 each lookup is a system call. A future, not a coroutine: one frame less
        to resume."""
        response = self.response = Response()
        self.on_header = response.on_header  # the parser calls the response's own: one call less per header
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.max_body = max_body
        done = self.done = loop.create_future()
        self.timer = loop.call_later(timeout, self._timed_out, timeout)
        if type(data) is bytes:
            self.transport.write(data)
        else:
            self.transport.writelines(data)
        return done

    def _timed_out(self, timeout: float) -> None:
        self._end(TimeoutError(f"no answer within {timeout:g}s"))

    def reusable(self) -> bool:
        return not self.closed and not self.head_only and self.response.framed and self.keep_alive

    def _end(self, error: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        done = self.done
        if done is None or done.done():
            return
        if error is None:
            done.set_result(self.response)
        else:
            done.set_exception(error)
            # the error's traceback will hold the frame that sent the request (its body and this connection):
            # through this future that would be a cycle, kept until a full collection (rare, see gcpolicy), and
            # with it every body of every request that failed so; a 5.5 MB body that timed out 45 times kept 490 MB
            self.done = None
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Client:
    """Pooled keep-alive connections per scheme, host and port; :meth:`close` when done.

    ``max_body``: the longest response body read (0: any); a longer one raises :class:`ResponseTooLarge`.
    """

    def __init__(self, max_body: int = 0) -> None:
        self.max_body = max_body
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._origins: dict[str, tuple[tuple[str, str, int], str]] = {}
        """``scheme://host:port`` as written -> where to connect, and its ``host:port`` (the default Host): parsed
        once (a source replays to one gateway)."""
        self._tls: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request(self, method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                timeout: float) -> Awaitable[Response]:
        """Send one request and read its whole response.

        Raises InvalidURL, ValueError (a header it cannot send), TimeoutError, OSError (no connection,
        cut off), httptools.HttpParserError (not HTTP) or ResponseTooLarge.
        """
        origin, target = split_origin(url)
        return self.send(method, origin, target, headers, body, timeout=timeout)

    async def send(self, method: str, origin: str, target: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                   timeout: float) -> Response:
        """:meth:`request` of a URL already split (:func:`split_origin`): its ``scheme://host[:port]`` and its
        request target."""
        known = self._origins.get(origin)
        if known is None:
            known = self._origins[origin] = (_where(origin, origin + target), origin.partition("://")[2])
            if len(self._origins) > MAX_ORIGINS:
                self._origins.clear()
        where, netloc = known
        data = request_parts(method, target, netloc, headers, body, keep_alive=True)
        if len(body) < LARGE_BODY:
            data = b"".join(data)  # one write, the usual case
        head_only = method.upper() == "HEAD"
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        connection = self._reuse(where)
        started = loop.time()
        try:
            if connection is None:
                async with asyncio.timeout(timeout):
                    connection = await self._open(where)
            response = await connection.exchange(data, head_only, loop, timeout - (loop.time() - started),
                                                 self.max_body)
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        if connection.reusable():
            self._keep(where, connection)
        else:
            connection.close()
        return response

    def _reuse(self, where: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(where)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    async def _open(self, where: tuple[str, str, int]) -> _Connection:
        scheme, host, port = where
        if scheme == "https" and self._tls is None:
            self._tls = ssl.create_default_context()
        _, connection = await asyncio.get_running_loop().create_connection(
            _Connection, host, port, ssl=self._tls if scheme == "https" else None)
        return connection

    def _keep(self, where: tuple[str, str, int], connection: _Connection) -> None:
        connection.parser = connection.response = connection.done = connection.on_header = None  # the body goes
        connection.idle_since = time.monotonic()
        idle = self._idle.setdefault(where, [])
        if len(idle) >= MAX_IDLE:
            idle.pop(0).close()
        idle.append(connection)

    async def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
