"""The child Ingress, the async Service and the parent's status, from plain dicts."""

from __future__ import annotations

import copy
import re

import pytest

from async_component import protocol
from async_component.controller import resources as r
from async_component.settings import INGRESS_CLASSES

PRODUCER = "async-producer.knative-serving.svc.cluster.local"
KOURIER, ISTIO = INGRESS_CLASSES
NOW = "2030-01-01T00:00:00Z"
EARLIER = "2029-12-31T23:00:00Z"


def split(service: str = "hello-00001", percent: int | None = 100, **extra) -> dict:
    result = {"serviceName": service, "serviceNamespace": "demo", "servicePort": 80, **extra}
    if percent is not None:
        result["percent"] = percent
    return result


TAG_PATH = {
    "headers": {"Knative-Serving-Tag": {"exact": "blue"}},
    "appendHeaders": {"Knative-Serving-Tag": "blue"},
    "splits": [split("hello-00002")],
}
DEFAULT_PATH = {"splits": [split(percent=90), split("hello-00002", percent=10)]}


def kingress(mode: str | None = None, *, rules: list | None = None, **meta) -> dict:
    """A parent Ingress shaped like the one Knative Serving makes for Service ``hello``."""
    annotations = {r.INGRESS_CLASS_ANNOTATION: r.ASYNC_INGRESS_CLASS, "serving.knative.dev/creator": "admin"}
    if mode is not None:
        annotations[r.MODE_ANNOTATION] = mode
    if rules is None:
        rules = [
            {"hosts": ["hello.demo.example.com"], "visibility": r.VISIBILITY_EXTERNAL,
             "http": {"paths": [copy.deepcopy(TAG_PATH), copy.deepcopy(DEFAULT_PATH)]}},
            {"hosts": ["hello.demo", "hello.demo.svc", "hello.demo.svc.cluster.local"],
             "visibility": r.VISIBILITY_CLUSTER_LOCAL,
             "http": {"paths": [copy.deepcopy(DEFAULT_PATH)]}},
        ]
    metadata = {
        "name": "hello", "namespace": "demo", "uid": "parent-uid", "generation": 3,
        "labels": {"serving.knative.dev/service": "hello"},
        "annotations": annotations,
        **meta,
    }
    return {
        "apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress", "metadata": metadata,
        "spec": {"httpOption": "Enabled", "tls": [{"hosts": ["hello.demo.example.com"], "secretName": "cert", "secretNamespace": "demo"}],
                 "rules": rules},
    }


DEFAULT_POLICY = {protocol.POLICY_HEADER: "v1"}
ORIGINAL_HOST = {protocol.ORIGINAL_HOST_HEADER: "hello.demo.svc.cluster.local", **DEFAULT_POLICY}


def to_producer(path: str | None = None, headers: dict | None = None, append: dict | None = None) -> dict:
    result: dict = {}
    if path:
        result["path"] = path
    if headers:
        result["headers"] = headers
    if append:
        result["appendHeaders"] = append
    result["rewriteHost"] = PRODUCER
    result["splits"] = [{"serviceName": "hello-async", "serviceNamespace": "demo", "servicePort": 80,
                         "percent": 100, "appendHeaders": ORIGINAL_HOST}]
    return result


STATUS_PATH = to_producer(r.STATUS_PATH_PREFIX)
ASYNC = {r.PREFER_HEADER: {"exact": r.RESPOND_ASYNC}}
SYNC = {r.PREFER_HEADER: {"exact": r.RESPOND_SYNC}}
ASYNCS = [{r.PREFER_HEADER: {"exact": v}} for v in ("respond-async", "Respond-Async", "RESPOND-ASYNC")]
SYNCS = [{r.PREFER_HEADER: {"exact": v}} for v in ("respond-sync", "Respond-Sync", "RESPOND-SYNC")]
REPLAY = {"Async-Replay": {"exact": "true"}}
TAG = {"Knative-Serving-Tag": {"exact": "blue"}}
TAG_APPEND = {"Knative-Serving-Tag": "blue"}

