"""Build kube-apiserver, kube-controller-manager and etcd from the Go module proxy, once per version.

``go install k8s.io/kubernetes/cmd/kube-apiserver@v1.34.x`` is refused: that
module replaces its staging modules (k8s.io/api, k8s.io/client-go, ...) with
directories inside itself. A wrapper module written here, in the cache,
requires k8s.io/kubernetes and replaces each staging module with its published
k8s.io/<name> v0.34.x instead. etcd's server module is built the same way (in a
dependency its own replace directives are ignored, and the published versions
it requires are the ones they point at). Nothing of either lands in the
checkout.

Run ``python e2e/kube/build.py`` to build or reuse; it prints one line per step
with its duration, and the binaries' directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make e2e/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kind.versions import Versions, load  # noqa: E402
from kube import gomodules  # noqa: E402

KUBERNETES_MODULE = "k8s.io/kubernetes"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager")
STAGING = re.compile(r"^\s*(k8s\.io/[A-Za-z0-9._-]+)\s+=>\s+\./staging/src/\1\s*$", re.M)


def cache_dir() -> Path:
    """Where built binaries live, outside any checkout (ASYNC_COMPONENT_CACHE overrides ~/.cache/async-component)."""
    root = os.environ.get("ASYNC_COMPONENT_CACHE") or "~/.cache/async-component"
    return Path(root).expanduser() / "kube"


@dataclasses.dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """The modules k8s.io/kubernetes's go.mod replaces with its own staging directories."""
    return STAGING.findall(kubernetes_go_mod)


def staging_version(kubernetes_version: str) -> str:
    """Each staging module is published as v0.<minor>.<patch> with Kubernetes v1.<minor>.<patch>."""
    match = re.fullmatch(r"v1\.(\d+)\.(\d+)", kubernetes_version)
    if match is None:
        raise ValueError(f"Kubernetes version {kubernetes_version!r} is not like v1.34.4")
    return f"v0.{match[1]}.{match[2]}"


def kubernetes_wrapper(kubernetes_version: str, kubernetes_go_mod: str) -> str:
    """go.mod of the wrapper module that builds Kubernetes' commands from published modules."""
    published = staging_version(kubernetes_version)
    modules = staging_modules(kubernetes_go_mod)
    if not modules:
        raise ValueError(f"{KUBERNETES_MODULE} {kubernetes_version}: its go.mod replaces no staging module")
    lines = ["module async-component.invalid/kubebuild", "", "go 1.24.0", "",
             f"require {KUBERNETES_MODULE} {kubernetes_version}", "", "replace ("]
    lines += [f"\t{module} => {module} {published}" for module in modules]
    lines += [")", ""]
    return "\n".join(lines)


def etcd_wrapper(etcd_version: str) -> str:
    return f"module async-component.invalid/etcdbuild\n\ngo 1.23.0\n\nrequire {ETCD_MODULE} {etcd_version}\n"


def version_ldflags(kubernetes_version: str) -> str:
    """What Kubernetes' own build stamps in, so /version and kubectl see v1.34.x (not v0.0.0-master)."""
    major, minor = kubernetes_version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.gitVersion={kubernetes_version}", f"-X {package}.gitMajor={major}",
                  f"-X {package}.gitMinor={minor}", f"-X {package}.gitTreeState=clean"]
    return " ".join(flags)


class Progress:
    """One line when a step starts and one with its duration when it ends."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.out(f"kube build: {what} ...")
        started = time.monotonic()
        yield
        self.out(f"kube build: {what}: done in {time.monotonic() - started:.1f}s")


def _write_module(src: Path, go_mod: str, package: str) -> None:
    src.mkdir(parents=True, exist_ok=True)
    if not (src / "go.mod").exists() or (src / "go.mod").read_text() != go_mod:
        (src / "go.mod").write_text(go_mod)
    (src / "wrapper.go").write_text(f"// Package {package} only anchors the build; it is never imported.\npackage {package}\n")


def _go_build(src: Path, bin_dir: Path, names: dict[str, str], ldflags: str) -> None:
    """Build packages (output name -> import path) into bin_dir; a binary appears only once complete."""
    partial = bin_dir.with_name(bin_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if len(names) == 1:
        (name, package), = names.items()
        gomodules.run_go("build", "-trimpath", "-ldflags", ldflags, "-o", str(partial / name), package, cwd=src, nice=True)
    else:  # go build names each binary after its package's directory
        gomodules.run_go("build", "-trimpath", "-ldflags", ldflags, "-o", str(partial) + "/", *names.values(),
                         cwd=src, nice=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(partial / name, bin_dir / name)
    shutil.rmtree(partial, ignore_errors=True)


def ensure(versions: Versions | None = None, *, out: Callable[[str], None] = print) -> Binaries:
    """The binaries for ``versions``, built on first use and reused from the cache after."""
    versions = versions or load()
    progress = Progress(out)
    kube_dir = cache_dir() / versions.kubernetes
    etcd_dir = cache_dir() / f"etcd-{versions.etcd}"
    binaries = Binaries(etcd=etcd_dir / "bin" / "etcd",
                        kube_apiserver=kube_dir / "bin" / "kube-apiserver",
                        kube_controller_manager=kube_dir / "bin" / "kube-controller-manager")

    if all((kube_dir / "bin" / name).exists() for name in KUBE_COMMANDS):
        out(f"kube build: kube-apiserver, kube-controller-manager {versions.kubernetes}: cached in {kube_dir / 'bin'}")
    else:
        with progress.step(f"download {KUBERNETES_MODULE} {versions.kubernetes}"):
            info = gomodules.download(KUBERNETES_MODULE, versions.kubernetes)
        with progress.step("write the wrapper module (staging modules -> published ones)"):
            wrapper = kubernetes_wrapper(versions.kubernetes, Path(info["GoMod"]).read_text())
            _write_module(kube_dir / "src", wrapper, "kubebuild")
        with progress.step(f"go build {', '.join(KUBE_COMMANDS)} {versions.kubernetes} "
                           "(a first build: about 10 min on 2 cores)"):
            _go_build(kube_dir / "src", kube_dir / "bin",
                      {name: f"{KUBERNETES_MODULE}/cmd/{name}" for name in KUBE_COMMANDS},
                      version_ldflags(versions.kubernetes))

    if binaries.etcd.exists():
        out(f"kube build: etcd {versions.etcd}: cached in {binaries.etcd.parent}")
    else:
        with progress.step(f"go build etcd {versions.etcd}"):
            _write_module(etcd_dir / "src", etcd_wrapper(versions.etcd), "etcdbuild")
            _go_build(etcd_dir / "src", etcd_dir / "bin", {"etcd": ETCD_MODULE}, "-s -w")
    return binaries


def cached(versions: Versions | None = None) -> Binaries | None:
    """The binaries when all are already built, else None (never builds)."""
    versions = versions or load()
    kube_bin = cache_dir() / versions.kubernetes / "bin"
    binaries = Binaries(etcd=cache_dir() / f"etcd-{versions.etcd}" / "bin" / "etcd",
                        kube_apiserver=kube_bin / "kube-apiserver",
                        kube_controller_manager=kube_bin / "kube-controller-manager")
    return binaries if all(path.exists() for path in dataclasses.astuple(binaries)) else None


def main() -> int:
    started = time.monotonic()
    try:
        binaries = ensure()
    except (gomodules.GoError, ValueError) as exc:
        print(f"kube build: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"kube build: binaries ready in {time.monotonic() - started:.1f}s: "
          f"{binaries.kube_apiserver.parent}, {binaries.etcd.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
