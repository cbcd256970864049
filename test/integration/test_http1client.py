"""The replay's HTTP/1.1 client against servers that answer byte by byte over real sockets.

Each server reads one request head (and its Content-Length body) at a time
and writes what the test scripted for it, so keep-alive, framing and the odd
answers a Service may give are exercised exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tracemalloc

import httptools
import pytest

from async_component.dataplane import http1client, rawhttp
from async_component.dataplane.http1client import Client, InvalidURL
from async_component.local.ports import free_port


class Scripted:
    """Answers request n with ``answers[n]`` (bytes, or a callable of the writer); counts connections."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if callable(answer):
                    await answer(writer)
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(*answers, max_body: int = 0):
    scripted = Scripted(*answers)
    scripted.server = await asyncio.start_server(scripted.handle, "127.0.0.1", scripted.port)
    client = Client(max_body=max_body)
    try:
        yield scripted, client
    finally:
        await client.close()
        scripted.server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Reply: yes\r\n\r\nok"


async def test_requests_in_turn_share_one_kept_alive_connection():
    async with serving(OK, OK, OK) as (server, client):
        for n in range(3):
            response = await client.request("POST", f"{server.url}/n/{n}", [("Host", "svc"), ("X-N", str(n))],
                                            b"body", timeout=5)
            assert (response.status, bytes(response.body)) == (200, b"ok")
            assert (b"X-Reply", b"yes") in response.headers
    assert server.connections == 1
    assert server.requests[0] == (b"POST /n/0 HTTP/1.1\r\nHost: svc\r\nX-N: 0\r\nContent-Length: 4\r\n\r\nbody")


async def test_header_bytes_that_are_not_utf8_go_out_exactly_as_queued():
    async with serving(OK) as (server, client):
        value = b"caf\xe9".decode("utf-8", "surrogateescape")
        await client.request("GET", f"{server.url}/", [("X-Raw", value)], b"", timeout=5)
    assert b"\r\nX-Raw: caf\xe9\r\n" in server.requests[0]
    assert b"Content-Length" not in server.requests[0]  # a GET without a body, as aiohttp sent it


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
])
async def test_a_connection_the_service_closes_is_not_reused(answer):
    async with serving(answer, OK) as (server, client):
        for _ in range(2):
            response = await client.request("GET", f"{server.url}/", [], b"", timeout=5)
            assert bytes(response.body) == b"ok"
    assert server.connections == 2


async def test_an_idle_connection_the_service_dropped_is_not_used_again():
    async def close_after(writer):
        writer.write(OK)
        await writer.drain()
    async with serving(close_after, OK) as (server, client):
        await client.request("GET", f"{server.url}/", [], b"", timeout=5)
        await asyncio.sleep(0.1)  # the server has closed its side meanwhile
        response = await client.request("GET", f"{server.url}/", [], b"", timeout=5)
    assert response.status == 200 and server.connections == 2


async def test_an_idle_connection_older_than_the_idle_limit_is_closed_not_reused(monkeypatch):
    monkeypatch.setattr(http1client, "IDLE_SECONDS", 0.05)
    async with serving(OK, OK) as (server, client):
        await client.request("GET", f"{server.url}/", [], b"", timeout=5)
        await asyncio.sleep(0.1)
        await client.request("GET", f"{server.url}/", [], b"", timeout=5)
    assert server.connections == 2


async def test_a_chunked_body_is_read_whole_and_the_connection_kept():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with serving(chunked, OK) as (server, client):
        response = await client.request("GET", f"{server.url}/", [], b"", timeout=5)
        assert bytes(response.body) == b"abcde"
        await client.request("GET", f"{server.url}/", [], b"", timeout=5)
    assert server.connections == 1


async def test_a_body_that_runs_to_the_close_is_read_whole():
    async def unframed(writer):
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
    async with serving(unframed) as (server, client):
        response = await client.request("GET", f"{server.url}/", [], b"", timeout=5)
    assert (response.status, bytes(response.body)) == (200, b"all of it")


async def test_a_body_cut_short_of_its_length_is_an_error():
    async def cut(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    async with serving(cut) as (server, client):
        with pytest.raises(ConnectionResetError):
            await client.request("GET", f"{server.url}/", [], b"", timeout=5)


async def test_a_head_answer_has_no_body_whatever_its_length_says():
    async with serving(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", OK) as (server, client):
        response = await client.request("HEAD", f"{server.url}/", [], b"", timeout=5)
        assert (response.status, bytes(response.body)) == (200, b"")
        assert (await client.request("GET", f"{server.url}/", [], b"", timeout=5)).status == 200
    assert server.connections == 2  # not reused after a HEAD


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n",  # said at once: nothing of the body is read
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n5\r\nghijk\r\n0\r\n\r\n",
    b"HTTP/1.1 201 Created\r\n\r\nabcdefghijk",  # running to the close
])
async def test_a_body_longer_than_max_body_raises_and_drops_the_connection(answer):
    async with serving(answer, OK, max_body=10) as (server, client):
        with pytest.raises(http1client.ResponseTooLarge, match="answered 201 with a body of more than 10 bytes"):
            await client.request("GET", f"{server.url}/", [], b"", timeout=5)
        assert (await client.request("GET", f"{server.url}/", [], b"", timeout=5)).status == 200
    assert server.connections == 2


