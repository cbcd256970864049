"""What the cluster would hold for the local stack: the Services in an app dir, and what gets routed where.

The gateway routes exactly what the cluster's network layer would see: the
Ingress Knative Serving makes for each Service (:mod:`.knative_serving`) and,
for the async ones, the child Ingress and ExternalName Service the controller
makes (:mod:`..controller.resources`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from ..controller import resources
from ..controller.policy import ClusterLimits
from ..settings import DEFAULT_CLUSTER_DOMAIN, ControllerSettings
from . import StackError
from . import knative_serving as serving
from .gateway import Routes, service_targets

APP_FILE = "sleep_app.py"
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
"""A Service's name, as Kubernetes requires: a Service's host name is made of it."""
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
"""A namespace's name."""


def find_app_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The sample app's directory: ``explicit``, else test/app under the cwd, else under this package's repo."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [Path.cwd() / "test" / "app", Path(__file__).resolve().parents[3] / "test" / "app"]
    for candidate in candidates:
        if (candidate / APP_FILE).is_file():
            return candidate.resolve()
    where = " or ".join(str(c) for c in candidates)
    if explicit is not None:
        raise StackError(f"cannot find the sample app ({APP_FILE}) in --app-dir {where}: the app dir holds it beside"
                         " the Service manifests (see test/app)")
    raise StackError(f"cannot find the sample app ({APP_FILE}) in {where}: run from the repository root or pass --app-dir")


def load_services(app_dir: Path) -> list[dict[str, Any]]:
    """The Knative Services (serving.knative.dev/v1) in the app dir's manifests; StackError for one the API server
    would refuse (no name, a name or namespace that is no DNS label) or one defined twice."""
    found = []
    seen: dict[str, str] = {}
    """``namespace/name`` -> the file that defines it."""
    for path in sorted(app_dir.glob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise StackError(f"cannot read {path}: {exc}") from None
        for ksvc in docs:
            if (isinstance(ksvc, dict) and ksvc.get("kind") == "Service"
                    and str(ksvc.get("apiVersion", "")).startswith("serving.knative.dev/")):
                named = _named(ksvc, path)
                if named in seen:
                    raise StackError(f"{path}: Service {named} again (first in {seen[named]}): each Service once")
                seen[named] = str(path)
                found.append(ksvc)
    if not found:
        raise StackError(f"no Knative Service manifests (*.yml) in {app_dir}")
    return found


def _named(ksvc: dict[str, Any], path: Path) -> str:
    """``namespace/name``, checked as the API server would check them: a refused one raises StackError."""
    metadata = ksvc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        raise StackError(f"{path}: a Knative Service without metadata.name")
    namespace = serving.namespace(ksvc)
    if not DNS_1035_LABEL.fullmatch(name):
        raise StackError(f"{path}: Service name {name!r} is not a DNS-1035 label (at most 63 lower-case letters,"
                         f" digits and '-', starting with a letter and ending with a letter or digit)")
    if not isinstance(namespace, str) or not DNS_1123_LABEL.fullmatch(namespace):
        raise StackError(f"{path}: Service {name}: namespace {namespace!r} is not a DNS-1123 label (at most 63"
                         f" lower-case letters, digits and '-', starting and ending with a letter or digit)")
    return f"{namespace}/{name}"


def cluster_routes(ksvcs: list[dict[str, Any]], *, app_address: str, producer_address: str,
                   domain: str = serving.DEFAULT_DOMAIN, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
                   limits: ClusterLimits | None = None) -> Routes:
    """What the network layer would route: Serving's Ingresses plus the controller's children and Services; a
    Service whose annotations the controller would refuse (``limits``: the cluster's, as it reads them) raises
    :class:`StackError`."""
    controller = ControllerSettings(cluster_domain=cluster_domain)
    ingresses: list[dict[str, Any]] = []
    services: dict[tuple[str, str], str] = {}
    for ksvc in ksvcs:
        parent = serving.ingress_for_service(ksvc, domain=domain, default_class=controller.ingress_class,
                                             cluster_domain=cluster_domain)
        ingresses.append(parent)
        services[(serving.namespace(ksvc), serving.revision_name(ksvc))] = app_address
        if resources.is_async_ingress(parent):
            try:
                resources.check_parent(parent, limits)
                child = resources.make_child_ingress(parent, ingress_class=controller.ingress_class,
                                                     producer_host=controller.producer_host,
                                                     cluster_domain=cluster_domain)
            except (resources.InvalidAsyncMode, resources.InvalidAsyncPolicy) as exc:  # a cluster's parent says so
                raise StackError(f"Service {serving.namespace(ksvc)}/{ksvc['metadata']['name']}: {exc}") from None
            ingresses.append(child)
            services.update(service_targets([resources.make_async_service(parent, producer_host=controller.producer_host)]))
    return Routes(tuple(ingresses), services, {controller.producer_host: producer_address},
                  ingress_class=controller.ingress_class)


def conditional_async(ksvc: dict[str, Any]) -> bool:
    """Async on ``Prefer: respond-async`` only: the Service the quick-start hint names."""
    annotations = ksvc["metadata"].get("annotations") or {}
    return (serving.ingress_class(ksvc) == resources.ASYNC_INGRESS_CLASS
            and annotations.get(resources.MODE_ANNOTATION, resources.MODE_CONDITIONAL) == resources.MODE_CONDITIONAL)
