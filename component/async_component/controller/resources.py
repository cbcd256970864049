"""Desired objects and status for an async Knative Ingress, built by pure functions.

Dicts in, dicts out: the kopf handlers and the local gateway both call these,
so what the local stack routes is exactly what the controller asks Kourier or
Istio to route. Field names follow knative.dev/networking's
``networking.internal.knative.dev/v1alpha1`` Ingress (KIngress).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..protocol import (
    ORIGINAL_HOST_HEADER, POLICY_HEADER, PREFER_HEADER, REPLAY_HEADER, REPLAY_VALUE, RESPOND_ASYNC, RESPOND_SYNC,
    STATUS_PATH_PREFIX,
)
from .policy import ClusterLimits, InvalidAsyncPolicy, delivery_policy

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

LAYER_FINALIZER = "ingresses.networking.internal.knative.dev"
"""The finalizer Knative's generated Ingress reconcilers (Kourier's, net-istio's) put on an Ingress of their class.

On an Ingress of the async class it means the network layer translated it
before it became async, and still serves that translation.
"""

DEFAULT_CLUSTER_DOMAIN = "cluster.local"

ASYNC_SERVICE_PORT = 80
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"

VISIBILITY_EXTERNAL = "ExternalIP"
VISIBILITY_CLUSTER_LOCAL = "ClusterLocal"

CONDITION_READY = "Ready"
CONDITION_LOAD_BALANCER_READY = "LoadBalancerReady"
CONDITION_NETWORK_CONFIGURED = "NetworkConfigured"

REASON_INVALID_MODE = "InvalidAsyncMode"
REASON_INVALID_POLICY = "InvalidAsyncPolicy"
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


def has_layer_finalizer(ingress: Mapping[str, Any]) -> bool:
    return LAYER_FINALIZER in ((ingress.get("metadata") or {}).get("finalizers") or [])


def hand_back_patch(ingress: Mapping[str, Any], layer_class: str) -> dict[str, Any]:
    """Merge patch giving a deleting Ingress back the network layer's class (guarded by its resourceVersion).

    The layer's informer passes on only events of its own class, so the Ingress
    must leave the API carrying that class: only then does the layer see it
    deleted and drop its translation (Kourier's ObserveDeletion).
    """
    return {"metadata": {"resourceVersion": ingress["metadata"].get("resourceVersion"),
                         "annotations": {INGRESS_CLASS_ANNOTATION: layer_class}}}


def release_patch(ingress: Mapping[str, Any]) -> dict[str, Any]:
    """Merge patch dropping the network layer's finalizer, keeping any other (guarded by its resourceVersion)."""
    meta = ingress["metadata"]
    return {"metadata": {"resourceVersion": meta.get("resourceVersion"),
                         "finalizers": [f for f in meta.get("finalizers") or [] if f != LAYER_FINALIZER]}}


def async_mode(ingress: Mapping[str, Any]) -> str:
    """The parent's mode; no annotation means conditional."""
    mode = _annotations(ingress).get(MODE_ANNOTATION, MODE_CONDITIONAL)
    if mode not in MODES:
        raise InvalidAsyncMode(
            f"annotation {MODE_ANNOTATION}={mode!r} is not one of {', '.join(MODES)}"
        )
    return mode


def policy_header(ingress: Mapping[str, Any]) -> str:
    """The :data:`POLICY_HEADER` value the producer routes append; raises :class:`InvalidAsyncPolicy`."""
    return delivery_policy(_annotations(ingress)).encode()


def check_parent(ingress: Mapping[str, Any], limits: ClusterLimits | None = None) -> None:
    """Raises :class:`InvalidAsyncMode` or :class:`InvalidAsyncPolicy` when the parent's annotations are unusable
    (or past the cluster's ``limits``)."""
    async_mode(ingress)
    delivery_policy(_annotations(ingress), limits)


def prefer_variants(value: str) -> tuple[str, ...]:
    """The spellings of a ``Prefer`` value the child Ingress matches (exactly, as KIngress matches).

    RFC 7240 preferences are case-insensitive, but a network layer compares
    header values byte for byte; these are the spellings clients send.
    """
    return tuple(dict.fromkeys((value, value.title(), value.upper())))


# --- child names

MAX_NAME = 63
"""Longest DNS-1035 label, and the longest name this controller gives a hashed child."""
MAX_SUBDOMAIN = 253
_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")

INGRESS_SUFFIX = "-new"
SERVICE_SUFFIX = "-async"


def is_dns_label(name: str) -> bool:
    """A DNS-1035 label: what a Service's name must be."""
    return len(name) <= MAX_NAME and _LABEL.fullmatch(name) is not None


def is_dns_subdomain(name: str) -> bool:
    """A DNS-1123 subdomain: what most objects' names, a KIngress's included, must be."""
    return len(name) <= MAX_SUBDOMAIN and _SUBDOMAIN.fullmatch(name) is not None


def child_name(parent_name: str, suffix: str, *, label: bool) -> str:
    """``<parent><suffix>`` when that is a valid name, else a short prefix, a hash and the suffix.

    Derived as Knative's ``kmeta.ChildName`` does (readable when it fits,
    else the parent's md5), and also valid where a DNS-1035 label is
    required (``label``: a Service), since a parent may be named after a
    domain (a DomainMapping's Ingress) or start with a digit. Names that were
    valid keep their readable form, so existing children keep their names.
    """
    readable = parent_name + suffix
    if is_dns_label(readable) if label else is_dns_subdomain(readable):
        return readable
    return _hashed_name(parent_name, suffix)


def _hashed_name(parent_name: str, suffix: str) -> str:
    """At most 63 characters, a DNS-1035 label: the parent's cleaned-up head, its md5, the suffix."""
    digest = hashlib.md5(parent_name.encode()).hexdigest()
    room = MAX_NAME - len(digest) - len(suffix) - 1
    head = re.sub(r"[^a-z0-9-]+", "-", parent_name.lower())
    head = re.sub(r"^[^a-z]+", "", head)[:room].rstrip("-")
    if head:
        return f"{head}-{digest}{suffix}"
    return f"{suffix.strip('-') or 'x'}-{digest}"


def child_ingress_name(parent: Mapping[str, Any]) -> str:
    return child_name(parent["metadata"]["name"], INGRESS_SUFFIX, label=False)


def async_service_name(parent: Mapping[str, Any]) -> str:
    return child_name(parent["metadata"]["name"], SERVICE_SUFFIX, label=True)


def parent_label_value(parent_name: str) -> str:
    """The parent's name where a label value can hold it (63 characters), else a hashed form."""
    if len(parent_name) <= MAX_NAME and _LABEL_VALUE.fullmatch(parent_name):
        return parent_name
    return _hashed_name(parent_name, "")


# --- the host a queued request is replayed to


def service_host(name: str, namespace: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    return f"{name}.{namespace}.svc.{cluster_domain}"


def original_host(parent: Mapping[str, Any], cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    """Cluster-local host of the Knative Service named like the parent: the fallback replay host."""
    meta = parent["metadata"]
    return service_host(meta["name"], meta["namespace"], cluster_domain)


def _cluster_local_host(rule: Mapping[str, Any], cluster_domain: str) -> str | None:
    """The rule's own fully qualified cluster-local host (else its longest host)."""
    hosts = [str(h).lower() for h in rule.get("hosts") or []]
    qualified = [h for h in hosts if h.endswith(f".svc.{cluster_domain}")]
    candidates = qualified or hosts
    return max(candidates, key=len) if candidates else None


def _traffic_path(rule: Mapping[str, Any]) -> Any:
    """The rule's last path: Serving prepends ACME and tag-header paths, so this one carries the traffic split."""
    paths = (rule.get("http") or {}).get("paths") or []
    return paths[-1] if paths else None


def replay_hosts(parent: Mapping[str, Any], cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> list[str]:
    """Per rule of the parent, the host its async requests are replayed to.

    The ``rewriteHost`` of the rule's traffic path (a DomainMapping names its
    backend so); else a ClusterLocal rule's own cluster-local host; for an
    ExternalIP rule, the host of the ClusterLocal rule that carries the same
    traffic (a tag's external and cluster-local rules route alike), so a tag
    route replays to its tagged revision, not to the default split. Rules with
    none of these fall back to the Service named like the parent.
    """
    rules = list((parent.get("spec") or {}).get("rules") or [])
    local = [(_traffic_path(rule), _cluster_local_host(rule, cluster_domain))
             for rule in rules if rule.get("visibility") == VISIBILITY_CLUSTER_LOCAL]
    fallback = original_host(parent, cluster_domain)
    result = []
    for rule in rules:
        traffic = _traffic_path(rule)
        if traffic and traffic.get("rewriteHost"):
            result.append(traffic["rewriteHost"])
        elif rule.get("visibility") == VISIBILITY_CLUSTER_LOCAL:
            result.append(_cluster_local_host(rule, cluster_domain) or fallback)
        else:
            result.append(next((host for path, host in local if host and path == traffic), fallback))
    return result


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
    return labels.get(PARENT_LABEL) == parent_label_value(parent_name)


def parent_name_of(child: Mapping[str, Any]) -> str | None:
    """The parent a child of this controller belongs to: its owner, else its label."""
    meta = child.get("metadata") or {}
    for owner in meta.get("ownerReferences") or []:
        if owner.get("kind") == INGRESS_KIND and owner.get("apiVersion") == INGRESS_API_VERSION:
            return owner.get("name")
    return (meta.get("labels") or {}).get(PARENT_LABEL)


def _child_metadata(parent: Mapping[str, Any], name: str) -> dict[str, Any]:
    meta = parent["metadata"]
    labels = dict(meta.get("labels") or {})
    labels[PARENT_LABEL] = parent_label_value(meta["name"])
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(parent)],
    }


def _producer_path(parent: Mapping[str, Any], producer_host: str, replay_host: str, policy: str, *,
                   path: Mapping[str, Any], headers: Mapping[str, Any]) -> dict[str, Any]:
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
            # a DomainMapping's path names its backend's host itself
            "appendHeaders": {ORIGINAL_HOST_HEADER: path.get("rewriteHost") or replay_host, POLICY_HEADER: policy},
        }
    ]
    return result