CONDITIONAL_PATHS = [
    STATUS_PATH,
    *[to_producer(headers={**TAG, **a}, append=TAG_APPEND) for a in ASYNCS],
    *[to_producer(headers=a) for a in ASYNCS],
    TAG_PATH,
    DEFAULT_PATH,
]
ALWAYS_PATHS = [
    STATUS_PATH,
    *[{**TAG_PATH, "headers": {**TAG, **s}} for s in SYNCS],
    *[{**DEFAULT_PATH, "headers": s} for s in SYNCS],
    {**TAG_PATH, "headers": {**TAG, **REPLAY}},  # a replay whose Prefer says more than respond-sync
    {**DEFAULT_PATH, "headers": REPLAY},
    to_producer(headers=TAG, append=TAG_APPEND),
    to_producer(),
]


def child(parent: dict, ingress_class: str = KOURIER) -> dict:
    return r.make_child_ingress(parent, ingress_class=ingress_class, producer_host=PRODUCER)


@pytest.mark.parametrize(
    ("mode", "first_rule_paths"),
    [
        (None, CONDITIONAL_PATHS),
        (r.MODE_CONDITIONAL, CONDITIONAL_PATHS),
        (r.MODE_ALWAYS, ALWAYS_PATHS),
    ],
)
def test_paths_of_each_mode(mode, first_rule_paths):
    rules = child(kingress(mode))["spec"]["rules"]
    assert rules[0]["http"]["paths"] == first_rule_paths


@pytest.mark.parametrize(
    ("mode", "paths"),
    [
        (r.MODE_CONDITIONAL, [STATUS_PATH, *[to_producer(headers=a) for a in ASYNCS], DEFAULT_PATH]),
        (r.MODE_ALWAYS, [STATUS_PATH, *[{**DEFAULT_PATH, "headers": s} for s in SYNCS],
                         {**DEFAULT_PATH, "headers": REPLAY}, to_producer()]),
    ],
)
def test_cluster_local_rule_keeps_hosts_and_visibility(mode, paths):
    rule = child(kingress(mode))["spec"]["rules"][1]
    assert rule["hosts"] == ["hello.demo", "hello.demo.svc", "hello.demo.svc.cluster.local"]
    assert rule["visibility"] == r.VISIBILITY_CLUSTER_LOCAL
    assert rule["http"]["paths"] == paths


@pytest.mark.parametrize("mode", [r.MODE_CONDITIONAL, r.MODE_ALWAYS])
@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_the_status_path_goes_to_the_producer_first_whatever_the_method_and_headers(mode, method):
    """KIngress matches no method: a DELETE <Location> (cancel) reaches the producer as a GET does,
    before any Prefer, tag or replay match could send it to the Service."""
    for rule in child(kingress(mode))["spec"]["rules"]:
        first, *_ = rule["http"]["paths"]
        assert first == STATUS_PATH
        assert all("method" not in str(key).lower() for path in rule["http"]["paths"] for key in path)


def test_path_prefixes_are_kept_for_async_matches():
    rules = [{"hosts": ["api.example.com"], "visibility": r.VISIBILITY_EXTERNAL,
              "http": {"paths": [{"path": "/v1/", "splits": [split()]}, {"path": "/v2/", "splits": [split("v2")]}]}}]
    paths = child(kingress(rules=rules))["spec"]["rules"][0]["http"]["paths"]
    assert [(p.get("path"), p.get("headers"), p["splits"][0]["serviceName"]) for p in paths] == [
        (r.STATUS_PATH_PREFIX, None, "hello-async"),
        *[("/v1/", a, "hello-async") for a in ASYNCS],
        *[("/v2/", a, "hello-async") for a in ASYNCS],
        ("/v1/", None, "hello-00001"),
        ("/v2/", None, "v2"),
    ]


