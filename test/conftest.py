"""Fixtures shared by unit and integration tests: a real redis-server per test, and with
``--kube`` a real Kubernetes control plane for the session (see e2e/kube/)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from async_component.local.rediscluster import RedisCluster
from async_component.local.redisserver import RedisServer

E2E = Path(__file__).resolve().parents[1] / "e2e"
KUBE_ONLY = {"test_controller_kube.py", "test_manifests_kube.py"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kube", action="store_true", default=False,
        help="also run the controller tests on a real kube-apiserver, etcd and kube-controller-manager "
             "(built from the Go module proxy on first use, see e2e/kube/), and the tests only they can run",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Tests that need the real control plane are not collected without --kube (not skipped: absent)."""
    if collection_path.name in KUBE_ONLY and not config.getoption("--kube"):
        return True
    return None


@dataclasses.dataclass
class KubeSession:
    control_plane: Any  # kube.controlplane.ControlPlane
    faults: Any  # kube.faults.FaultWebhook
    versions: Any  # kind.versions.Versions


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """etcd, kube-apiserver and kube-controller-manager on loopback, with Knative Serving's CRDs,
    the knative-serving namespace and the controller's RBAC from the manifests."""
    if not request.config.getoption("--kube"):
        pytest.fail("the kube fixture needs --kube")
    if str(E2E) not in sys.path:
        sys.path.insert(0, str(E2E))
    from kind.versions import load
    from kube import build, install
    from kube.controlplane import ControlPlane
    from kube.faults import FaultWebhook

    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    out = reporter.write_line if reporter is not None else print
    versions = load()
    binaries = build.ensure(versions, out=out)
    crds = install.crds_for(versions)
    with ControlPlane(binaries, tmp_path_factory.mktemp("kube"), crds=crds, out=out) as control_plane:
        install.prepare(control_plane)
        with FaultWebhook(control_plane) as faults:
            yield KubeSession(control_plane, faults, versions)


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_cluster():
    """Three redis-server masters in cluster mode, no replicas, slots split evenly."""
    with RedisCluster(3) as cluster:
        yield cluster


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http():
    """A client session that hands back bodies exactly as sent (no decompression)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
