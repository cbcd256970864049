"""One HTTP/1.1 exchange whose header bytes go out exactly as received, for what aiohttp cannot send.

A header value may hold bytes that are not UTF-8 (RFC 9110 allows any octet
but controls); the envelope keeps them as surrogate escapes. aiohttp writes
header values as UTF-8 text (its C writer silently drops surrogates), so a
request holding such a value is sent through here instead: one connection,
``Connection: close``, the response read whole with httptools. The replay's
own client (:mod:`.http1client`) writes its requests with the same function.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

import httptools

_ESCAPED = re.compile("[\udc80-\udcff]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
READ_SIZE = 65536


def has_binary(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a header value holds bytes that are not UTF-8 (as surrogate escapes)."""
    return any(_ESCAPED.search(value) for _, value in headers)


class RawResponse:
    __slots__ = ("status", "headers", "body", "head_done", "complete")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.head_done = False
        self.complete = False

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_message_complete(self) -> None:
        self.complete = True


BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods sent without ``Content-Length`` when they carry no body (as aiohttp sends them)."""


def request_bytes(method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                  keep_alive: bool = False) -> bytes:
    """The request as sent; raises ValueError for a line break in a header (it would split the request).

    ``keep_alive``: leave the connection open for another request (else ``Connection: close``).
    """
    parts = urlsplit(url)
    target = url.split("://", 1)[1][len(parts.netloc):] or "/"
    return encode_request(method, target, parts.netloc, headers, body, keep_alive=keep_alive)


def encode_request(method: str, target: str, netloc: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                   keep_alive: bool) -> bytes:
    """:func:`request_bytes` of a URL already split: its ``host[:port]`` and its ``/path?query``."""
    return b"".join(request_parts(method, target, netloc, headers, body, keep_alive=keep_alive))


def request_parts(method: str, target: str, netloc: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                  keep_alive: bool) -> list[bytes]:
    """:func:`encode_request` in pieces, the body (the last) as given: a large body is written without a copy."""
    if not _TOKEN.fullmatch(method) or _UNSAFE_TARGET.search(target):  # it would split the request line
        raise ValueError(f"method {method[:50]!r} or target {target[:200]!r} cannot be sent as they are")
    host = None
    lines = []
    for name, value in headers:
        lower = name.lower()
        if lower in _FRAMING:
            if lower == "host" and host is None:  # the first Host sent wins
                host = value
            continue
        lines += ("\r\n", name, ": ", value)
    if host is None:
        host = netloc
    # One check over the whole head: each header adds one CR LF, so any other CR or LF is inside a name or a
    # value, where it would split the request.
    head = "".join(lines)
    breaks = len(lines) // 4
    if head.count("\n") != breaks or head.count("\r") != breaks or "\r" in host or "\n" in host:
        raise ValueError(f"header {_broken(headers, host)!r} contains a line break")
    data = [f"{method} {target} HTTP/1.1\r\nHost: ".encode("latin-1"), host.encode("utf-8", "surrogateescape"),
            head.encode("utf-8", "surrogateescape")]
    if body or method.upper() not in BODYLESS:
        data.append(b"\r\nContent-Length: %d" % len(body))
    data.append(b"\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n")
    data.append(body)
    return data


def _broken(headers: Iterable[tuple[str, str]], host: str) -> str:
    """The name of the first header with a line break (the error message's)."""
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            return name
    return "Host"


async def exchange(method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                   timeout: float) -> RawResponse:
    """Send one request to ``url`` and read its whole response.

    Raises TimeoutError, OSError (no connection, cut off) or httptools.HttpParserError (not HTTP).
    """
    headers = list(headers)
    data = request_bytes(method, url, headers, body)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    response = RawResponse()
    parser = httptools.HttpResponseParser(response)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
        try:
            writer.write(data)
            await writer.drain()
            while not response.complete:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    break
                parser.feed_data(chunk)
        finally:
            writer.close()
    if not response.head_done:
        raise ConnectionResetError("the connection closed before a response")
    response.status = parser.get_status_code()
    return response  # incomplete only when the body ran to the close (HEAD, or no length given)
