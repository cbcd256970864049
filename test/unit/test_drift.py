"""Drift checks compare what the controller sets, not what the API server adds."""

from __future__ import annotations

import copy

import pytest

from async_component.controller.drift import drift_patch, merge_patch
from async_component.controller.resources import make_async_service, make_child_ingress

PRODUCER = "async-producer.knative-serving.svc.cluster.local"
PARENT = {
    "apiVersion": "networking.internal.knative.dev/v1alpha1", "kind": "Ingress",
    "metadata": {"name": "hello", "namespace": "demo", "uid": "u1", "labels": {"app": "hello"},
                 "annotations": {"networking.knative.dev/ingress.class": "async.ingress.networking.knative.dev"}},
    "spec": {"rules": [{"hosts": ["hello.demo.example.com"], "visibility": "ExternalIP",
                        "http": {"paths": [{"splits": [{"serviceName": "hello-1", "serviceNamespace": "demo",
                                                        "servicePort": 80, "percent": 100}]}]}}]},
}


def as_stored(desired: dict, **spec_defaults) -> dict:
    """What the API server gives back: server-set metadata, defaulted spec, a status."""
    stored = copy.deepcopy(desired)
    stored["metadata"].update(uid="u2", resourceVersion="7", generation=2, creationTimestamp="2030-01-01T00:00:00Z",
                              managedFields=[{"manager": "kubectl"}])
    stored["spec"].update(spec_defaults)
    stored["status"] = {"loadBalancer": {}}
    return stored


@pytest.mark.parametrize(
    ("current", "desired", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1}}, {"a": {"y": None}}),
        ({"a": [1, 2]}, {"a": [1]}, {"a": [1]}),
        ({}, {"a": {"x": 1}}, {"a": {"x": 1}}),
        ({"a": "scalar"}, {"a": {"x": 1}}, {"a": {"x": 1}}),
    ],
)
def test_merge_patch(current, desired, patch):
    assert merge_patch(current, desired) == patch


def test_merge_patch_without_pruning_keeps_extra_keys():
    assert merge_patch({"a": 1, "sessionAffinity": "None"}, {"a": 1}, prune=False) == {}


def test_unchanged_ingress_has_no_drift():
    desired = make_child_ingress(PARENT, ingress_class="kourier.ingress.networking.knative.dev", producer_host=PRODUCER)
    assert drift_patch(as_stored(desired), desired, exact_spec=True) == {}


def test_unchanged_service_with_server_defaults_has_no_drift():
    desired = make_async_service(PARENT, producer_host=PRODUCER)
    stored = as_stored(desired, sessionAffinity="None", internalTrafficPolicy="Cluster")
    stored["metadata"]["annotations"] = {"note": "someone else's"}
    assert drift_patch(stored, desired, exact_spec=False) == {}


def test_hand_edited_ingress_is_put_back():
    desired = make_child_ingress(PARENT, ingress_class="kourier.ingress.networking.knative.dev", producer_host=PRODUCER)
    stored = as_stored(desired, extra="added by hand")
    stored["spec"]["rules"][0]["http"]["paths"].pop(0)
    stored["metadata"]["labels"]["stray"] = "x"
    stored["metadata"]["annotations"]["networking.knative.dev/ingress.class"] = "istio.ingress.networking.knative.dev"
    patch = drift_patch(stored, desired, exact_spec=True)
    assert patch == {
        "metadata": {"labels": {"stray": None},
                     "annotations": {"networking.knative.dev/ingress.class": "kourier.ingress.networking.knative.dev"}},
        "spec": {"extra": None, "rules": desired["spec"]["rules"]},
    }


def test_changed_service_target_is_put_back():
    desired = make_async_service(PARENT, producer_host=PRODUCER)
    stored = as_stored(desired)
    stored["spec"]["externalName"] = "elsewhere.example.com"
    del stored["metadata"]["ownerReferences"]
    assert drift_patch(stored, desired, exact_spec=False) == {
        "metadata": {"ownerReferences": desired["metadata"]["ownerReferences"]},
        "spec": {"externalName": PRODUCER},
    }