@pytest.mark.parametrize("ingress_class", [KOURIER, ISTIO])
def test_child_metadata(ingress_class):
    parent = kingress(r.MODE_ALWAYS)
    parent["metadata"]["annotations"][r.LAST_APPLIED_ANNOTATION] = "{}"
    result = child(parent, ingress_class)
    assert result["apiVersion"] == r.INGRESS_API_VERSION and result["kind"] == "Ingress"
    assert result["metadata"] == {
        "name": "hello-new",
        "namespace": "demo",
        "labels": {"serving.knative.dev/service": "hello", r.PARENT_LABEL: "hello"},
        "annotations": {
            r.INGRESS_CLASS_ANNOTATION: ingress_class,
            r.MODE_ANNOTATION: r.MODE_ALWAYS,
            "serving.knative.dev/creator": "admin",
        },
        "ownerReferences": [{
            "apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress", "name": "hello", "uid": "parent-uid",
            "controller": True, "blockOwnerDeletion": True,
        }],
    }


def test_child_keeps_tls_and_http_option():
    parent = kingress()
    spec = child(parent)["spec"]
    assert spec["tls"] == parent["spec"]["tls"]
    assert spec["httpOption"] == "Enabled"


def test_child_gets_knative_defaults():
    rules = [{"hosts": ["h.example.com"], "http": {"paths": [{"splits": [split(percent=None)]}]}}]
    rule = child(kingress(rules=rules))["spec"]["rules"][0]
    assert rule["visibility"] == r.VISIBILITY_EXTERNAL
    assert rule["http"]["paths"][-1]["splits"][0]["percent"] == 100


def test_parent_is_not_modified():
    parent = kingress(r.MODE_ALWAYS)
    before = copy.deepcopy(parent)
    child(parent)
    r.make_async_service(parent, producer_host=PRODUCER)
    r.parent_status(parent, None, now=NOW)
    assert parent == before


def test_async_service():
    service = r.make_async_service(kingress(), producer_host=PRODUCER)
    assert service == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "hello-async", "namespace": "demo",
            "labels": {"serving.knative.dev/service": "hello", r.PARENT_LABEL: "hello"},
            "ownerReferences": [r.owner_reference(kingress())],
        },
        "spec": {"type": "ExternalName", "externalName": PRODUCER,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
    }


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, r.MODE_CONDITIONAL),
        ({r.MODE_ANNOTATION: r.MODE_CONDITIONAL}, r.MODE_CONDITIONAL),
        ({r.MODE_ANNOTATION: r.MODE_ALWAYS}, r.MODE_ALWAYS),
    ],
)
def test_async_mode(annotations, expected):
    assert r.async_mode({"metadata": {"annotations": annotations}}) == expected


@pytest.mark.parametrize("value", ["sometimes", "always", "", "ALWAYS.async.knative.dev"])
def test_invalid_mode_builds_no_child(value):
    with pytest.raises(r.InvalidAsyncMode, match=r.MODE_ANNOTATION):
        child(kingress(value))


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({r.INGRESS_CLASS_ANNOTATION: r.ASYNC_INGRESS_CLASS}, True),
        ({r.INGRESS_CLASS_ANNOTATION: KOURIER}, False),
        ({}, False),
        (None, False),
    ],
)
def test_is_async_ingress(annotations, expected):
    assert r.is_async_ingress({"metadata": {"annotations": annotations}}) is expected


def test_is_child_of():
    made = child(kingress())
    assert r.is_child_of(made, "hello")
    assert not r.is_child_of(made, "other")
    assert not r.is_child_of({"metadata": {"name": "hello-new"}}, "hello")


# --- status


def existing_child(*, ready: str | None = "True", generation: int = 2, observed: int = 2,
                   reason: str = "", message: str = "") -> dict:
    status: dict = {"observedGeneration": observed}
    if ready is not None:
        status["conditions"] = [
            {"type": "LoadBalancerReady", "status": ready},
            {"type": "NetworkConfigured", "status": "True"},
            {"type": "Ready", "status": ready, **({"reason": reason} if reason else {}), **({"message": message} if message else {})},
        ]
        status["publicLoadBalancer"] = {"ingress": [{"domainInternal": "kourier.kourier-system.svc.cluster.local"}]}
        status["privateLoadBalancer"] = {"ingress": [{"domainInternal": "kourier-internal.kourier-system.svc.cluster.local"}]}
    made = child(kingress())
    made["metadata"]["generation"] = generation
    made["status"] = status
    return made


