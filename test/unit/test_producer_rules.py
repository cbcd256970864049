"""The producer's pure rules: target host, allow-list, forwarded headers, settings check."""

from __future__ import annotations

import dataclasses

import pytest

from async_component.dataplane.preferences import replay_preference
from async_component.dataplane.producer import ReplayLoop, forwarded_headers, validate, without_respond_async
from async_component.dataplane.targets import BadTarget, host_allowed, port_allowed, target_host
from async_component.settings import ConsumerSettings, ProducerSettings, SettingsError


@pytest.mark.parametrize("raw, expected", [
    ("Sleep.Default.svc.cluster.local", "sleep.default.svc.cluster.local"),
    (" a.b:8080 ", "a.b:8080"),
    ("10.0.0.1", "10.0.0.1"),
])
def test_target_host_normalises(raw, expected):
    assert target_host(raw) == expected


@pytest.mark.parametrize("raw", ["", "a b", "a..b", "a.-b", "a/b", "a:0", "a:65536", "a:", "[::1]", "user@a", "a" * 64 + ".b",
                                 "a:\uff16\uff13\uff17\uff19", "a:\u0666\u0663\u0667\u0669", "a:6379\u0663", "a:+80"])
def test_target_host_rejects_malformed(raw):
    with pytest.raises(BadTarget):
        target_host(raw)


@pytest.mark.parametrize("host, allowed_ports, expected", [
    ("s.ns.svc.cluster.local", (), True),
    ("s.ns.svc.cluster.local:80", (), True),
    ("s.ns.svc.cluster.local:6379", (), False),
    ("s.ns.svc.cluster.local:8080", (), False),
    ("s.ns.svc.cluster.local:8080", (8080,), True),
    ("s.ns.svc.cluster.local:6379", (8080,), False),
])
def test_only_the_service_port_and_allowed_ports_pass(host, allowed_ports, expected):
    assert port_allowed(host, allowed_ports) is expected


def test_allow_list_exact_and_suffix():
    allowed = ("api.example.com", ".svc.cluster.local")
    assert host_allowed("api.example.com", allowed)
    assert host_allowed("api.example.com:8443", allowed)
    assert host_allowed("s.ns.svc.cluster.local", allowed)
    assert not host_allowed("svc.cluster.local", allowed)
    assert not host_allowed("www.api.example.com", allowed)
    assert not host_allowed("api.example.com.evil.net", allowed)
    assert not host_allowed("xsvc.cluster.local", allowed)


@pytest.mark.parametrize("value, expected", [
    ("respond-async", ""),
    ("Respond-Async", ""),
    ("respond-async, wait=10", "wait=10"),
    ("wait=10,respond-async;x=1", "wait=10"),
    ('foo="a, respond-async", respond-async', 'foo="a, respond-async"'),
    ("handling=strict", "handling=strict"),
    ("respond-asyncx", "respond-asyncx"),
])
def test_prefer_loses_only_respond_async(value, expected):
    assert without_respond_async(value) == expected


@pytest.mark.parametrize("values, expected", [
    ([], "respond-sync"),
    (["respond-async"], "respond-sync"),
    ([" Respond-Async ", "RESPOND-ASYNC"], "respond-sync"),
    (["respond-async;x=1"], "respond-sync"),
    (["return=minimal"], "respond-sync, return=minimal"),
    (["respond-async, return=minimal", "handling=lenient"], "respond-sync, return=minimal, handling=lenient"),
    (["respond-sync", "wait=5"], "respond-sync, wait=5"),
    (['foo="a, respond-async"'], 'respond-sync, foo="a, respond-async"'),
])
def test_the_replay_says_respond_sync_first_and_keeps_the_other_preferences(values, expected):
    assert replay_preference(values) == expected


def test_a_replay_routed_back_to_the_producer_is_refused_not_queued():
    with pytest.raises(ReplayLoop):
        forwarded_headers([(b"Host", b"producer"), (b"Async-Replay", b"true")])


def test_forwarded_headers_keep_order_and_repeats_and_drop_transport_headers():
    raw = [
        (b"Host", b"producer"), (b"Content-Length", b"3"), (b"Async-Original-Host", b"a.b"),
        (b"X-A", b"1"), (b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"p"),
        (b"Prefer", b"respond-async"), (b"Prefer", b"wait=5"), (b"X-A", b"2"),
        (b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"timeout=5"), (b"X-Latin", "caf\xe9".encode("latin-1")),
        (b"X-Utf8", "caf\xe9".encode("utf-8")),
    ]
    assert forwarded_headers(raw, ["keep-alive, X-Private"]) == [
        ("X-A", "1"), ("Prefer", "wait=5"), ("X-A", "2"), ("X-Latin", "caf\udce9"), ("X-Utf8", "caf\xe9"),
    ]


def test_validate_rejects_wildcards_and_accepts_hosts_and_suffixes():
    ok = dataclasses.replace(ProducerSettings(), allowed_hosts=("api.example.com", ".svc.cluster.local"))
    assert validate(ok) is ok
    for entry in ("*", "*.example.com", ".", "a b"):
        with pytest.raises(SettingsError, match="ALLOWED_HOSTS"):
            validate(dataclasses.replace(ok, allowed_hosts=(entry,)))


def test_validate_rejects_a_wildcard_among_the_notification_sink_hosts_too():
    ok = dataclasses.replace(ConsumerSettings(), notification_allowed_hosts=("broker-ingress.knative-eventing.svc"
                                                                            ".cluster.local", ".example.com"))
    assert validate(ok) is ok
    with pytest.raises(SettingsError, match="NOTIFICATION_ALLOWED_HOSTS entry '\\*.example.com'"):
        validate(dataclasses.replace(ok, notification_allowed_hosts=("*.example.com",)))


def test_host_allowed_reads_each_settings_list_as_it_is_even_when_it_is_long():
    many = tuple(f"s{n}.default.svc.cluster.local" for n in range(1000)) + (".example.com",)
    assert host_allowed("s999.default.svc.cluster.local", many)
    assert host_allowed("api.example.com:8443", many)
    assert not host_allowed("s1000.default.svc.cluster.local", many)
    other = ("s1000.default.svc.cluster.local",)  # another settings object: its own entries, not the first's
    assert host_allowed("s1000.default.svc.cluster.local", other)
    assert not host_allowed("s999.default.svc.cluster.local", other)
    changing = ["a.example.org"]
    assert host_allowed("a.example.org", changing)
    changing[0] = "b.example.org"  # a list is read again each time
    assert not host_allowed("a.example.org", changing) and host_allowed("b.example.org", changing)
