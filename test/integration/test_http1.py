"""The producer's HTTP/1.1 server, spoken to byte by byte over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from async_component.dataplane.http1 import Request, Response, Server, json_response
from async_component.local.ports import free_port

LIMIT = 1000


class Echo:
    """Answers with what it received; ``?wait=<s>`` delays the answer, ``/boom`` raises."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        if "wait=" in request.target:
            await asyncio.sleep(float(request.target.rpartition("wait=")[2]))
        if request.path == "/hold":
            await self.release.wait()
        if request.path == "/boom":
            raise RuntimeError("a bug")
        if request.path == "/bad-header":
            return Response(200, b"", [("X-Bad", "a\r\nInjected: yes")])
        return json_response(200, {
            "method": request.method, "target": request.target, "path": request.path, "version": request.version,
            "headers": [[k.decode(), v.decode()] for k, v in request.headers], "body": request.body.decode("latin-1"),
        }, [("X-Multi", "1"), ("X-Multi", "2")])


@pytest.fixture
async def served():
    echo = Echo()
    refused: list[int] = []
    server = Server(echo, max_body=LIMIT, on_refused=lambda status, reason: refused.append(status))
    port = free_port()
    await server.start("127.0.0.1", port)
    yield echo, server, port, refused
    await server.close(grace=1)