def conditions_of(status: dict) -> dict:
    return {c["type"]: (c["status"], c.get("reason"), c.get("message")) for c in status["conditions"]}


CHILD = "Ingress demo/hello-new"


@pytest.mark.parametrize(
    ("mode", "child_ingress", "ready", "network", "balancer"),
    [
        pytest.param(None, None,
                     ("Unknown", r.REASON_CHILD_MISSING, f"{CHILD} does not exist yet"),
                     ("Unknown", r.REASON_CHILD_MISSING, f"{CHILD} does not exist yet"),
                     ("Unknown", r.REASON_CHILD_MISSING, f"{CHILD} does not exist yet"), id="child missing"),
        pytest.param(None, existing_child(ready=None),
                     ("Unknown", r.REASON_CHILD_NOT_READY, f"{CHILD} has no Ready condition yet"),
                     ("True", None, None),
                     ("Unknown", r.REASON_CHILD_NOT_READY, f"{CHILD} has no Ready condition yet"), id="child has no status"),
        pytest.param(None, existing_child(generation=3, observed=2),
                     ("Unknown", r.REASON_CHILD_NOT_READY, f"{CHILD} has not caught up with its generation 3 yet"),
                     ("True", None, None),
                     ("Unknown", r.REASON_CHILD_NOT_READY, f"{CHILD} has not caught up with its generation 3 yet"), id="child status stale"),
        pytest.param(None, existing_child(ready="Unknown", reason="Uninitialized", message="Waiting for load balancer to be ready"),
                     ("Unknown", r.REASON_CHILD_NOT_READY, f"{CHILD} is not ready: Ready=Unknown (Uninitialized: Waiting for load balancer to be ready)"),
                     ("True", None, None),
                     ("Unknown", r.REASON_CHILD_NOT_READY, f"{CHILD} is not ready: Ready=Unknown (Uninitialized: Waiting for load balancer to be ready)"),
                     id="child not ready"),
        pytest.param(r.MODE_ALWAYS, existing_child(ready="False", reason="LoadBalancerFailed"),
                     ("False", r.REASON_CHILD_NOT_READY, f"{CHILD} is not ready: Ready=False (LoadBalancerFailed)"),
                     ("True", None, None),
                     ("False", r.REASON_CHILD_NOT_READY, f"{CHILD} is not ready: Ready=False (LoadBalancerFailed)"), id="child failed"),
        pytest.param(None, existing_child(), ("True", None, None), ("True", None, None), ("True", None, None), id="child ready"),
        pytest.param("sometimes", None,
                     ("False", r.REASON_INVALID_MODE, f"annotation {r.MODE_ANNOTATION}='sometimes' is not one of {r.MODE_CONDITIONAL}, {r.MODE_ALWAYS}"),
                     ("False", r.REASON_INVALID_MODE, f"annotation {r.MODE_ANNOTATION}='sometimes' is not one of {r.MODE_CONDITIONAL}, {r.MODE_ALWAYS}"),
                     ("Unknown", r.REASON_CHILD_MISSING, f"{CHILD} does not exist yet"), id="invalid mode"),
        pytest.param("sometimes", existing_child(),
                     ("False", r.REASON_INVALID_MODE, f"annotation {r.MODE_ANNOTATION}='sometimes' is not one of {r.MODE_CONDITIONAL}, {r.MODE_ALWAYS}"),
                     ("False", r.REASON_INVALID_MODE, f"annotation {r.MODE_ANNOTATION}='sometimes' is not one of {r.MODE_CONDITIONAL}, {r.MODE_ALWAYS}"),
                     ("True", None, None), id="invalid mode, old child still ready"),
    ],
)
def test_parent_conditions(mode, child_ingress, ready, network, balancer):
    status = r.parent_status(kingress(mode), child_ingress, now=NOW)
    assert conditions_of(status) == {"Ready": ready, "NetworkConfigured": network, "LoadBalancerReady": balancer}
    assert [c["type"] for c in status["conditions"]] == ["LoadBalancerReady", "NetworkConfigured", "Ready"]
    assert status["observedGeneration"] == 3


