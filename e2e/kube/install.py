"""What the kube backend installs: Knative's CRDs, and the component's own identity from its manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kind.versions import Versions
from kube import crds
from kube.controlplane import ControlPlane, kubeconfig_text

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "component" / "config"
SYSTEM_NAMESPACE = "knative-serving"  # where Knative, and so the component's overlays, live
CONTROLLER_ACCOUNT = "async-controller"
CONTROLLER_USER = f"system:serviceaccount:{SYSTEM_NAMESPACE}:{CONTROLLER_ACCOUNT}"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def render(control_plane: ControlPlane, path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize path`` as objects."""
    text = control_plane.kubectl("kustomize", str(path)).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def crds_for(versions: Versions) -> list[dict[str, Any]]:
    """What the control plane installs before its controllers start: Knative Serving's CRDs."""
    return crds.serving_crds(versions)


def prepare(control_plane: ControlPlane) -> None:
    """Knative's namespace and the controller's RBAC from the kourier overlay."""
    control_plane.ensure_namespace(SYSTEM_NAMESPACE)
    rbac = [obj for obj in render(control_plane, CONFIG / "overlays" / "kourier") if obj["kind"] in RBAC_KINDS]
    if not any(obj["kind"] == "ServiceAccount" and obj["metadata"]["name"] == CONTROLLER_ACCOUNT for obj in rbac):
        raise RuntimeError(f"the kourier overlay has no ServiceAccount {CONTROLLER_ACCOUNT}")
    control_plane.apply(rbac)


def controller_kubeconfig(control_plane: ControlPlane, path: Path) -> Path:
    """A kubeconfig that logs in as the controller's ServiceAccount, so its ClusterRole is what it may do."""
    token = control_plane.service_account_token(SYSTEM_NAMESPACE, CONTROLLER_ACCOUNT)
    path.write_text(kubeconfig_text(control_plane.url, control_plane.ca_file, token, user=CONTROLLER_ACCOUNT))
    return path
