"""What e2e/conftest.py calls: options, the plan printer, the early Docker check, the backend.

``pytest e2e --e2e-plan kourier`` prints the plan and exits 0 without running
anything. ``pytest e2e --backend kourier`` refuses at once, in one line, when no
Docker engine answers; otherwise the ``backend`` fixture builds the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import cluster, manifests, plan, versions
from .backend import KindBackend, stream_names
from .portforward import PortForwardError
from .tools import DockerUnavailable, require_docker

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_NO_DOCKER = 2
EXIT_SETUP_FAILED = 3


def _known_options(parser: pytest.Parser) -> set[str]:
    return {name for group in getattr(parser, "_groups", []) for option in group.options for name in option.names()}


def addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kind", "kind clusters for the e2e scenarios (--backend kourier|istio)")
    group.addoption("--e2e-plan", choices=plan.LAYERS, metavar="LAYER", default=None,
                    help="print the steps that set up a kind cluster for LAYER (kourier or istio) and exit")
    group.addoption("--kind-cluster-name", default=None, metavar="NAME",
                    help="kind cluster to create or reuse (default: async-component-<layer>)")
    # pytest-kind registers --keep-cluster with the same meaning when it is installed.
    if "--keep-cluster" not in _known_options(parser):
        with contextlib.suppress(ValueError, argparse.ArgumentError):
            group.addoption("--keep-cluster", action="store_true", dest="keep_cluster",
                            help="keep the kind cluster after the run (reused by the next run with the same name)")


def _write(config: pytest.Config) -> Callable[[str], None]:
    """Progress lines on the terminal even while pytest captures output."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(line, file=sys.stdout, flush=True)

    return write


def print_plan_and_exit(config: pytest.Config) -> None:
    """From pytest_configure: print the plan for --e2e-plan and exit 0; refuse a kind backend without Docker.

    Both happen before collection, so neither runs or skips a test.
    """
    layer = config.getoption("--e2e-plan", default=None)
    if layer:
        try:
            steps = plan.build_plan(layer, versions.load(), REPO_ROOT)
        except (ValueError, OSError) as exc:
            pytest.exit(f"cannot build the kind plan: {exc}", returncode=EXIT_SETUP_FAILED)
        _write(config)(plan.format_plan(layer, steps))
        pytest.exit("printed the kind plan; nothing was run", returncode=0)
    just_looking = config.getoption("collectonly") or config.getoption("help")
    if config.getoption("--backend", default="local") in plan.LAYERS and not just_looking:
        try:
            require_docker()
        except DockerUnavailable as exc:
            pytest.exit(str(exc), returncode=EXIT_NO_DOCKER)


@contextlib.contextmanager
def kind_backend(config: pytest.Config, layer: str) -> Iterator[KindBackend]:
    """The session's cluster for ``layer`` and the backend on it; ends the session on a set-up failure."""
    write = _write(config)
    try:
        pinned = versions.load()
        name = config.getoption("--kind-cluster-name") or f"async-component-{layer}"
        keep = bool(config.getoption("keep_cluster", default=False))
        with cluster.kind_cluster(layer, name=name, keep=keep, repo_root=REPO_ROOT, versions=pinned,
                                  write=write) as running:
            docs = manifests.kustomize(REPO_ROOT / plan.overlay(layer), running.kubectl.run)
            with KindBackend(running, stream_names(docs)) as backend:
                write(f"[kind] ready: gateway {backend.gateway_url}, producer {backend.producer_url}, "
                      f"consumer {backend.consumer_url}, redis {backend.redis_url}")
                yield backend
    except DockerUnavailable as exc:
        pytest.exit(str(exc), returncode=EXIT_NO_DOCKER)
    except (cluster.SetupFailed, cluster.KubectlError, versions.VersionsError, plan.PlanError,
            PortForwardError) as exc:
        pytest.exit(str(exc), returncode=EXIT_SETUP_FAILED)
