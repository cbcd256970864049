"""Desired objects for an async Knative Ingress, built by pure functions.

Dicts in, dicts out: the kopf handlers and the local gateway both call these,
so what the local stack routes is exactly what the controller asks Kourier or
Istio to route.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

INGRESS_API_VERSION = "networking.internal.knative.dev/v1alpha1"
INGRESS_KIND = "Ingress"
INGRESS_CLASS_ANNOTATION = "networking.knative.dev/ingress.class"
ASYNC_INGRESS_CLASS = "async.ingress.networking.knative.dev"

MODE_ANNOTATION = "async.knative.dev/mode"
MODE_ALWAYS = "always.async.knative.dev"
MODE_CONDITIONAL = "conditional.async.knative.dev"
MODES = (MODE_CONDITIONAL, MODE_ALWAYS)

PREFER_HEADER = "Prefer"
RESPOND_ASYNC = "respond-async"
RESPOND_SYNC = "respond-sync"
ORIGINAL_HOST_HEADER = "Async-Original-Host"

STATUS_PATH_PREFIX = "/.well-known/async-requests/"
"""Requests under this prefix read a queued request's status from the producer."""

ASYNC_SERVICE_PORT = 80
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


class InvalidAsyncMode(ValueError):
    """The parent's mode annotation holds a value this controller does not know."""


def is_async_ingress(ingress: Mapping[str, Any]) -> bool:
    annotations = ingress.get("metadata", {}).get("annotations") or {}
    return annotations.get(INGRESS_CLASS_ANNOTATION) == ASYNC_INGRESS_CLASS


def async_mode(ingress: Mapping[str, Any]) -> str:
    """The parent's mode; no annotation means conditional."""
    annotations = ingress.get("metadata", {}).get("annotations") or {}
    mode = annotations.get(MODE_ANNOTATION, MODE_CONDITIONAL)
    if mode not in MODES:
        raise InvalidAsyncMode(
            f"annotation {MODE_ANNOTATION}={mode!r} is not one of {', '.join(MODES)}"
        )
    return mode


def child_ingress_name(parent: Mapping[str, Any]) -> str:
    return f"{parent['metadata']['name']}-new"


def async_service_name(parent: Mapping[str, Any]) -> str:
    return f"{parent['metadata']['name']}-async"


def original_host(parent: Mapping[str, Any]) -> str:
    """Cluster-local host of the Knative Service behind the parent Ingress (same name)."""
    meta = parent["metadata"]
    return f"{meta['name']}.{meta['namespace']}.svc.cluster.local"


def owner_reference(parent: Mapping[str, Any]) -> dict[str, Any]:
    meta = parent["metadata"]
    return {
        "apiVersion": parent.get("apiVersion", INGRESS_API_VERSION),
        "kind": parent.get("kind", INGRESS_KIND),
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _child_metadata(parent: Mapping[str, Any], name: str) -> dict[str, Any]:
    meta = parent["metadata"]
    result: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": dict(meta.get("labels") or {}),
        "ownerReferences": [owner_reference(parent)],
    }
    return result


def _producer_path(parent: Mapping[str, Any], producer_host: str, *, path: str | None, headers: Mapping[str, Any]) -> dict[str, Any]:
    meta = parent["metadata"]
    result: dict[str, Any] = {}
    if path:
        result["path"] = path
    if headers:
        result["headers"] = copy.deepcopy(dict(headers))
    result["rewriteHost"] = producer_host
    result["splits"] = [
        {
            "serviceName": async_service_name(parent),
            "serviceNamespace": meta["namespace"],
            "servicePort": ASYNC_SERVICE_PORT,
            "percent": 100,
            "appendHeaders": {ORIGINAL_HOST_HEADER: original_host(parent)},
        }
    ]
    return result


def _with_prefer(path: Mapping[str, Any], value: str) -> dict[str, Any]:
    headers = dict(path.get("headers") or {})
    headers[PREFER_HEADER] = {"exact": value}
    return headers


def _rule_paths(parent: Mapping[str, Any], paths: list[dict[str, Any]], mode: str, producer_host: str) -> list[dict[str, Any]]:
    status = _producer_path(parent, producer_host, path=STATUS_PATH_PREFIX, headers={})
    if mode == MODE_CONDITIONAL:
        to_producer = [
            _producer_path(parent, producer_host, path=p.get("path"), headers=_with_prefer(p, RESPOND_ASYNC))
            for p in paths
        ]
        return [status, *to_producer, *copy.deepcopy(paths)]
    # always: only requests that say respond-sync (the consumer's replays) reach the Service
    sync = []
    for p in paths:
        kept = copy.deepcopy(p)
        kept["headers"] = _with_prefer(p, RESPOND_SYNC)
        sync.append(kept)
    to_producer = [
        _producer_path(parent, producer_host, path=p.get("path"), headers=p.get("headers") or {})
        for p in paths
    ]
    return [status, *sync, *to_producer]


def make_child_ingress(parent: Mapping[str, Any], *, ingress_class: str, producer_host: str) -> dict[str, Any]:
    """The Ingress for the real network layer: async requests go to the producer.

    Raises :class:`InvalidAsyncMode` for an unknown mode annotation.
    """
    mode = async_mode(parent)
    annotations = {
        k: v
        for k, v in (parent["metadata"].get("annotations") or {}).items()
        if k != LAST_APPLIED_ANNOTATION
    }
    annotations[INGRESS_CLASS_ANNOTATION] = ingress_class
    metadata = _child_metadata(parent, child_ingress_name(parent))
    metadata["annotations"] = annotations

    spec = copy.deepcopy(dict(parent.get("spec") or {}))
    rules = []
    for rule in spec.get("rules") or []:
        rule = dict(rule)
        http = dict(rule.get("http") or {})
        http["paths"] = _rule_paths(parent, list(http.get("paths") or []), mode, producer_host)
        rule["http"] = http
        rules.append(rule)
    spec["rules"] = rules
    return {"apiVersion": INGRESS_API_VERSION, "kind": INGRESS_KIND, "metadata": metadata, "spec": spec}


def make_async_service(parent: Mapping[str, Any], *, producer_host: str) -> dict[str, Any]:
    """The ExternalName Service the child Ingress's async splits point at."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _child_metadata(parent, async_service_name(parent)),
        "spec": {
            "type": "ExternalName",
            "externalName": producer_host,
            "ports": [{"name": "http", "port": ASYNC_SERVICE_PORT, "protocol": "TCP", "targetPort": ASYNC_SERVICE_PORT}],
        },
    }
