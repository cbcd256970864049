"""The networking Ingress Knative Serving would create for a Knative Service.

Pure, dicts in and out, for the local stack: it has no Serving controller, so
it builds the Ingress (KIngress) itself and hands it to the same functions the
async controller uses. Only the first Revision (``<name>-00001``) at 100 % is
modelled, which is what a freshly applied Service gets.

Shape, as Serving's route reconciler builds it: labels and annotations of the
Route (copied from the Service), the ingress class from the Service's
annotation (either spelling) or the cluster default, one ClusterLocal rule and,
unless the Service is labelled cluster-local, one ExternalIP rule; each rule
has one path whose single split targets the Revision's Service on port 80 and
appends the Revision's name and namespace headers. Recent Serving versions list
only ``<name>.<ns>.svc.<cluster domain>`` in the ClusterLocal rule and let the
network layer add the short forms; this lists all three, as older versions
did, so a gateway need not expand them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..controller.resources import (
    DEFAULT_CLUSTER_DOMAIN, INGRESS_API_VERSION, INGRESS_CLASS_ANNOTATION, INGRESS_KIND, LAST_APPLIED_ANNOTATION,
)
from ..settings import INGRESS_CLASSES

INGRESS_CLASS_ALT_ANNOTATION = "networking.knative.dev/ingress-class"
"""The newer spelling Serving also accepts on a Service or Route."""
VISIBILITY_LABEL = "networking.knative.dev/visibility"
CLUSTER_LOCAL = "cluster-local"

SERVICE_LABEL = "serving.knative.dev/service"
ROUTE_LABEL = "serving.knative.dev/route"
ROUTE_NAMESPACE_LABEL = "serving.knative.dev/routeNamespace"

REVISION_HEADER = "Knative-Serving-Revision"
NAMESPACE_HEADER = "Knative-Serving-Namespace"
REVISION_PORT = 80
"""Port of a Revision's public Service for HTTP/1 (the activator's port too)."""

VISIBILITY_CLUSTER_LOCAL = "ClusterLocal"
VISIBILITY_EXTERNAL_IP = "ExternalIP"

DEFAULT_DOMAIN = "example.com"
DEFAULT_INGRESS_CLASS = INGRESS_CLASSES[0]


def revision_name(ksvc: Mapping[str, Any], generation: int = 1) -> str:
    return f"{ksvc['metadata']['name']}-{generation:05d}"


def namespace(ksvc: Mapping[str, Any]) -> str:
    return ksvc["metadata"].get("namespace") or "default"


def cluster_local_hosts(ksvc: Mapping[str, Any], cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> list[str]:
    base = f"{ksvc['metadata']['name']}.{namespace(ksvc)}"
    return [base, f"{base}.svc", f"{base}.svc.{cluster_domain}"]


def external_host(ksvc: Mapping[str, Any], domain: str = DEFAULT_DOMAIN) -> str:
    """The host of the Service's public URL with the default domain template."""
    return f"{ksvc['metadata']['name']}.{namespace(ksvc)}.{domain}"


def ingress_class(ksvc: Mapping[str, Any], default_class: str = DEFAULT_INGRESS_CLASS) -> str:
    annotations = ksvc["metadata"].get("annotations") or {}
    return annotations.get(INGRESS_CLASS_ANNOTATION) or annotations.get(INGRESS_CLASS_ALT_ANNOTATION) or default_class


def _rule(ksvc: Mapping[str, Any], hosts: list[str], visibility: str) -> dict[str, Any]:
    ns = namespace(ksvc)
    revision = revision_name(ksvc)
    split = {
        "serviceName": revision,
        "serviceNamespace": ns,
        "servicePort": REVISION_PORT,
        "percent": 100,
        "appendHeaders": {REVISION_HEADER: revision, NAMESPACE_HEADER: ns},
    }
    return {"hosts": hosts, "visibility": visibility, "http": {"paths": [{"splits": [split]}]}}


def ingress_for_service(
    ksvc: Mapping[str, Any], *, domain: str = DEFAULT_DOMAIN, default_class: str = DEFAULT_INGRESS_CLASS,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
) -> dict[str, Any]:
    """The Ingress Serving creates for ``ksvc`` (a serving.knative.dev/v1 Service)."""
    meta = ksvc["metadata"]
    name, ns = meta["name"], namespace(ksvc)
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items()
        if k not in (LAST_APPLIED_ANNOTATION, INGRESS_CLASS_ALT_ANNOTATION)
    }
    annotations[INGRESS_CLASS_ANNOTATION] = ingress_class(ksvc, default_class)
    labels = dict(meta.get("labels") or {})
    labels.update({SERVICE_LABEL: name, ROUTE_LABEL: name, ROUTE_NAMESPACE_LABEL: ns})

    rules = [_rule(ksvc, cluster_local_hosts(ksvc, cluster_domain), VISIBILITY_CLUSTER_LOCAL)]
    if labels.get(VISIBILITY_LABEL) != CLUSTER_LOCAL:
        rules.append(_rule(ksvc, [external_host(ksvc, domain)], VISIBILITY_EXTERNAL_IP))
    return {
        "apiVersion": INGRESS_API_VERSION,
        "kind": INGRESS_KIND,
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "spec": {"rules": rules},
    }
