"""The component's manifests, server-side applied to a real API server (``--kube``).

Every overlay (kourier, istio, openshift) and kourier with the redis-tls
component. test/unit/test_manifests.py checks them against JSON schemas; here the API
server itself judges them, with Knative Serving's own CRD schemas, strict field
validation (an unknown field is an error, not silently pruned) and admission.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "e2e"))

from kube.install import CONFIG, render  # noqa: E402

OVERLAYS = sorted(path.name for path in (CONFIG / "overlays").iterdir())


def stored(kube, obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the API server keeps it."""
    group = obj["apiVersion"].rpartition("/")[0]
    resource = f"{obj['kind'].lower()}.{group}" if group else obj["kind"].lower()
    meta = obj["metadata"]
    namespace = ["-n", meta["namespace"]] if "namespace" in meta else []
    return yaml.safe_load(kube.control_plane.kubectl("get", resource, meta["name"], *namespace, "-o", "yaml").stdout)


def missing(applied: Any, found: Any, path: str = "") -> list[str]:
    """Where ``found`` lacks or changed what ``applied`` set (server-filled fields are extra, and fine)."""
    if isinstance(applied, dict) and isinstance(found, dict):
        return [m for key, value in applied.items() for m in missing(value, found.get(key), f"{path}.{key}")]
    if isinstance(applied, list) and isinstance(found, list) and len(applied) == len(found):
        return [m for i, (a, f) in enumerate(zip(applied, found)) for m in missing(a, f, f"{path}[{i}]")]
    return [] if applied == found else [path or "."]


def apply_and_compare(kube, objects: list[dict[str, Any]]) -> None:
    result = kube.control_plane.apply(objects, check=False)
    assert result.returncode == 0, f"server-side apply refused:\n{result.stderr}"
    for obj in objects:
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        if obj["kind"] == "Secret":
            body.pop("stringData", None)  # stored as data, base64
        lost = missing(body, stored(kube, obj))
        assert not lost, f"{obj['kind']} {obj['metadata']['name']}: the API server dropped or changed {lost}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_accepted_server_side(kube, overlay):
    objects = render(kube.control_plane, CONFIG / "overlays" / overlay)
    assert {"Deployment", "Service", "ClusterRole"} <= {obj["kind"] for obj in objects}
    apply_and_compare(kube, objects)


def test_redis_tls_component_is_accepted_server_side(kube, tmp_path: Path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(CONFIG / "overlays" / "kourier", tmp_path)],
        "components": [os.path.relpath(CONFIG / "components" / "redis-tls", tmp_path)],
    }))
    objects = render(kube.control_plane, tmp_path)
    mounted = [obj for obj in objects if obj["kind"] == "Service" and "REDIS_CA_FILE" in yaml.safe_dump(obj)]
    assert mounted, "the redis-tls component changed no Knative Service"
    apply_and_compare(kube, objects)


def test_a_field_knatives_schema_does_not_know_is_refused(kube):
    """The check above can fail: the real schema refuses what it does not describe."""
    objects = render(kube.control_plane, CONFIG / "overlays" / "kourier")
    service = next(obj for obj in objects if obj["apiVersion"].startswith("serving.knative.dev/"))
    service["spec"]["template"]["spec"]["containerz"] = []
    result = kube.control_plane.apply([service], check=False)
    assert result.returncode != 0
    assert "containerz" in result.stderr