async def test_a_body_of_max_body_bytes_is_read_whole_and_a_head_answer_says_any_length():
    whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n"
    async with serving(whole, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", max_body=10) as (server, client):
        assert bytes((await client.request("GET", f"{server.url}/", [], b"", timeout=5)).body) == b"abcdefghij"
        assert (await client.request("HEAD", f"{server.url}/", [], b"", timeout=5)).status == 200


async def test_an_interim_1xx_answer_is_skipped():
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade"
    async with serving(interim) as (server, client):
        response = await client.request("POST", f"{server.url}/", [("Expect", "100-continue")], b"x", timeout=5)
    assert (response.status, bytes(response.body)) == (201, b"made")


async def test_no_answer_within_the_timeout_raises_and_drops_the_connection():
    async def silent(writer):
        await asyncio.sleep(5)
    async with serving(silent, OK) as (server, client):
        with pytest.raises(TimeoutError):
            await client.request("GET", f"{server.url}/", [], b"", timeout=0.2)
        assert (await client.request("GET", f"{server.url}/", [], b"", timeout=5)).status == 200
    assert server.connections == 2


async def test_a_reply_that_is_not_http_raises_the_parsers_error():
    async with serving(b"SSH-2.0-OpenSSH\r\n\r\n") as (server, client):
        with pytest.raises(httptools.HttpParserError):
            await client.request("GET", f"{server.url}/", [], b"", timeout=5)


async def test_no_server_listening_raises_connection_refused():
    client = Client()
    with pytest.raises(ConnectionRefusedError):
        await client.request("GET", f"http://127.0.0.1:{free_port()}/", [], b"", timeout=5)
    await client.close()


@pytest.mark.parametrize("method, url, headers, error", [
    ("GET", "http://127.0.0.1:port/", [], InvalidURL),
    ("GET", "ftp://127.0.0.1/", [], InvalidURL),
    ("GET /x HTTP/1.1\r\nX:", "http://127.0.0.1:1/", [], ValueError),
    ("GET", "http://127.0.0.1:1/a b", [], ValueError),
    ("GET", "http://127.0.0.1:1/", [("X-A", "1\r\nInjected: yes")], ValueError),
])
async def test_what_cannot_be_sent_as_it_is_is_refused_before_connecting(method, url, headers, error):
    client = Client()
    with pytest.raises(error):
        await client.request(method, url, headers, b"", timeout=5)
    await client.close()


async def test_a_request_that_failed_leaves_nothing_to_collect_holding_its_body():
    """A failed exchange must not hold its request in a reference cycle: the source collects
    rarely (gcpolicy), so every large body that timed out would stay in memory until then."""
    async def silent(writer):
        await asyncio.sleep(5)
    async def reset(writer):
        writer.transport.abort()
    body_size = 4 * 1024 * 1024
    async with serving(silent, reset) as (server, client):
        gc.disable()
        tracemalloc.start()
        try:
            for timeout in (0.2, 5):  # no answer in time; the connection cut
                try:
                    await client.request("POST", f"{server.url}/", [], b"x" * body_size, timeout=timeout)
                except (TimeoutError, ConnectionResetError):
                    pass
                server.requests.clear()
                await asyncio.sleep(0)  # the loop's handle that woke this task holds the failed future until then
                held = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(True, rawhttp.__file__), tracemalloc.Filter(True, __file__)])
                assert sum(stat.size for stat in held.statistics("filename")) < body_size // 4
        finally:
            tracemalloc.stop()
            gc.enable()


async def test_a_large_body_goes_out_whole_without_a_copy_of_it_and_a_small_one_in_one_piece():
    """While a 4 MiB request waits for its answer, the client holds no copy of its body (the replay of a large
    body costs its envelope and its body, not a third copy joined to the head)."""
    body_size = 4 * 1024 * 1024
    copies = []

    async def answer_after_a_look(writer):
        held = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, rawhttp.__file__), tracemalloc.Filter(True, http1client.__file__)])
        copies.append(sum(stat.size for stat in held.statistics("filename")))
        writer.write(OK)
        await writer.drain()

    async with serving(OK, answer_after_a_look) as (server, client):
        small = await client.request("POST", f"{server.url}/small", [("X-A", "1")], b"tiny", timeout=5)
        assert small.status == 200
        body = bytes(range(256)) * (body_size // 256)
        tracemalloc.start()
        try:
            response = await client.request("POST", f"{server.url}/big", [("X-A", "1")], body, timeout=5)
        finally:
            tracemalloc.stop()
        assert response.status == 200
    assert copies and copies[0] < 64 * 1024, copies
    tiny, big = server.requests
    assert big.endswith(b"\r\n\r\n" + body) and b"Content-Length: %d\r\n" % body_size in big
    assert tiny.startswith(b"POST /small HTTP/1.1\r\n") and tiny.endswith(b"\r\n\r\ntiny")