def test_ready_child_lends_its_load_balancers():
    ready = existing_child()
    status = r.parent_status(kingress(), ready, now=NOW)
    assert status["publicLoadBalancer"] == ready["status"]["publicLoadBalancer"]
    assert status["privateLoadBalancer"] == ready["status"]["privateLoadBalancer"]


@pytest.mark.parametrize("child_ingress", [None, existing_child(ready="Unknown"), existing_child(generation=4, observed=3)])
def test_no_load_balancers_until_the_child_is_ready(child_ingress):
    status = r.parent_status(kingress(), child_ingress, now=NOW)
    assert status["publicLoadBalancer"] is None and status["privateLoadBalancer"] is None


def test_foreign_object_in_the_childs_place():
    status = r.parent_status(kingress(), None, now=NOW, foreign=["Service demo/hello-async"])
    ready = conditions_of(status)["Ready"]
    assert ready[:2] == ("False", r.REASON_NOT_OWNED)
    assert "Service demo/hello-async" in ready[2]


def test_transition_time_changes_only_with_the_status():
    parent = kingress()
    parent["status"] = {"conditions": [
        {"type": "Ready", "status": "Unknown", "reason": "ChildIngressNotReady", "lastTransitionTime": EARLIER},
        {"type": "NetworkConfigured", "status": "True", "lastTransitionTime": EARLIER},
        {"type": "LoadBalancerReady", "status": "Unknown", "lastTransitionTime": EARLIER},
    ]}
    status = r.parent_status(parent, existing_child(), now=NOW)
    times = {c["type"]: c["lastTransitionTime"] for c in status["conditions"]}
    assert times == {"Ready": NOW, "NetworkConfigured": EARLIER, "LoadBalancerReady": NOW}


def test_status_patch_writes_only_what_changed():
    parent = kingress()
    desired = r.parent_status(parent, existing_child(), now=NOW)
    assert r.status_patch(None, desired) == {k: v for k, v in desired.items() if v is not None}
    parent["status"] = copy.deepcopy(desired)
    assert r.status_patch(parent["status"], r.parent_status(parent, existing_child(), now="2031-01-01T00:00:00Z")) == {}

    not_ready = r.parent_status(parent, existing_child(ready="Unknown"), now=NOW)
    patch = r.status_patch(parent["status"], not_ready)
    assert patch["publicLoadBalancer"] is None and patch["privateLoadBalancer"] is None
    assert "observedGeneration" not in patch
    assert conditions_of(patch)["Ready"][0] == "Unknown"


def test_status_patch_skips_absent_fields_that_stay_absent():
    desired = r.parent_status(kingress(), None, now=NOW)
    patch = r.status_patch({}, desired)
    assert set(patch) == {"conditions", "observedGeneration"}


# --- child names

DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LONG_DOMAIN = ".".join(["x" * 60] * 4) + ".com"  # 248 characters: a valid name, not a valid label value


