"""Desired objects and status for an async Knative Ingress, built by pure functions.

Dicts in, dicts out: the kopf handlers and the local gateway both call these,
so what the local stack routes is exactly what the controller asks Kourier or
Istio to route. Field names follow knative.dev/networking's
``networking.internal.knative.dev/v1alpha1`` Ingress (KIngress).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

INGRESS_API_VERSION = "networking.internal.knative.dev/v1alpha1"
INGRESS_KIND = "Ingress"
INGRESS_CLASS_ANNOTATION = "networking.knative.dev/ingress.class"
ASYNC_INGRESS_CLASS = "async.ingress.networking.knative.dev"

MODE_ANNOTATION = "async.knative.dev/mode"
MODE_ALWAYS = "always.async.knative.dev"
MODE_CONDITIONAL = "conditional.async.knative.dev"
MODES = (MODE_CONDITIONAL, MODE_ALWAYS)

PARENT_LABEL = "async.knative.dev/parent"
"""Set on the child Ingress and Service to the parent's name, so child events find the parent."""

PREFER_HEADER = "Prefer"
RESPOND_ASYNC = "respond-async"
RESPOND_SYNC = "respond-sync"
ORIGINAL_HOST_HEADER = "Async-Original-Host"
REPLAY_HEADER = "Async-Replay"
REPLAY_VALUE = "true"
"""Every replay carries ``Async-Replay: true``: always-mode routes send it to the Service whatever else its
``Prefer`` says (``respond-sync, return=minimal`` does not match ``respond-sync`` exactly), and a producer that
gets one anyway refuses it (508) instead of queueing the request again."""

STATUS_PATH_PREFIX = "/.well-known/async-requests/"
"""Requests under this prefix read a queued request's status from the producer."""
STATUS_METHODS = ("GET", "HEAD")
"""What the status path answers; anything else there gets 405 and is never queued."""

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def is_status_path(path: str) -> bool:
    """Whether a network layer may route ``path`` (no query) to the status path.

    Envoy may normalise a path before matching it (percent-decoding unreserved characters,
    removing dot segments, merging slashes), so the check is made on that form too: a
    request queued under any spelling of the prefix would be replayed back to the producer.
    """
    if path.startswith(STATUS_PATH_PREFIX):
        return True
    if "%" not in path and "/." not in path and "//" not in path:
        return False
    return normalized_path(path).startswith(STATUS_PATH_PREFIX)


def normalized_path(path: str) -> str:
    """``path`` with unreserved characters percent-decoded, slashes merged and dot segments removed."""
    parts = path.split("%")
    decoded = [parts[0]]
    for part in parts[1:]:
        try:
            char = chr(int(part[:2], 16)) if len(part) >= 2 else ""
        except ValueError:
            char = ""
        decoded.append(char + part[2:] if char in _UNRESERVED and char else "%" + part)
    segments: list[str] = []
    for segment in "".join(decoded).split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    trailing = "/" if path.endswith(("/", "/.", "/..")) and segments else ""
    return "/" + "/".join(segments) + trailing

ASYNC_SERVICE_PORT = 80
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"

VISIBILITY_EXTERNAL = "ExternalIP"
VISIBILITY_CLUSTER_LOCAL = "ClusterLocal"

CONDITION_READY = "Ready"
CONDITION_LOAD_BALANCER_READY = "LoadBalancerReady"
CONDITION_NETWORK_CONFIGURED = "NetworkConfigured"

REASON_INVALID_MODE = "InvalidAsyncMode"
REASON_CHILD_MISSING = "ChildIngressMissing"
REASON_CHILD_NOT_READY = "ChildIngressNotReady"
REASON_NOT_OWNED = "NotOwned"

LOAD_BALANCER_FIELDS = ("publicLoadBalancer", "privateLoadBalancer")
STATUS_FIELDS = ("conditions", *LOAD_BALANCER_FIELDS, "observedGeneration")
"""The parts of the parent's status this controller owns."""