async def exchange(port: int, data: bytes, *, until_closed: bool = True, timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        if until_closed:
            return await asyncio.wait_for(reader.read(), timeout)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


def responses(raw: bytes) -> list[tuple[int, dict[str, list[str]], bytes]]:
    """Split a byte stream into (status, headers, body) by Content-Length."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        found.append((status, headers, rest[:length]))
        raw = rest[length:]
    return found


async def test_a_client_gets_answers_on_one_kept_alive_connection(served):
    echo, _, port, _ = served
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for n in range(3):
            async with session.post(f"http://127.0.0.1:{port}/items/{n}?q=%20x", data=b"body",
                                    headers=[("X-Tag", "a"), ("X-Tag", "b")]) as resp:
                assert resp.status == 200
                assert resp.headers.getall("X-Multi") == ["1", "2"]
                assert "Date" in resp.headers
                doc = await resp.json()
            assert doc["target"] == f"/items/{n}?q=%20x" and doc["path"] == f"/items/{n}"
            assert doc["body"] == "body" and doc["method"] == "POST"
            assert [v for k, v in doc["headers"] if k == "X-Tag"] == ["a", "b"]
    assert len(echo.seen) == 3


async def test_pipelined_requests_are_answered_in_order(served):
    _, _, port, _ = served
    raw = b"".join(f"GET /{n}?wait={0.05 * (3 - n)} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in range(3))
    raw += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = responses(await exchange(port, raw))
    assert [json.loads(body)["path"] for _, _, body in answers] == ["/0", "/1", "/2", "/last"]
    assert answers[-1][1]["connection"] == ["close"]


async def test_http10_closes_unless_asked_to_keep_alive(served):
    _, _, port, _ = served
    [(status, headers, _)] = responses(await exchange(port, b"GET /a HTTP/1.0\r\n\r\n"))
    assert status == 200 and headers["connection"] == ["close"]
    first = await exchange(port, b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", until_closed=False)
    [(status, headers, body)] = responses(first)
    assert headers["connection"] == ["keep-alive"] and json.loads(body)["version"] == "1.0"


async def test_a_chunked_body_arrives_whole(served):
    _, _, port, _ = served
    raw = (b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    [(status, _, body)] = responses(await exchange(port, raw))
    assert status == 200 and json.loads(body)["body"] == "hello world"


@pytest.mark.parametrize("raw", [
    b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n",
    b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n" * 1
    + b"200\r\n" + b"x" * 512 + b"\r\n",
], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_refused_with_413_and_the_connection_closed(served, raw):
    echo, _, port, refused = served
    [(status, headers, body)] = responses(await exchange(port, raw))
    assert status == 413 and headers["connection"] == ["close"]
    assert json.loads(body) == {"error": f"the body is larger than {LIMIT} bytes"}
    assert echo.seen == [] and refused == [413]


async def test_expect_100_continue_is_honoured_and_other_expectations_refused(served):
    _, _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    [(status, _, body)] = responses(await asyncio.wait_for(reader.read(65536), 5))
    assert status == 200 and json.loads(body)["body"] == "ok"
    writer.close()
    [(status, _, _)] = responses(await exchange(port, b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                                      b"Expect: something-else\r\n\r\nok"))
    assert status == 417


@pytest.mark.parametrize("raw, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (n, b"v" * 1000) for n in range(70)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(100)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: v\r\n" * 5000 + b"\r\n", 431),
], ids=["garbage", "bad-length", "long-target", "huge-headers", "no-host", "two-hosts", "two-hosts-http10",
        "http2-request-line", "101-fields", "5000-fields"])
async def test_malformed_requests_get_a_status_and_a_message_then_close(served, raw, status):
    echo, _, port, refused = served
    [(got, headers, body)] = responses(await exchange(port, raw))
    assert got == status and headers["connection"] == ["close"]
    assert json.loads(body)["error"]
    assert echo.seen == [] and refused == [status]


async def test_an_http10_request_needs_no_host_and_100_header_fields_pass(served):
    echo, _, port, _ = served
    [(status, _, _)] = responses(await exchange(port, b"GET /old HTTP/1.0\r\n\r\n"))
    assert status == 200
    many = b"GET /many HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        b"X-%d: v\r\n" % n for n in range(98)) + b"\r\n"
    [(status, _, body)] = responses(await exchange(port, many))
    assert status == 200 and len(json.loads(body)["headers"]) == 100


async def test_chunked_trailers_are_dropped_not_taken_for_headers(served):
    echo, _, port, _ = served
    raw = (b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sneaky\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n0\r\nX-Sneaky: yes\r\nHost: evil\r\n\r\n")
    [(status, _, body)] = responses(await exchange(port, raw))
    assert status == 200
    echoed = json.loads(body)
    assert echoed["body"] == "hello"
    assert [name for name, _ in echoed["headers"]] == ["Host", "Transfer-Encoding", "Trailer", "Connection"]


@pytest.mark.parametrize("size_line", [b"3e9\r\n", b"FFFFFFFF\r\n", b"3E9;ext=1\r\n", b"400\r\nxyz"])
@pytest.mark.parametrize("split", [False, True])
async def test_a_chunk_announcing_more_than_the_limit_is_refused_at_once(served, size_line, split):
    """Not after the stall timeout: the client need never send the chunk it announced."""
    echo, _, port, refused = served
    head = b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\nhello\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if split:  # the size line in a read of its own
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(size_line)
    else:
        writer.write(head + size_line)
    [(status, headers, _)] = responses(await asyncio.wait_for(reader.read(), 2))
    assert status == 413 and headers["connection"] == ["close"]
    assert echo.seen == [] and refused == [413]
    writer.close()


async def test_a_chunk_that_fits_the_limit_is_not_refused(served):
    echo, _, port, _ = served
    raw = (b"POST /fits HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"1F4\r\n" + b"a" * 500 + b"\r\n1F4\r\n" + b"b" * 500 + b"\r\n0\r\n\r\n")
    [(status, _, body)] = responses(await exchange(port, raw))
    assert status == 200 and len(json.loads(body)["body"]) == 1000


async def test_head_answers_the_length_without_a_body(served):
    _, _, port, _ = served
    raw = b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await exchange(port, raw)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and int(responses(head + b"\r\n\r\n")[0][1]["content-length"][0]) > 0
    assert rest.startswith(b"HTTP/1.1 200 OK")  # the next answer follows at once: no body was sent for HEAD


async def test_a_failing_handler_is_a_500_and_the_connection_goes_on(served, caplog):
    _, _, port, _ = served
    raw = (b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\nGET /bad-header HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with caplog.at_level(logging.ERROR):
        answers = responses(await exchange(port, raw))
    assert [status for status, _, _ in answers] == [500, 500, 200]
    assert b"Injected" not in b"".join(body for _, _, body in answers)
    assert "a bug" in caplog.text and "line break" in caplog.text


async def test_an_upgrade_is_answered_as_plain_http_then_closed(served):
    _, _, port, _ = served
    raw = b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    [(status, headers, _)] = responses(await exchange(port, raw))
    assert status == 200 and headers["connection"] == ["close"]


async def test_idle_and_stalled_connections_are_closed():
    server = Server(Echo(), max_body=LIMIT, idle_timeout=0.2, request_timeout=0.2)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # idle: closed without a word
        writer.close()
        stalled = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", timeout=3)
        assert responses(stalled)[0][0] == 408
    finally:
        await server.close()


async def test_close_lets_the_request_in_progress_finish_and_refuses_new_connections(served):
    echo, server, port, _ = served
    echo.release.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    while not echo.seen:
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(server.close(grace=5))
    await asyncio.sleep(0.05)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    echo.release.set()
    [(status, headers, _)] = responses(await asyncio.wait_for(reader.read(), 5))
    assert status == 200 and headers["connection"] == ["close"]
    await closing
    writer.close()


async def test_a_client_that_goes_away_does_not_stop_the_server(served):
    echo, _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /gone?wait=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.2)
    [(status, _, _)] = responses(await exchange(port, b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 200 and [r.path for r in echo.seen] == ["/gone", "/next"]


async def test_a_client_that_sends_its_whole_oversized_body_still_reads_the_413(served):
    _, _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    size = 4_000_000
    writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    for _ in range(size // 65536 + 1):  # the whole body, as a proxy streaming it would, before reading
        writer.write(b"x" * 65536)
        await writer.drain()
    [(status, _, _)] = responses(await asyncio.wait_for(reader.read(), 10))
    assert status == 413
    writer.close()


async def test_a_client_that_half_closes_after_its_request_gets_the_answer(served):
    _, _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /half?wait=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.write_eof()
    [(status, _, body)] = responses(await asyncio.wait_for(reader.read(), 5))
    assert status == 200 and json.loads(body)["path"] == "/half"
    writer.close()


async def dribble(port: int, data: bytes, interval: float, *, first: bytes = b"",
                  until: float = 10) -> tuple[bytes, float]:
    """Send ``first``, then ``data`` one byte per ``interval`` (a slowloris); the answer and when it came."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    read = asyncio.create_task(reader.read())
    try:
        for byte in data:
            if read.done():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(interval)
        answer = await asyncio.wait_for(read, until)
        return answer, loop.time() - started
    finally:
        writer.close()


async def test_headers_dribbled_a_byte_at_a_time_are_cut_off_after_the_header_timeout():
    """Each byte restarts the stall timeout; the whole header block still has a deadline."""
    server = Server(Echo(), max_body=LIMIT, request_timeout=5, header_timeout=0.5)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        request = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
        answer, elapsed = await dribble(port, request, 0.05)
        [(status, headers, body)] = responses(answer)
        assert status == 408 and headers["connection"] == ["close"]
        assert b"headers" in body
        assert elapsed < 3
    finally:
        await server.close()


async def test_a_body_slower_than_the_minimum_rate_is_cut_off():
    server = Server(Echo(), max_body=100_000, request_timeout=5, header_timeout=0.5, body_min_rate=100)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        answer, elapsed = await dribble(port, b"x" * 1000, 0.02, first=head)
        # the headers arrive in time; the body at ~50 B/s falls behind 0.5 s + 1 s per 100 B
        [(status, _, body)] = responses(answer)
        assert status == 408 and b"slower" in body
        assert elapsed < 4
        fast, _ = await dribble(port, b"x" * 100, 0.001,
                                first=head.replace(b"1000", b"100").replace(b"Host: x", b"Host: x\r\nConnection: close"))
        assert responses(fast)[0][0] == 200
    finally:
        await server.close()


async def test_connections_over_the_cap_are_refused_with_one_log_line(caplog):
    server = Server(Echo(), max_body=LIMIT, max_connections=2)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        for _ in range(3):
            [(status, headers, _)] = responses(await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
            assert status == 503 and headers["connection"] == ["close"]
        capped = [r for r in caplog.records if "connection cap" in r.getMessage()]
        assert len(capped) == 1 and "2" in capped[0].getMessage()
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.1)
        [(status, _, _)] = responses(await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert status == 200
    finally:
        await server.close()


# --- the bound on body bytes held

HELD = 1500
"""The test server's max_held: one request of LIMIT (1000) bytes fits, two do not."""


@pytest.fixture
async def bounded():
    echo = Echo()
    refused: list[tuple[int, str]] = []
    server = Server(echo, max_body=LIMIT, max_held=HELD, on_refused=lambda status, reason: refused.append(
        (status, reason)))
    port = free_port()
    await server.start("127.0.0.1", port)
    yield echo, port, refused
    await server.close(grace=1)


async def held_request(port: int, echo: Echo, raw: bytes):
    """A request the server holds unanswered (echo.release cleared); returns its connection."""
    seen = len(echo.seen)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    while len(echo.seen) == seen:
        await asyncio.sleep(0.01)
    return reader, writer


def post(size: int, path: str = "/p") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), size) + b"x" * size


