"""What the cluster would hold for the local stack: the Services in an app dir, and what gets routed where.

The gateway routes exactly what the cluster's network layer would see: the
Ingress Knative Serving makes for each Service (:mod:`.knative_serving`) and,
for the async ones, the child Ingress and ExternalName Service the controller
makes (:mod:`..controller.resources`).
"""

from __future__ import annotations

import os
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
    raise StackError(f"cannot find the sample app ({APP_FILE}) in {where}: run from the repository root or pass --app-dir")


def load_services(app_dir: Path) -> list[dict[str, Any]]:
    """The Knative Services (serving.knative.dev/v1) in the app dir's manifests."""
    found = []
    for path in sorted(app_dir.glob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise StackError(f"cannot read {path}: {exc}") from None
        found += [d for d in docs if isinstance(d, dict) and d.get("kind") == "Service"
                  and str(d.get("apiVersion", "")).startswith("serving.knative.dev/")]
    if not found:
        raise StackError(f"no Knative Service manifests (*.yml) in {app_dir}")
    return found


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