@pytest.mark.parametrize(
    ("parent", "ingress", "service"),
    [
        pytest.param("hello", "hello-new", "hello-async", id="short: unchanged"),
        pytest.param("a" * 57, "a" * 57 + "-new", "a" * 57 + "-async", id="57: still fits"),
        pytest.param("a" * 58, "a" * 58 + "-new", "a" * 24 + "-dc2f2f2462a0d72358b2f99389458606-async", id="58"),
        pytest.param("a" * 63, "a" * 63 + "-new", "a" * 24 + "-b06521f39153d618550606be297466d5-async", id="63"),
        pytest.param("shop.example.com", "shop.example.com-new",
                     "shop-example-com-f40d9b2f6eeec78e169bc40177907bff-async", id="DomainMapping"),
        pytest.param("1shop.example.com", "1shop.example.com-new",
                     "shop-example-com-eb3921268fc9d26fc5fcfc38920d8b7f-async", id="domain starting with a digit"),
        pytest.param("9-lives", "9-lives-new", "lives-ac7af59401b9cf1bb0ffa96cfa2c1c6c-async", id="starts with a digit"),
        pytest.param("123", "123-new", "async-202cb962ac59075b964b07152d234b70", id="digits only"),
        pytest.param(LONG_DOMAIN + "abcd", "x" * 26 + "-cd57bdaafeb6e8256f02b9221bc882b8-new",
                     "x" * 24 + "-cd57bdaafeb6e8256f02b9221bc882b8-async", id="252: too long for -new"),
    ],
)
def test_child_names_always_validate(parent, ingress, service):
    """Readable where valid (so existing children keep their names), else a prefix and the parent's md5."""
    obj = kingress(name=parent)
    assert r.child_ingress_name(obj) == ingress
    assert r.async_service_name(obj) == service
    assert len(ingress) <= 253 and DNS_SUBDOMAIN.fullmatch(ingress)
    assert len(service) <= 63 and DNS_LABEL.fullmatch(service)
    built = r.make_async_service(obj, producer_host=PRODUCER)
    assert built["metadata"]["name"] == service
    assert child(obj)["metadata"]["name"] == ingress
    assert child(obj)["spec"]["rules"][0]["http"]["paths"][0]["splits"][0]["serviceName"] == service


def test_hashed_names_differ_for_parents_with_the_same_head():
    names = {r.async_service_name(kingress(name="a" * 60 + tail)) for tail in ("bc", "cb", "b")}
    assert len(names) == 3


@pytest.mark.parametrize(
    ("parent", "label"),
    [
        ("hello", "hello"),
        ("shop.example.com", "shop.example.com"),
        ("a" * 63, "a" * 63),
        (LONG_DOMAIN, "x" * 30 + "-3d1733c1a2aa5e7b0e8ef11224f0cb66"),
    ],
)
def test_parent_label_is_a_valid_label_value(parent, label):
    made = child(kingress(name=parent))
    assert made["metadata"]["labels"][r.PARENT_LABEL] == label
    assert r.is_child_of(made, parent)
    assert r.parent_name_of(made) == parent  # from the owner reference, whatever the label holds


# --- the replay host of each rule

def rule(hosts: list[str], visibility: str, *paths: dict) -> dict:
    return {"hosts": hosts, "visibility": visibility, "http": {"paths": [copy.deepcopy(p) for p in paths]}}


BLUE_PATH = {"splits": [split("hello-00002")], "appendHeaders": {"Knative-Serving-Tag": "blue"}}
ACME_PATH = {"path": "/.well-known/acme-challenge/token", "splits": [split("cm-acme-http-solver")]}
DM_PATH = {"rewriteHost": "hello.demo.svc.cluster.local",
           "splits": [split("hello", appendHeaders={"K-Original-Host": "shop.example.com"})]}
EXT, LOCAL = r.VISIBILITY_EXTERNAL, r.VISIBILITY_CLUSTER_LOCAL


