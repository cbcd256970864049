"""The delivery policy: annotations in, a policy or the annotation at fault out; its header both ways."""

from __future__ import annotations

import pytest

from async_component import protocol
from async_component.controller import policy as p
from async_component.controller import resources as r
from async_component.protocol import DeliveryPolicy

# annotation, value, the field it sets and to what (None: the value is refused)
ROWS = [
    (p.RETRY, "5", "retry", 5),
    (p.RETRY, "0", "retry", 0),
    (p.RETRY, " 2 ", "retry", 2),
    (p.RETRY, "-1", "retry", None),
    (p.RETRY, "1.5", "retry", None),
    (p.RETRY, "five", "retry", None),
    (p.RETRY, "1001", "retry", None),
    (p.RETRY, "", "retry", None),
    (p.BACKOFF_POLICY, "exponential", "backoff_policy", "exponential"),
    (p.BACKOFF_POLICY, "linear", "backoff_policy", "linear"),
    (p.BACKOFF_POLICY, "Linear", "backoff_policy", None),
    (p.BACKOFF_POLICY, "random", "backoff_policy", None),
    (p.BACKOFF_DELAY, "PT1S", "backoff_delay", 1.0),
    (p.BACKOFF_DELAY, "PT0.25S", "backoff_delay", 0.25),
    (p.BACKOFF_DELAY, "PT0S", "backoff_delay", 0.0),
    (p.BACKOFF_DELAY, "1s", "backoff_delay", None),
    (p.BACKOFF_DELAY, "1", "backoff_delay", None),
    (p.TIMEOUT, "PT1S", "timeout", 1.0),
    (p.TIMEOUT, "PT2M30S", "timeout", 150.0),
    (p.TIMEOUT, "PT1H", "timeout", 3600.0),
    (p.TIMEOUT, "pt1s", "timeout", 1.0),
    (p.TIMEOUT, "PT0S", "timeout", None),
    (p.TIMEOUT, "PT", "timeout", None),
    (p.TIMEOUT, "P", "timeout", None),
    (p.TIMEOUT, "P1M", "timeout", None),
    (p.TIMEOUT, "P1Y", "timeout", None),
    (p.TIMEOUT, "PT-1S", "timeout", None),
    (p.RETRY_ON, "429,502,503,504", "retry_on", ("429", "502", "503", "504")),
    (p.RETRY_ON, "5xx,429", "retry_on", ("429", "5xx")),
    (p.RETRY_ON, "5XX, 429 ,429", "retry_on", ("429", "5xx")),
    (p.RETRY_ON, "600", "retry_on", None),
    (p.RETRY_ON, "5x", "retry_on", None),
    (p.RETRY_ON, "429,,502", "retry_on", None),
    (p.RETRY_ON, "", "retry_on", None),
    (p.MAX_AGE, "PT2S", "max_age", 2.0),
    (p.MAX_AGE, "P1D", "max_age", 86400.0),
    (p.MAX_AGE, "P1DT12H", "max_age", 129600.0),
    (p.MAX_AGE, "P1W", "max_age", 604800.0),
    (p.MAX_AGE, "P0D", "max_age", None),
    (p.MAX_AGE, "P1DT", "max_age", None),
    (p.MAX_AGE, "2s", "max_age", None),
    (p.RETENTION, "PT1H", "retention", 3600.0),
    (p.RETENTION, "PT0S", "retention", None),
    (p.RETENTION, "forever", "retention", None),
    (p.MAX_INFLIGHT, "10", "max_inflight", 10),
    (p.MAX_INFLIGHT, "0", "max_inflight", None),
    (p.MAX_INFLIGHT, "ten", "max_inflight", None),
    (p.MAX_QUEUED, "1000", "max_queued", 1000),
    (p.MAX_QUEUED, "0", "max_queued", None),
    (p.ON_SUCCESS_SINK, "http://sink.demo.svc.cluster.local/done", "on_success_sink",
     "http://sink.demo.svc.cluster.local/done"),
    (p.ON_SUCCESS_SINK, "https://hooks.example.com:8443/a%20b?x=1;y=2", "on_success_sink",
     "https://hooks.example.com:8443/a%20b?x=1;y=2"),
    (p.ON_SUCCESS_SINK, "sink.demo.svc", "on_success_sink", None),
    (p.ON_SUCCESS_SINK, "ftp://sink.example.com/", "on_success_sink", None),
    (p.ON_SUCCESS_SINK, "http://sink.example.com:99999/", "on_success_sink", None),
    (p.ON_SUCCESS_SINK, "http://sink.example.com/a b", "on_success_sink", None),
    (p.ON_FAILURE_SINK, "http://dlq.demo.svc.cluster.local", "on_failure_sink", "http://dlq.demo.svc.cluster.local"),
    (p.ON_FAILURE_SINK, "http:///nohost", "on_failure_sink", None),
]


@pytest.mark.parametrize(("annotation", "value", "field", "expected"), ROWS,
                         ids=[f"{a.split('/')[1]}={v!r}" for a, v, _, _ in ROWS])
