"""The bytes a replay writes: a header can never split the request, whatever a queued value holds."""

import httptools
import pytest

from async_component.dataplane.rawhttp import encode_request


def parsed(data: bytes) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
    class Seen:
        def __init__(self) -> None:
            self.url, self.headers, self.body, self.complete = b"", [], b"", False

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.complete = True

    seen = Seen()
    parser = httptools.HttpRequestParser(seen)
    parser.feed_data(data)
    assert seen.complete
    return parser.get_method().decode() + " " + seen.url.decode(), seen.headers, seen.body


def test_headers_go_out_in_order_after_the_host_the_first_host_given_wins():
    data = encode_request("POST", "/a?b=1", "gw:8080", [("Host", "svc.ns.svc"), ("X-A", "1"), ("host", "other"),
                                                        ("X-A", "2"), ("Content-Length", "99")], b"hey",
                          keep_alive=True)
    line, headers, body = parsed(data)
    assert line == "POST /a?b=1"
    assert headers == [(b"Host", b"svc.ns.svc"), (b"X-A", b"1"), (b"X-A", b"2"), (b"Content-Length", b"3")]
    assert body == b"hey"


def test_without_a_host_header_the_netloc_is_the_host_and_a_bodyless_get_has_no_length():
    data = encode_request("GET", "/", "gw:8080", [("Accept", "*/*")], b"", keep_alive=False)
    _, headers, _ = parsed(data)
    assert headers == [(b"Host", b"gw:8080"), (b"Accept", b"*/*"), (b"Connection", b"close")]


def test_a_value_that_is_not_utf8_goes_out_as_the_bytes_received():
    value = b"caf\xe9".decode("utf-8", "surrogateescape")
    _, headers, _ = parsed(encode_request("GET", "/", "gw", [("X-Raw", value), ("X-Text", "café")], b"",
                                          keep_alive=True))
    assert headers[1:] == [(b"X-Raw", b"caf\xe9"), (b"X-Text", "café".encode())]


@pytest.mark.parametrize("name, value", [
    ("X-A", "a\r\nX-Injected: 1"),
    ("X-A", "a\nb"),
    ("X-A", "a\rb"),
    ("X-A", "\r\n"),
    ("X-A\r\nX-B", "1"),
    ("Host", "svc\r\nX-Injected: 1"),
])
def test_a_line_break_in_a_name_or_value_is_refused(name, value):
    with pytest.raises(ValueError, match="line break"):
        encode_request("GET", "/", "gw", [("Accept", "*/*"), (name, value), ("X-Z", "z")], b"", keep_alive=True)