async def test_a_request_whose_body_would_pass_the_bytes_held_is_refused_503_until_others_are_answered(bounded):
    echo, port, refused = bounded
    echo.release.clear()
    reader, writer = await held_request(port, echo, post(LIMIT, "/hold"))
    answer = responses(await exchange(port, post(600)))  # 1000 + 600 held would pass 1500
    [(status, headers, body)] = answer
    assert status == 503 and headers["retry-after"] == ["1"] and headers["connection"] == ["close"]
    assert "BODY_MEMORY_LIMIT 1500" in json.loads(body)["error"]
    assert refused == [(503, "body_memory")] and [r.path for r in echo.seen] == ["/hold"]
    last = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert [status for status, _, _ in responses(await exchange(port, post(400) + last))] == [200, 200]  # 1400 fits
    echo.release.set()
    assert responses(await asyncio.wait_for(reader.read(65536), 5))[0][0] == 200
    writer.close()
    # the first was answered: its bytes are no longer held
    assert [status for status, _, _ in responses(await exchange(port, post(LIMIT) + last))] == [200, 200]


async def test_a_request_alone_is_taken_whatever_the_bound():
    """A bound under the body limit never refuses a request of REQUEST_SIZE_LIMIT that arrives alone."""
    echo = Echo()
    server = Server(echo, max_body=LIMIT, max_held=10)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        raw = post(LIMIT).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        assert [status for status, _, _ in responses(await exchange(port, raw))] == [200]
    finally:
        await server.close(grace=1)


async def test_a_chunked_body_counts_as_it_arrives(bounded):
    echo, port, refused = bounded
    echo.release.clear()
    reader, writer = await held_request(port, echo, post(LIMIT, "/hold"))
    chunks = b"".join(b"64\r\n" + b"y" * 100 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n"  # 600 bytes
    raw = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    [(status, headers, _)] = responses(await exchange(port, raw))
    assert status == 503 and headers["retry-after"] == ["1"] and refused == [(503, "body_memory")]
    echo.release.set()
    writer.close()


async def test_a_client_gone_mid_body_leaves_nothing_held(bounded):
    echo, port, refused = bounded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await asyncio.sleep(0.05)
    raw = post(900).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    [(status, _, _)] = responses(await exchange(port, raw))
    assert status == 200 and refused == []