def test_annotation(annotation, value, field, expected):
    annotations = {"serving.knative.dev/creator": "admin", annotation: value}
    if expected is None:
        with pytest.raises(p.InvalidAsyncPolicy) as raised:
            p.delivery_policy(annotations)
        assert raised.value.annotation == annotation
        assert annotation in str(raised.value) and repr(value) in str(raised.value)
        return
    policy = p.delivery_policy(annotations)
    assert getattr(policy, field) == expected
    assert policy == DeliveryPolicy(**{field: expected}), "no other field is set"
    assert DeliveryPolicy.decode(policy.encode()) == policy


def test_every_annotation_is_in_the_table():
    assert {a for a, *_ in ROWS} == set(p.ANNOTATIONS)


def test_absent_annotations_leave_the_cluster_defaults():
    policy = p.delivery_policy({"networking.knative.dev/ingress.class": r.ASYNC_INGRESS_CLASS})
    assert policy == protocol.DEFAULT_POLICY
    assert policy.encode() == "v1"


def test_the_whole_policy_survives_the_header():
    annotations = {p.RETRY: "5", p.BACKOFF_POLICY: "linear", p.BACKOFF_DELAY: "PT0.5S", p.TIMEOUT: "PT1S",
                   p.RETRY_ON: "5xx,429", p.MAX_AGE: "PT2S", p.RETENTION: "PT1H", p.MAX_INFLIGHT: "4",
                   p.MAX_QUEUED: "100", p.ON_SUCCESS_SINK: "http://ok.example.com/x?a=%41;b",
                   p.ON_FAILURE_SINK: "https://ko.example.com/"}
    policy = p.delivery_policy(annotations)
    header = policy.encode()
    assert "%" not in header and " " not in header and header.isascii()
    assert header.startswith("v1;retry=5;backoff=linear;delay=0.5;timeout=1;on=429,5xx;age=2;keep=3600;")
    assert DeliveryPolicy.decode(header) == policy


@pytest.mark.parametrize("header", ["", "v2", "v1;retry=x", "v1;retry=1;retry=2", "v1;nope=1", "v1;retry",
                                    "v1;age=-1", "v1;age=inf", "v1;backoff=random", "v1;on=7xx", "v1;success=!!"])
def test_a_header_that_is_no_policy_is_refused(header):
    with pytest.raises(ValueError):
        DeliveryPolicy.decode(header)


@pytest.mark.parametrize(("tokens", "status", "matches"), [
    (("5xx",), 500, True), (("5xx",), 503, True), (("5xx",), 429, False),
    (("429", "5xx"), 429, True), (("502",), 503, False), (("502",), 502, True),
])
def test_retry_on_matches_codes_and_classes(tokens, status, matches):
    assert protocol.status_matches(tokens, status) is matches


def test_the_producer_routes_carry_the_policy():
    parent = {"apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress",
              "metadata": {"name": "hello", "namespace": "demo",
                           "annotations": {r.INGRESS_CLASS_ANNOTATION: r.ASYNC_INGRESS_CLASS, p.RETRY: "5"}},
              "spec": {"rules": [{"hosts": ["hello.demo.example.com"], "visibility": r.VISIBILITY_EXTERNAL,
                                  "http": {"paths": [{"splits": [{"serviceName": "hello-00001",
                                                                  "serviceNamespace": "demo", "servicePort": 80}]}]}}]}}
    child = r.make_child_ingress(parent, ingress_class="kourier.ingress.networking.knative.dev",
                                 producer_host="producer.example")
    paths = child["spec"]["rules"][0]["http"]["paths"]
    to_producer = [path for path in paths if path.get("rewriteHost") == "producer.example"]
    assert to_producer
    assert all(path["splits"][0]["appendHeaders"][protocol.POLICY_HEADER] == "v1;retry=5" for path in to_producer)
    assert all(protocol.POLICY_HEADER not in (path["splits"][0].get("appendHeaders") or {})
               for path in paths if path not in to_producer), "the Service's own routes carry no policy"

    parent["metadata"]["annotations"][p.RETRY] = "many"
    with pytest.raises(p.InvalidAsyncPolicy):
        r.make_child_ingress(parent, ingress_class="kourier.ingress.networking.knative.dev",
                             producer_host="producer.example")
    status = r.parent_status(parent, child, now="2030-01-01T00:00:00Z")
    (ready,) = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert (ready["status"], ready["reason"]) == ("False", r.REASON_INVALID_POLICY)
    assert p.RETRY in ready["message"] and "'many'" in ready["message"]


SINK_HOSTS = (".svc.cluster.local", "hooks.example.com")
"""NOTIFICATION_ALLOWED_HOSTS as an operator might set it."""


