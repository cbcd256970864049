#!/usr/bin/env python3
"""Render the release manifests: one plain file per overlay, with the version stamped in.

    python scripts/render-release.py                      # release/async-component-<overlay>.yaml
    python scripts/render-release.py --image registry.example.com/async-component --out dist/

Each file is ``kubectl kustomize component/config/overlays/<overlay>`` with the
image tag and the ``app.kubernetes.io/version`` label set to the version
(default: pyproject.toml's), so ``kubectl apply -f`` of one file installs it.
Selectors keep their labels: a Deployment's selector cannot change on upgrade.
Needs kubectl 1.27 or newer on PATH (its built-in kustomize).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS_DIR = ROOT / "component" / "config" / "overlays"
OVERLAYS = ("kourier", "istio", "openshift")
IMAGE = "dev.local/async-component"
VERSION_LABEL = "app.kubernetes.io/version"


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def render(overlay: str, version: str, image: str = IMAGE, kubectl: str = "kubectl", namespace: str | None = None) -> str:
    """The overlay as one YAML stream, stamped with ``version`` (and moved to ``namespace``)."""
    with tempfile.TemporaryDirectory(prefix="async-component-release-") as tmp:
        # kustomize refuses absolute resource paths: link the overlay in.
        (Path(tmp) / "overlay").symlink_to(OVERLAYS_DIR / overlay)
        stamp = {  # JSON is YAML: kustomize reads it as written
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": ["overlay"],
            "labels": [{"pairs": {VERSION_LABEL: version}, "includeSelectors": False, "includeTemplates": True}],
            "images": [{"name": IMAGE, "newName": image, "newTag": version}],
        }
        if namespace:  # the role bindings' subjects follow; the controller reads its namespace at run time
            stamp["namespace"] = namespace
        (Path(tmp) / "kustomization.yaml").write_text(json.dumps(stamp, indent=2))
        result = subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", tmp],
                                capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay} failed: {result.stderr.strip()}")
    header = (f"# async-component {version} for {overlay_title(overlay)}, rendered from "
              f"component/config/overlays/{overlay} by scripts/render-release.py; do not edit.\n"
              f"# Create the Redis Secret first (component/config/README.md), then: kubectl apply -f <this file>\n")
    return header + result.stdout


def overlay_title(overlay: str) -> str:
    return {"kourier": "Knative Serving on Kourier", "istio": "Knative Serving on Istio",
            "openshift": "OpenShift Serverless (Kourier)"}[overlay]


def release_path(out: Path, overlay: str) -> Path:
    return out / f"async-component-{overlay}.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=None, help="version to stamp in (default: pyproject.toml's)")
    parser.add_argument("--image", default=IMAGE, help=f"image repository, tagged with the version (default: {IMAGE})")
    parser.add_argument("--namespace", default=None,
                        help="install into this namespace instead of knative-serving (it must exist)")
    parser.add_argument("--out", type=Path, default=ROOT / "release", help="directory to write to (default: release/)")
    parser.add_argument("--kubectl", default=shutil.which("kubectl") or "kubectl", help="kubectl to run")
    args = parser.parse_args(argv)
    version = args.version or project_version()
    args.out.mkdir(parents=True, exist_ok=True)
    for overlay in OVERLAYS:
        path = release_path(args.out, overlay)
        path.write_text(render(overlay, version, args.image, args.kubectl, args.namespace))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
