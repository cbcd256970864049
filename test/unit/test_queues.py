"""The per-Service key layout, and how a Service's Retry-After is read: table tests."""

from __future__ import annotations

import fnmatch

import pytest
from redis.crc import key_slot

from async_component.dataplane.deadletters import dead_letter_key
from async_component.dataplane.idempotency import key_name
from async_component.dataplane.notifications import outbox_key
from async_component.dataplane.queues import SINGLE, SLOTS, Layout, labels_of, service_of, service_tag, slot_tag
from async_component.settings import ReplaySettings
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


@pytest.mark.parametrize("host", ["hello.default.svc.cluster.local", "blue-hello.team-a.svc.corp.internal:8080",
                                  "api.example.com"])
def test_on_a_cluster_every_key_of_one_service_is_in_its_slot(host):
    """Scripts and transactions touch one slot: the Service's keys and the per-slot keys written with them."""
    settings = ReplaySettings(redis_url="redis+cluster://127.0.0.1:7000")
    layout = Layout.of(settings)
    queue = layout.for_host(host)
    keys = [queue.stream, queue.retry_stream, queue.retries, layout.active_for(queue), layout.wake_for(queue),
            record_key("async", "id1", host), key_name("async", host, "k1"),
            dead_letter_key(settings, service_tag(host)),
            outbox_key("async", key_slot(record_key("async", "id1", host).encode()))]
    assert {key_slot(key.encode()) for key in keys} == {key_slot(queue.stream.encode())}
    assert layout.active_for(queue) in layout.all_active and layout.active_for(queue) != layout.active


def test_on_one_server_the_global_keys_keep_their_names():
    settings = ReplaySettings()
    layout = Layout.of(settings)
    queue = layout.for_host("hello.default.svc.cluster.local")
    assert (layout.active_for(queue), layout.wake_for(queue)) == ("async:active", "async:wake")
    assert dead_letter_key(settings, "default/hello") == settings.dead_letter_stream
    assert outbox_key("async") == "async:notifications"


def test_every_slot_has_a_tag_of_its_own():
    assert [key_slot(f"{{{slot_tag(slot)}}}".encode()) for slot in range(SLOTS)] == list(range(SLOTS))


@pytest.mark.parametrize(("prefix", "pattern"), [("async", "async:{@*}:wake"), ("a*b", "a\\*b:{@*}:wake")])
def test_sources_subscribe_to_every_slots_wake_channel(prefix, pattern):
    layout = Layout(prefix, "s", cluster=True)
    assert layout.wake_pattern == pattern
    assert fnmatch.fnmatchcase(layout.wake_for(layout.for_host("x.y.svc.cluster.local")), pattern.replace("\\", ""))