@pytest.mark.parametrize(("annotation", "value", "allowed"), [
    (p.ON_SUCCESS_SINK, "http://sink.demo.svc.cluster.local/done", True),
    (p.ON_FAILURE_SINK, "https://hooks.example.com:8443/x", True),
    (p.ON_FAILURE_SINK, "https://HOOKS.Example.com/x", True),
    (p.ON_SUCCESS_SINK, "http://169.254.169.254/latest/meta-data/", False),
    (p.ON_FAILURE_SINK, "http://hooks.example.com.evil.net/", False),
    (p.ON_SUCCESS_SINK, "http://www.hooks.example.com/", False),
])
def test_a_sink_off_notification_allowed_hosts_is_an_invalid_policy(annotation, value, allowed):
    """The data plane drops every completion event for such a sink: the Service's owner reads why in its status."""
    annotations = {annotation: value}
    assert getattr(p.delivery_policy(annotations), p.ANNOTATIONS[annotation][0]) == value  # no list: any host
    if allowed:
        p.delivery_policy(annotations, p.ClusterLimits(sink_hosts=SINK_HOSTS))
        return
    with pytest.raises(p.InvalidAsyncPolicy) as raised:
        p.delivery_policy(annotations, p.ClusterLimits(sink_hosts=SINK_HOSTS))
    assert raised.value.annotation == annotation
    assert repr(value) in str(raised.value) and "NOTIFICATION_ALLOWED_HOSTS (.svc.cluster.local, hooks.example.com)" \
        in str(raised.value)


@pytest.mark.parametrize(("value", "allowed"), [("PT300S", True), ("PT5M", True), ("PT1S", True),
                                               ("PT300.5S", False), ("PT10M", False), ("P1D", False)])
def test_a_timeout_longer_than_request_timeout_is_an_invalid_policy(value, allowed):
    """Stopping processes, the consumer's revision and a source posting to it give a replay REQUEST_TIMEOUT and
    no more: a longer attempt would be cut, and the Service called again."""
    limits = p.ClusterLimits(max_timeout=300.0)
    assert p.delivery_policy({p.TIMEOUT: value}).timeout == p.duration(value)  # no limits: as before
    if allowed:
        assert p.delivery_policy({p.TIMEOUT: value}, limits).timeout == p.duration(value)
        return
    with pytest.raises(p.InvalidAsyncPolicy) as raised:
        p.delivery_policy({p.TIMEOUT: value}, limits)
    assert raised.value.annotation == p.TIMEOUT and "REQUEST_TIMEOUT (300s)" in str(raised.value)


def test_the_parents_status_names_a_refused_sink():
    parent = {"apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress",
              "metadata": {"name": "hello", "namespace": "demo",
                           "annotations": {r.INGRESS_CLASS_ANNOTATION: r.ASYNC_INGRESS_CLASS,
                                           p.ON_FAILURE_SINK: "http://collector.example.net/"}},
              "spec": {"rules": [{"hosts": ["hello.demo.example.com"], "visibility": r.VISIBILITY_EXTERNAL,
                                  "http": {"paths": [{"splits": [{"serviceName": "hello-00001",
                                                                  "serviceNamespace": "demo", "servicePort": 80}]}]}}]}}
    child = r.make_child_ingress(parent, ingress_class="kourier.ingress.networking.knative.dev",
                                 producer_host="producer.example")
    r.check_parent(parent)
    with pytest.raises(p.InvalidAsyncPolicy):
        r.check_parent(parent, p.ClusterLimits(sink_hosts=SINK_HOSTS))
    for limits, reason in ((None, None), (p.ClusterLimits(max_timeout=300.0), None),
                           (p.ClusterLimits(sink_hosts=SINK_HOSTS), r.REASON_INVALID_POLICY)):
        status = r.parent_status(parent, child, now="2030-01-01T00:00:00Z", limits=limits)
        (network,) = [c for c in status["conditions"] if c["type"] == r.CONDITION_NETWORK_CONFIGURED]
        assert network.get("reason") == reason, network
    assert p.ON_FAILURE_SINK in network["message"] and "NOTIFICATION_ALLOWED_HOSTS" in network["message"]


def test_the_replay_terms_are_the_policy_over_the_cluster_defaults():
    from async_component.dataplane.replay import delivery_terms
    from async_component.settings import ReplaySettings

    cluster = ReplaySettings(max_attempts=4, retry_base_delay=2.0, request_timeout=30.0, status_retention=60.0)
    defaults = delivery_terms(cluster, protocol.DEFAULT_POLICY)
    assert (defaults.max_attempts, defaults.base_delay, defaults.linear, defaults.timeout, defaults.retry_on,
            defaults.max_age, defaults.retention_ms) == (4, 2.0, False, 30.0, ("429", "502", "503", "504"), None, 60000)
    own = delivery_terms(cluster, DeliveryPolicy(retry=0, backoff_policy="linear", backoff_delay=0.0, timeout=1.0,
                                                 retry_on=("5xx",), max_age=2.0, retention=3600.0))
    assert (own.max_attempts, own.base_delay, own.linear, own.timeout, own.retry_on, own.max_age,
            own.retention_ms) == (1, 0.0, True, 1.0, ("5xx",), 2.0, 3600000)
    # queued under a longer REQUEST_TIMEOUT, or by a stack that checks nothing: REQUEST_TIMEOUT is the most
    assert delivery_terms(cluster, DeliveryPolicy(timeout=600.0)).timeout == 30.0