def _with_prefer(path: Mapping[str, Any], value: str) -> dict[str, Any]:
    headers = copy.deepcopy(dict(path.get("headers") or {}))
    headers[PREFER_HEADER] = {"exact": value}
    return headers


def _rule_paths(parent: Mapping[str, Any], paths: list[dict[str, Any]], mode: str, producer_host: str,
                replay_host: str, policy: str) -> list[dict[str, Any]]:
    """First match wins: the status prefix, then async matches, then the Service."""
    status = _producer_path(parent, producer_host, replay_host, policy, path={"path": STATUS_PATH_PREFIX}, headers={})
    if mode == MODE_CONDITIONAL:
        to_producer = [
            _producer_path(parent, producer_host, replay_host, policy, path=p, headers=_with_prefer(p, variant))
            for p in paths for variant in prefer_variants(RESPOND_ASYNC)
        ]
        return [status, *to_producer, *copy.deepcopy(paths)]
    # always: only requests that say respond-sync, and replays, reach the Service
    sync, replays = [], []
    for p in paths:
        for variant in prefer_variants(RESPOND_SYNC):
            kept = copy.deepcopy(p)
            kept["headers"] = _with_prefer(p, variant)
            sync.append(kept)
        replay = copy.deepcopy(p)
        replay["headers"] = {**copy.deepcopy(dict(p.get("headers") or {})), REPLAY_HEADER: {"exact": REPLAY_VALUE}}
        replays.append(replay)
    to_producer = [
        _producer_path(parent, producer_host, replay_host, policy, path=p, headers=p.get("headers") or {})
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


def make_child_ingress(parent: Mapping[str, Any], *, ingress_class: str, producer_host: str,
                       cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> dict[str, Any]:
    """The Ingress for the real network layer: async requests go to the producer.

    Raises :class:`InvalidAsyncMode` for an unknown mode annotation, :class:`InvalidAsyncPolicy` for a
    policy annotation it cannot use.
    """
    mode = async_mode(parent)
    policy = policy_header(parent)
    annotations = {k: v for k, v in _annotations(parent).items() if k != LAST_APPLIED_ANNOTATION}
    annotations[INGRESS_CLASS_ANNOTATION] = ingress_class
    metadata = _child_metadata(parent, child_ingress_name(parent))
    metadata["annotations"] = annotations

    spec = copy.deepcopy(dict(parent.get("spec") or {}))
    rules = []
    for rule, replay_host in zip(spec.get("rules") or [], replay_hosts(parent, cluster_domain)):
        rule = dict(rule)
        http = dict(rule.get("http") or {})
        http["paths"] = _rule_paths(parent, list(http.get("paths") or []), mode, producer_host, replay_host, policy)
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
                  foreign: Sequence[str] = (), limits: ClusterLimits | None = None) -> dict[str, Any]:
    """The parent's desired status: Ready only when the child Ingress is.

    ``child`` is the child Ingress as read from the API (None: absent);
    ``foreign`` names objects in the children's place that this controller
    did not make; ``now`` (RFC 3339) stamps conditions whose status changes; ``limits``: see
    :func:`check_parent`.
    Keys of :data:`STATUS_FIELDS` that should be absent are None.
    """
    child_ref = f"Ingress {parent['metadata']['namespace']}/{child_ingress_name(parent)}"
    try:
        check_parent(parent, limits)
        if foreign:
            network = _condition(CONDITION_NETWORK_CONFIGURED, "False", REASON_NOT_OWNED,
                                 f"There is an existing {' and '.join(foreign)} that this controller does not own")
        elif child is None:
            network = _condition(CONDITION_NETWORK_CONFIGURED, "Unknown", REASON_CHILD_MISSING, f"{child_ref} does not exist yet")
        else:
            network = _condition(CONDITION_NETWORK_CONFIGURED, "True")
    except InvalidAsyncMode as exc:
        network = _condition(CONDITION_NETWORK_CONFIGURED, "False", REASON_INVALID_MODE, str(exc))
    except InvalidAsyncPolicy as exc:
        network = _condition(CONDITION_NETWORK_CONFIGURED, "False", REASON_INVALID_POLICY, str(exc))
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
