"""The per-Service key layout, and how a Service's Retry-After is read: table tests."""

from __future__ import annotations

import pytest

from async_component.dataplane.queues import SINGLE, Layout, labels_of, service_of, service_tag
from async_component.dataplane.records import legacy_record_key, record_key
from async_component.dataplane.retries import retry_after


@pytest.mark.parametrize(("host", "service"), [
    ("hello.default.svc.cluster.local", ("default", "hello")),
    ("hello.default.svc.cluster.local:8080", ("default", "hello")),
    ("blue-hello.team-a.svc.corp.internal", ("team-a", "blue-hello")),
    ("api.example.com", ("", "api.example.com")),
    ("127.0.0.1:8080", ("", "127.0.0.1")),
    ("a.b.svc", ("", "a.b.svc")),
])
def test_the_service_of_a_target_host(host, service):
    assert service_of(host) == service


def test_a_services_keys_share_one_hash_tag_and_the_single_stream_keeps_its_names():
    layout = Layout("async", "async-requests")
    queue = layout.for_host("hello.default.svc.cluster.local")
    assert (queue.member, queue.stream, queue.retry_stream, queue.retries) == (
        "default/hello", "async:{default/hello}:q", "async:{default/hello}:rq", "async:{default/hello}:r")
    assert record_key("async", "id1", "hello.default.svc.cluster.local:80") == "async:{default/hello}:req:id1"
    assert legacy_record_key("async", "id1") == "async:req:id1"
    assert queue.streams == (queue.retry_stream, queue.stream)
    single = layout.single
    assert (single.member, single.stream, single.retry_stream, single.retries) == (
        SINGLE, "async-requests", "async-requests", "async:retries")
    assert single.streams == ("async-requests",)
    assert Layout("async", "async-requests", "single-stream").for_host("hello.default.svc.cluster.local") == single
    assert (layout.active, layout.wake) == ("async:active", "async:wake")
    assert service_tag("api.example.com") == "api.example.com"
    assert labels_of("default/hello") == ("default", "hello") and labels_of("api.example.com") == ("", "api.example.com")


NOW = 1_000_000_000.0  # Sun, 09 Sep 2001 01:46:40 GMT


@pytest.mark.parametrize(("status", "headers", "seconds"), [
    (503, [("Retry-After", "7")], 7.0),
    (429, [("retry-after", " 120 ")], 120.0),
    (503, [("Retry-After", "Sun, 09 Sep 2001 01:47:00 GMT")], 20.0),
    (503, [("Retry-After", "Sun, 09 Sep 2001 01:40:00 GMT")], 0.0),  # in the past: at once
    (503, [("Retry-After", "soon")], None),
    (503, [("Retry-After", "-3")], None),
    (503, [], None),
    (502, [("Retry-After", "7")], None),  # only 429 and 503 say when to come back
    (200, [("Retry-After", "7")], None),
])
def test_retry_after_of_a_service(status, headers, seconds):
    assert retry_after(status, headers, now=NOW) == seconds
