"""The child Ingress, the async Service and the parent's status, from plain dicts."""

from __future__ import annotations

import copy

import pytest

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


ORIGINAL_HOST = {r.ORIGINAL_HOST_HEADER: "hello.demo.svc.cluster.local"}


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
REPLAY = {"Async-Replay": {"exact": "true"}}
TAG = {"Knative-Serving-Tag": {"exact": "blue"}}
TAG_APPEND = {"Knative-Serving-Tag": "blue"}

CONDITIONAL_PATHS = [
    STATUS_PATH,
    to_producer(headers={**TAG, **ASYNC}, append=TAG_APPEND),
    to_producer(headers=ASYNC),
    TAG_PATH,
    DEFAULT_PATH,
]
ALWAYS_PATHS = [
    STATUS_PATH,
    {**TAG_PATH, "headers": {**TAG, **SYNC}},
    {**DEFAULT_PATH, "headers": SYNC},
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
        (r.MODE_CONDITIONAL, [STATUS_PATH, to_producer(headers=ASYNC), DEFAULT_PATH]),
        (r.MODE_ALWAYS, [STATUS_PATH, {**DEFAULT_PATH, "headers": SYNC}, {**DEFAULT_PATH, "headers": REPLAY},
                         to_producer()]),
    ],
)
def test_cluster_local_rule_keeps_hosts_and_visibility(mode, paths):
    rule = child(kingress(mode))["spec"]["rules"][1]
    assert rule["hosts"] == ["hello.demo", "hello.demo.svc", "hello.demo.svc.cluster.local"]
    assert rule["visibility"] == r.VISIBILITY_CLUSTER_LOCAL
    assert rule["http"]["paths"] == paths


def test_path_prefixes_are_kept_for_async_matches():
    rules = [{"hosts": ["api.example.com"], "visibility": r.VISIBILITY_EXTERNAL,
              "http": {"paths": [{"path": "/v1/", "splits": [split()]}, {"path": "/v2/", "splits": [split("v2")]}]}}]
    paths = child(kingress(rules=rules))["spec"]["rules"][0]["http"]["paths"]
    assert [(p.get("path"), p.get("headers"), p["splits"][0]["serviceName"]) for p in paths] == [
        (r.STATUS_PATH_PREFIX, None, "hello-async"),
        ("/v1/", ASYNC, "hello-async"),
        ("/v2/", ASYNC, "hello-async"),
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
    assert r.is_status_path(path) is expected
