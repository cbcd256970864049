"""How e2e/kube builds the control plane and finds Knative's CRDs, from its pure parts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "e2e"))

from kind import versions  # noqa: E402
from kube import build, crds, gomodules  # noqa: E402

KUBERNETES_GO_MOD = """module k8s.io/kubernetes

go 1.24.0

require (
\tgo.etcd.io/etcd/client/v3 v3.6.4
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/kube-openapi => k8s.io/kube-openapi v0.0.0-20250710124328-f3f2b991d03b
)
"""


def test_the_wrapper_replaces_each_staging_module_with_its_published_version():
    wrapper = build.kubernetes_wrapper("v1.34.4", KUBERNETES_GO_MOD)
    assert "require k8s.io/kubernetes v1.34.4" in wrapper
    replaced = [line.strip() for line in wrapper.splitlines() if "=>" in line]
    assert replaced == ["k8s.io/api => k8s.io/api v0.34.4", "k8s.io/client-go => k8s.io/client-go v0.34.4"]


def test_a_go_mod_without_staging_modules_is_an_error():
    with pytest.raises(ValueError, match="replaces no staging module"):
        build.kubernetes_wrapper("v1.34.4", "module k8s.io/kubernetes\n")


@pytest.mark.parametrize("kubernetes, staging", [("v1.34.4", "v0.34.4"), ("v1.35.0", "v0.35.0")])
def test_staging_version(kubernetes, staging):
    assert build.staging_version(kubernetes) == staging


def test_a_kubernetes_version_must_be_v1():
    with pytest.raises(ValueError, match="not like v1.34.4"):
        build.staging_version("1.34")


def test_the_build_stamps_the_version_the_api_server_reports():
    flags = build.version_ldflags("v1.34.4")
    assert "-X k8s.io/component-base/version.gitVersion=v1.34.4" in flags
    assert "-X k8s.io/client-go/pkg/version.gitMinor=34" in flags


def test_the_etcd_wrapper_requires_the_server_module():
    assert "require go.etcd.io/etcd/server/v3 v3.6.4" in build.etcd_wrapper("v3.6.4")


def test_binaries_are_cached_per_version_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNC_COMPONENT_CACHE", str(tmp_path))
    pinned = versions.load({})
    assert build.cached(pinned) is None
    for path in (tmp_path / "kube" / pinned.kubernetes / "bin" / "kube-apiserver",
                 tmp_path / "kube" / pinned.kubernetes / "bin" / "kube-controller-manager",
                 tmp_path / "kube" / f"etcd-{pinned.etcd}" / "bin" / "etcd"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    assert build.cached(pinned).etcd == tmp_path / "kube" / f"etcd-{pinned.etcd}" / "bin" / "etcd"
    lines: list[str] = []
    build.ensure(pinned, out=lines.append)  # nothing to build: no go command is run
    assert all("cached in" in line for line in lines) and len(lines) == 2


@pytest.mark.parametrize("release, module_version", [("1.22.1", "v0.49.1"), ("1.22.0", "v0.49.0"), ("1.0.0", "v0.27.0")])
def test_knative_releases_map_onto_go_module_versions(release, module_version):
    assert versions.load({"KNATIVE_SERVING_VERSION": release}).go_module_version("serving") == module_version


def test_overrides_are_normalised():
    pinned = versions.load({"KUBERNETES_VERSION": "1.34.2", "ETCD_VERSION": "3.6.5"})
    assert (pinned.kubernetes, pinned.etcd) == ("v1.34.2", "v3.6.5")


def test_a_required_version_is_read_from_go_mod(tmp_path):
    go_mod = tmp_path / "go.mod"
    go_mod.write_text("module x\n\nrequire knative.dev/hack v0.0.0-1 // indirect\nrequire (\n"
                      "\tknative.dev/networking v0.0.0-20260120131110-a7cdca238a0d\n)\n")
    assert gomodules.requirement(go_mod, "knative.dev/networking") == "v0.0.0-20260120131110-a7cdca238a0d"
    assert gomodules.requirement(go_mod, "knative.dev/hack") == "v0.0.0-1"
    assert gomodules.requirement(go_mod, "knative.dev/pkg") is None


def test_only_custom_resource_definitions_are_taken(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: a.example.dev}\n"
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n---\n")
    (tmp_path / "notes.txt").write_text("kind: CustomResourceDefinition\n")
    assert [crd["metadata"]["name"] for crd in crds.crds_in(tmp_path)] == ["a.example.dev"]