class InvalidAsyncMode(ValueError):
    """The parent's mode annotation holds a value this controller does not know."""


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def is_async_ingress(ingress: Mapping[str, Any]) -> bool:
    return _annotations(ingress).get(INGRESS_CLASS_ANNOTATION) == ASYNC_INGRESS_CLASS


def async_mode(ingress: Mapping[str, Any]) -> str:
    """The parent's mode; no annotation means conditional."""
    mode = _annotations(ingress).get(MODE_ANNOTATION, MODE_CONDITIONAL)
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


def is_child_of(obj: Mapping[str, Any], parent_name: str) -> bool:
    """Did this controller make ``obj`` for the parent Ingress ``parent_name``?"""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(PARENT_LABEL) == parent_name


def _child_metadata(parent: Mapping[str, Any], name: str) -> dict[str, Any]:
    meta = parent["metadata"]
    labels = dict(meta.get("labels") or {})
    labels[PARENT_LABEL] = meta["name"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(parent)],
    }


def _producer_path(parent: Mapping[str, Any], producer_host: str, *, path: Mapping[str, Any], headers: Mapping[str, Any]) -> dict[str, Any]:
    """Same match as ``path`` (path prefix, ``headers``), sent to the producer instead."""
    meta = parent["metadata"]
    result: dict[str, Any] = {}
    if path.get("path"):
        result["path"] = path["path"]
    if headers:
        result["headers"] = copy.deepcopy(dict(headers))
    if path.get("appendHeaders"):
        # e.g. Knative-Serving-Tag: the producer records it, the consumer replays it
        result["appendHeaders"] = dict(path["appendHeaders"])
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
    headers = copy.deepcopy(dict(path.get("headers") or {}))
    headers[PREFER_HEADER] = {"exact": value}
    return headers


def _rule_paths(parent: Mapping[str, Any], paths: list[dict[str, Any]], mode: str, producer_host: str) -> list[dict[str, Any]]:
    """First match wins: the status prefix, then async matches, then the Service."""
    status = _producer_path(parent, producer_host, path={"path": STATUS_PATH_PREFIX}, headers={})
    if mode == MODE_CONDITIONAL:
        to_producer = [
            _producer_path(parent, producer_host, path=p, headers=_with_prefer(p, RESPOND_ASYNC))
            for p in paths
        ]
        return [status, *to_producer, *copy.deepcopy(paths)]
    # always: only requests that say respond-sync, and replays, reach the Service
    sync, replays = [], []
    for p in paths:
        kept = copy.deepcopy(p)
        kept["headers"] = _with_prefer(p, RESPOND_SYNC)
        sync.append(kept)
        replay = copy.deepcopy(p)
        replay["headers"] = {**copy.deepcopy(dict(p.get("headers") or {})), REPLAY_HEADER: {"exact": REPLAY_VALUE}}
        replays.append(replay)
    to_producer = [
        _producer_path(parent, producer_host, path=p, headers=p.get("headers") or {})
        for p in paths
    ]
    return [status, *sync, *replays, *to_producer]


def _set_defaults(spec: dict[str, Any]) -> None:
    """Knative's Ingress webhook defaults, applied up front so drift checks stay quiet."""
    for rule in spec.get("rules") or []:
        rule.setdefault("visibility", VISIBILITY_EXTERNAL)
        for path in (rule.get("http") or {}).get("paths") or []:
            splits = path.get("splits") or []
            if len(splits) == 1 and not splits[0].get("percent"):
                splits[0]["percent"] = 100


def make_child_ingress(parent: Mapping[str, Any], *, ingress_class: str, producer_host: str) -> dict[str, Any]:
    """The Ingress for the real network layer: async requests go to the producer.

    Raises :class:`InvalidAsyncMode` for an unknown mode annotation.
    """
    mode = async_mode(parent)
    annotations = {k: v for k, v in _annotations(parent).items() if k != LAST_APPLIED_ANNOTATION}
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
    _set_defaults(spec)
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


# --- the parent's status


