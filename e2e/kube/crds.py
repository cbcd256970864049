"""Knative's CustomResourceDefinitions, read from its Go modules at test time (never committed).

knative.dev/serving's config/core/300-resources holds Serving's own CRDs; the
networking ones (Ingress, Certificate, ServerlessService, ...) live in the
knative.dev/networking module at the version Serving's go.mod requires.
eventing-redis (RedisStreamSource) would come from knative.dev/eventing-redis,
but the module proxy reachable here refuses that module (403 "not
available"), so :func:`eventing_redis_crds` raises :class:`Unavailable` with
the proxy's answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kind.versions import Versions
from kube import gomodules

SERVING_MODULE = "knative.dev/serving"
NETWORKING_MODULE = "knative.dev/networking"
EVENTING_REDIS_MODULE = "knative.dev/eventing-redis"


class Unavailable(RuntimeError):
    """A Knative module the CRDs come from cannot be downloaded here."""


def crds_in(directory: Path) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition in the YAML files under ``directory``."""
    found = []
    for path in sorted(directory.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                found.append(doc)
    return found


def serving_crds(versions: Versions) -> list[dict[str, Any]]:
    """Serving's and its networking layer's CRDs at the pinned Serving release."""
    serving = gomodules.download(SERVING_MODULE, versions.go_module_version("serving"))
    networking_version = gomodules.requirement(Path(serving["GoMod"]), NETWORKING_MODULE)
    if networking_version is None:
        raise Unavailable(f"{SERVING_MODULE} {serving['Version']} does not require {NETWORKING_MODULE}")
    networking = gomodules.download(NETWORKING_MODULE, networking_version)
    crds = crds_in(Path(serving["Dir"]) / "config" / "core") + crds_in(Path(networking["Dir"]) / "config")
    names = {crd["metadata"]["name"] for crd in crds}
    if "ingresses.networking.internal.knative.dev" not in names or "services.serving.knative.dev" not in names:
        raise Unavailable(f"no Ingress or Service CRD among {sorted(names)}")
    return list({crd["metadata"]["name"]: crd for crd in crds}.values())


def eventing_redis_crds(versions: Versions) -> list[dict[str, Any]]:
    try:
        module = gomodules.download(EVENTING_REDIS_MODULE, versions.go_module_version("eventing_redis"))
    except gomodules.GoError as exc:
        raise Unavailable(str(exc)) from None
    return crds_in(Path(module["Dir"]) / "config")
