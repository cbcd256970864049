"""Every version the kind e2e run installs, pinned here and overridable by env.

Knative 1.22 needs Kubernetes >= 1.34; kind builds node images for 1.34 from
v0.30.0 on, and pytest-kind's own default (kind v0.17) is far older, so the kind
binary and the node image are pinned here too. The node image carries the digest
kind's release notes list for it, as kind asks.

The real control plane of the ``kube`` test backend (e2e/kube/) is built from
the Go module proxy: kube-apiserver and kube-controller-manager at
``kubernetes``, etcd at ``etcd`` (the version Kubernetes 1.34 itself requires).
Knative's Go modules are tagged v0.<minor + 27>.<patch> beside each
knative-v1.<minor>.<patch> release (1.22.1 is v0.49.1, whose knative.dev/pkg
asks for Kubernetes >= 1.34 as Knative 1.22 does); the proxy serves only
the v0 tags, see :func:`go_module_version`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

MIN_KIND = (0, 30, 0)
MIN_KUBERNETES_MINOR = 34
KNATIVE_GO_MINOR_OFFSET = 27  # knative-v1.0.0 was tagged v0.27.0 too

GITHUB_RELEASE = "https://github.com/{repo}/releases/download/knative-v{version}/{asset}"
RELEASE_REPOS = {
    "serving": "knative/serving",
    "net_kourier": "knative-extensions/net-kourier",
    "net_istio": "knative-extensions/net-istio",
    "eventing": "knative/eventing",
    "eventing_redis": "knative-extensions/eventing-redis",
}
# net-istio's Istio for kind (no sidecar mesh, small requests) is not a release
# asset; it lives in the repository at the release tag.
ISTIO_KIND_NO_MESH = (
    "https://raw.githubusercontent.com/knative-extensions/net-istio/knative-v{version}"
    "/third_party/istio-latest/istio-kind-no-mesh/istio.yaml"
)
KIND_BINARY = "https://github.com/kubernetes-sigs/kind/releases/download/{version}/kind-{os}-{arch}"
KUBECTL_BINARY = "https://dl.k8s.io/release/{version}/bin/{os}/{arch}/kubectl"


class VersionsError(ValueError):
    """An override names a version the run cannot use."""


def _pin(env: str, default: str, help: str):
    return dataclasses.field(default=default, metadata={"env": env, "help": help})


@dataclasses.dataclass(frozen=True)
class Versions:
    kind: str = _pin("KIND_VERSION", "v0.30.0", "kind binary (downloaded when kind on PATH is older)")
    node_image: str = _pin(
        "KIND_NODE_IMAGE",
        "kindest/node:v1.34.0@sha256:7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a",
        "kind node image (Kubernetes >= 1.34)",
    )
    kubectl: str = _pin("KUBECTL_VERSION", "v1.34.0", "kubectl (downloaded when none is on PATH)")
    serving: str = _pin("KNATIVE_SERVING_VERSION", "1.22.1", "Knative Serving")
    net_kourier: str = _pin("NET_KOURIER_VERSION", "1.22.1", "net-kourier")
    net_istio: str = _pin("NET_ISTIO_VERSION", "1.22.0", "net-istio and its Istio for kind")
    eventing: str = _pin("KNATIVE_EVENTING_VERSION", "1.22.2", "Knative Eventing")
    eventing_redis: str = _pin("EVENTING_REDIS_VERSION", "1.22.1", "eventing-redis (RedisStreamSource)")
    kubernetes: str = _pin("KUBERNETES_VERSION", "v1.34.4",
                           "kube-apiserver and kube-controller-manager built for the kube backend (>= 1.34)")
    etcd: str = _pin("ETCD_VERSION", "v3.6.4", "etcd built for the kube backend (Kubernetes 1.34's own)")

    def go_module_version(self, release: str) -> str:
        """The Go module version of a Knative release: ``go_module_version("serving")`` is v0.49.1 for 1.22.1."""
        major, minor, patch = _semver(getattr(self, release))
        if major != 1:
            raise VersionsError(f"{release} {getattr(self, release)}: only Knative 1.x maps onto Go module versions")
        return f"v0.{minor + KNATIVE_GO_MINOR_OFFSET}.{patch}"

    def release_url(self, release: str, asset: str) -> str:
        """URL of a Knative release asset, e.g. ``release_url("serving", "serving-core.yaml")``."""
        return GITHUB_RELEASE.format(repo=RELEASE_REPOS[release], version=getattr(self, release), asset=asset)

    def istio_kind_url(self) -> str:
        return ISTIO_KIND_NO_MESH.format(version=self.net_istio)

    def kind_url(self, os_name: str, arch: str) -> str:
        return KIND_BINARY.format(version=self.kind, os=os_name, arch=arch)

    def kubectl_url(self, os_name: str, arch: str) -> str:
        return KUBECTL_BINARY.format(version=self.kubectl, os=os_name, arch=arch)

    @property
    def kubernetes_minor(self) -> int | None:
        match = re.search(r":v1\.(\d+)\.", self.node_image)
        return int(match.group(1)) if match else None


def env_names() -> dict[str, str]:
    """Versions field -> the environment variable that overrides it."""
    return {field.name: field.metadata["env"] for field in dataclasses.fields(Versions)}


def _semver(raw: str) -> tuple[int, int, int] | None:
    match = re.fullmatch(r"(?:knative-)?v?(\d+)\.(\d+)\.(\d+)", raw.strip())
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def parse_tool_version(text: str) -> tuple[int, int, int] | None:
    """The first vX.Y.Z in a tool's version output ("kind v0.30.0 go1.24.6 linux/amd64")."""
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def load(environ: Mapping[str, str] | None = None) -> Versions:
    """The pinned versions, each replaced by its environment variable when set.

    Release versions may be written 1.22.1, v1.22.1 or knative-v1.22.1.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for field in dataclasses.fields(Versions):
        env = field.metadata["env"]
        raw = environ.get(env, "").strip()
        if not raw:
            continue
        if field.name == "node_image":
            values[field.name] = raw
            continue
        version = _semver(raw)
        if version is None:
            raise VersionsError(f"{env}={raw!r} is not a version like 1.22.1")
        text = ".".join(map(str, version))
        values[field.name] = f"v{text}" if field.name in ("kind", "kubectl", "kubernetes", "etcd") else text
    versions = Versions(**values)
    if _semver(versions.kind) < MIN_KIND:
        raise VersionsError(
            f"KIND_VERSION={versions.kind} is too old: Knative needs Kubernetes >= 1.{MIN_KUBERNETES_MINOR}, "
            f"whose node images need kind >= v{'.'.join(map(str, MIN_KIND))}"
        )
    built_minor = _semver(versions.kubernetes)[1]
    if built_minor < MIN_KUBERNETES_MINOR:
        raise VersionsError(
            f"KUBERNETES_VERSION={versions.kubernetes} is too old: Knative needs >= 1.{MIN_KUBERNETES_MINOR}"
        )
    minor = versions.kubernetes_minor
    if minor is not None and minor < MIN_KUBERNETES_MINOR:
        raise VersionsError(
            f"KIND_NODE_IMAGE={versions.node_image} is Kubernetes 1.{minor}; Knative needs >= 1.{MIN_KUBERNETES_MINOR}"
        )
    return versions