def _condition(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    result = {"type": type_, "status": status}
    if reason:
        result["reason"] = reason
    if message:
        result["message"] = message
    return result


def _find_condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition
    return None


def _child_load_balancer(child: Mapping[str, Any]) -> dict[str, str]:
    """LoadBalancerReady for the parent, judged from the child's Ready condition."""
    meta = child["metadata"]
    ref = f"Ingress {meta.get('namespace')}/{meta['name']}"
    ready = _find_condition(child, CONDITION_READY)
    if ready is None:
        return _condition(CONDITION_LOAD_BALANCER_READY, "Unknown", REASON_CHILD_NOT_READY,
                          f"{ref} has no Ready condition yet")
    generation = meta.get("generation")
    if generation is not None and (child.get("status") or {}).get("observedGeneration") != generation:
        return _condition(CONDITION_LOAD_BALANCER_READY, "Unknown", REASON_CHILD_NOT_READY,
                          f"{ref} has not caught up with its generation {generation} yet")
    status = ready.get("status", "Unknown")
    if status == "True":
        return _condition(CONDITION_LOAD_BALANCER_READY, "True")
    detail = ": ".join(part for part in (ready.get("reason"), ready.get("message")) if part)
    message = f"{ref} is not ready: Ready={status}" + (f" ({detail})" if detail else "")
    return _condition(CONDITION_LOAD_BALANCER_READY, "False" if status == "False" else "Unknown",
                      REASON_CHILD_NOT_READY, message)


def _ready(*conditions: dict[str, str]) -> dict[str, str]:
    """Ready follows the first False condition, else the first Unknown one (Knative's rule)."""
    for wanted in ("False", "Unknown"):
        for condition in conditions:
            if condition["status"] == wanted:
                return _condition(CONDITION_READY, wanted, condition.get("reason", ""), condition.get("message", ""))
    return _condition(CONDITION_READY, "True")


def parent_status(parent: Mapping[str, Any], child: Mapping[str, Any] | None, *, now: str,
                  foreign: Sequence[str] = ()) -> dict[str, Any]:
    """The parent's desired status: Ready only when the child Ingress is.

    ``child`` is the child Ingress as read from the API (None: absent);
    ``foreign`` names objects in the children's place that this controller
    did not make; ``now`` (RFC 3339) stamps conditions whose status changes.
    Keys of :data:`STATUS_FIELDS` that should be absent are None.
    """
    child_ref = f"Ingress {parent['metadata']['namespace']}/{child_ingress_name(parent)}"
    try:
        async_mode(parent)
        if foreign:
            network = _condition(CONDITION_NETWORK_CONFIGURED, "False", REASON_NOT_OWNED,
                                 f"There is an existing {' and '.join(foreign)} that this controller does not own")
        elif child is None:
            network = _condition(CONDITION_NETWORK_CONFIGURED, "Unknown", REASON_CHILD_MISSING, f"{child_ref} does not exist yet")
        else:
            network = _condition(CONDITION_NETWORK_CONFIGURED, "True")
    except InvalidAsyncMode as exc:
        network = _condition(CONDITION_NETWORK_CONFIGURED, "False", REASON_INVALID_MODE, str(exc))
    if child is None:
        balancer = _condition(CONDITION_LOAD_BALANCER_READY, "Unknown", REASON_CHILD_MISSING, f"{child_ref} does not exist yet")
    else:
        balancer = _child_load_balancer(child)

    conditions = sorted([network, balancer, _ready(network, balancer)], key=lambda c: c["type"])
    for condition in conditions:
        previous = _find_condition(parent, condition["type"])
        same = previous is not None and previous.get("status") == condition["status"]
        condition["lastTransitionTime"] = previous.get("lastTransitionTime", now) if same else now  # type: ignore[union-attr]

    status: dict[str, Any] = {"conditions": conditions}
    child_status = (child or {}).get("status") or {}
    for field in LOAD_BALANCER_FIELDS:
        ready = balancer["status"] == "True" and child_status.get(field)
        status[field] = copy.deepcopy(child_status[field]) if ready else None
    status["observedGeneration"] = parent["metadata"].get("generation")
    return status


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch of ``status`` that writes ``desired`` (empty: nothing to write)."""
    current = current or {}
    return {
        key: value
        for key, value in desired.items()
        if current.get(key) != value and not (value is None and key not in current)
    }