@pytest.mark.parametrize(
    ("name", "rules", "cluster_domain", "hosts"),
    [
        pytest.param("hello", [
            rule(["hello.demo.example.com"], EXT, DEFAULT_PATH),
            rule(["blue-hello.demo.example.com"], EXT, BLUE_PATH),
            rule(["hello.demo.svc.cluster.local"], LOCAL, DEFAULT_PATH),
            rule(["blue-hello.demo.svc.cluster.local"], LOCAL, BLUE_PATH),
        ], "cluster.local", ["hello.demo.svc.cluster.local", "blue-hello.demo.svc.cluster.local",
                             "hello.demo.svc.cluster.local", "blue-hello.demo.svc.cluster.local"], id="tag routes"),
        pytest.param("hello", [
            rule(["blue-hello.demo.example.com"], EXT, ACME_PATH, BLUE_PATH),
            rule(["blue-hello.demo", "blue-hello.demo.svc", "blue-hello.demo.svc.cluster.local"], LOCAL, BLUE_PATH),
        ], "cluster.local", ["blue-hello.demo.svc.cluster.local"] * 2, id="ACME path first, short hosts listed"),
        pytest.param("hello", [
            rule(["blue-hello.demo.example.com"], EXT, BLUE_PATH),
            rule(["blue-hello.demo.svc.corp.internal"], LOCAL, BLUE_PATH),
        ], "corp.internal", ["blue-hello.demo.svc.corp.internal"] * 2, id="another cluster domain"),
        pytest.param("shop.example.com", [rule(["shop.example.com"], EXT, ACME_PATH, DM_PATH)],
                     "cluster.local", ["hello.demo.svc.cluster.local"], id="DomainMapping"),
        pytest.param("hello", [rule(["hello.demo.example.com"], EXT, DEFAULT_PATH)],
                     "corp.internal", ["hello.demo.svc.corp.internal"], id="no cluster-local rule: the Service named like the parent"),
    ],
)
def test_replay_host_per_rule(name, rules, cluster_domain, hosts):
    parent = kingress(rules=rules, name=name)
    assert r.replay_hosts(parent, cluster_domain) == hosts
    made = r.make_child_ingress(parent, ingress_class=KOURIER, producer_host=PRODUCER, cluster_domain=cluster_domain)
    for made_rule, host in zip(made["spec"]["rules"], hosts):
        to_producer_paths = [p for p in made_rule["http"]["paths"] if p.get("rewriteHost") == PRODUCER]
        assert to_producer_paths
        for path in to_producer_paths:  # the status path and every async match
            assert path["splits"][0]["appendHeaders"] == {r.ORIGINAL_HOST_HEADER: host, **DEFAULT_POLICY}


def test_domain_mapping_async_path_replays_to_its_rewrite_host():
    parent = kingress(rules=[rule(["shop.example.com"], EXT, DM_PATH)], name="shop.example.com")
    paths = child(parent)["spec"]["rules"][0]["http"]["paths"]
    assert paths[1]["headers"] == ASYNCS[0]
    assert paths[1]["rewriteHost"] == PRODUCER
    assert paths[1]["splits"][0]["appendHeaders"] == ORIGINAL_HOST
    assert paths[-1] == DM_PATH  # synchronous requests still go the DomainMapping's way


@pytest.mark.parametrize(
    ("value", "variants"),
    [
        (r.RESPOND_ASYNC, ("respond-async", "Respond-Async", "RESPOND-ASYNC")),
        (r.RESPOND_SYNC, ("respond-sync", "Respond-Sync", "RESPOND-SYNC")),
    ],
)
def test_prefer_case_variants(value, variants):
    assert r.prefer_variants(value) == variants


@pytest.mark.parametrize("path, expected", [
    ("/.well-known/async-requests/x", True),
    ("/.well-known/async-requests/", True),
    ("/a/../.well-known/async-requests/x", True),
    ("/./.well-known/async-requests/x", True),
    ("//.well-known//async-requests/x", True),
    ("/%2Ewell-known/async-requests/x", True),
    ("/%2e%77ell-known/async-requests/x", True),
    ("/.well-known/async-requests", False),
    ("/.well-known/async-requests%2Fx", False),
    ("/x/.well-known/async-requests/a", False),
    ("/%zz/.well-known/async-requests/a", False),
    ("/work", False),
    ("/", False),
])
def test_status_path_under_every_spelling_envoy_may_normalise(path, expected):
    """The producer refuses to queue these, and the replay to send them: they route to the producer."""
    assert protocol.is_status_path(path) is expected
