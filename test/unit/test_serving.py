"""The Ingress the local stack believes Knative Serving would create for a Service."""

from __future__ import annotations

import copy

import pytest

from async_component.local import knative_serving as serving

KOURIER = "kourier.ingress.networking.knative.dev"
ISTIO = "istio.ingress.networking.knative.dev"
ASYNC = "async.ingress.networking.knative.dev"


def ksvc(name="hello", namespace="default", annotations=None, labels=None):
    meta = {"name": name, "namespace": namespace}
    if annotations is not None:
        meta["annotations"] = annotations
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": meta,
            "spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}}


def split(revision, namespace):
    return {
        "serviceName": revision, "serviceNamespace": namespace, "servicePort": 80, "percent": 100,
        "appendHeaders": {"Knative-Serving-Revision": revision, "Knative-Serving-Namespace": namespace},
    }


def test_full_shape_of_a_plain_service():
    assert serving.ingress_for_service(ksvc()) == {
        "apiVersion": "networking.internal.knative.dev/v1alpha1",
        "kind": "Ingress",
        "metadata": {
            "name": "hello",
            "namespace": "default",
            "labels": {"serving.knative.dev/service": "hello", "serving.knative.dev/route": "hello",
                       "serving.knative.dev/routeNamespace": "default"},
            "annotations": {"networking.knative.dev/ingress.class": KOURIER},
        },
        "spec": {"rules": [
            {"hosts": ["hello.default", "hello.default.svc", "hello.default.svc.cluster.local"],
             "visibility": "ClusterLocal",
             "http": {"paths": [{"splits": [split("hello-00001", "default")]}]}},
            {"hosts": ["hello.default.example.com"],
             "visibility": "ExternalIP",
             "http": {"paths": [{"splits": [split("hello-00001", "default")]}]}},
        ]},
    }


@pytest.mark.parametrize(("annotations", "default_class", "expected"), [
    (None, KOURIER, KOURIER),
    (None, ISTIO, ISTIO),
    ({"networking.knative.dev/ingress.class": ASYNC}, KOURIER, ASYNC),
    ({"networking.knative.dev/ingress-class": ASYNC}, ISTIO, ASYNC),
    ({"networking.knative.dev/ingress.class": ""}, ISTIO, ISTIO),
])
def test_ingress_class_comes_from_the_service_or_the_default(annotations, default_class, expected):
    ingress = serving.ingress_for_service(ksvc(annotations=annotations), default_class=default_class)
    assert ingress["metadata"]["annotations"]["networking.knative.dev/ingress.class"] == expected
    assert "networking.knative.dev/ingress-class" not in ingress["metadata"]["annotations"]


@pytest.mark.parametrize(("annotations", "expected"), [
    ({"async.knative.dev/mode": "always.async.knative.dev", "networking.knative.dev/ingress.class": ASYNC},
     {"async.knative.dev/mode": "always.async.knative.dev", "networking.knative.dev/ingress.class": ASYNC}),
    ({"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"},
     {"team": "a", "networking.knative.dev/ingress.class": KOURIER}),
])
def test_annotations_are_copied_except_last_applied(annotations, expected):
    assert serving.ingress_for_service(ksvc(annotations=annotations))["metadata"]["annotations"] == expected


@pytest.mark.parametrize(("name", "namespace", "domain", "local_hosts", "external"), [
    ("a", "default", "example.com", ["a.default", "a.default.svc", "a.default.svc.cluster.local"], ["a.default.example.com"]),
    ("svc-b", "team-x", "127.0.0.1.sslip.io", ["svc-b.team-x", "svc-b.team-x.svc", "svc-b.team-x.svc.cluster.local"],
     ["svc-b.team-x.127.0.0.1.sslip.io"]),
])
def test_hosts_per_visibility(name, namespace, domain, local_hosts, external):
    rules = serving.ingress_for_service(ksvc(name, namespace), domain=domain)["spec"]["rules"]
    assert [(r["visibility"], r["hosts"]) for r in rules] == [("ClusterLocal", local_hosts), ("ExternalIP", external)]
    for rule in rules:
        assert rule["http"]["paths"] == [{"splits": [split(f"{name}-00001", namespace)]}]


def test_cluster_local_service_gets_no_external_rule():
    ingress = serving.ingress_for_service(ksvc(labels={"networking.knative.dev/visibility": "cluster-local", "app": "x"}))
    assert [r["visibility"] for r in ingress["spec"]["rules"]] == ["ClusterLocal"]
    assert ingress["metadata"]["labels"]["app"] == "x"


def test_missing_namespace_means_default_and_input_is_not_changed():
    service = ksvc()
    del service["metadata"]["namespace"]
    before = copy.deepcopy(service)
    ingress = serving.ingress_for_service(service)
    assert ingress["metadata"]["namespace"] == "default"
    assert service == before
