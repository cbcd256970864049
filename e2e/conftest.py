"""The backend fixture: the scenarios run unchanged on the local stack or on kind.

``pytest e2e`` runs them on the local stack twice: on one redis-server
(``local``) and on a 3-master Redis Cluster (``local-cluster``);
``--backend local`` or ``--backend local-cluster`` picks one.
``--backend kourier`` or ``--backend istio`` create a kind cluster with that
network layer (see e2e/kind/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kind import hooks as kind_hooks  # noqa: E402

LOCAL = ("local", "local-cluster")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend", choices=("local", "local-cluster", "kourier", "istio"), default=None,
        help="where the e2e scenarios run: the local stack on one redis-server (local) or on a 3-master Redis"
             " Cluster (local-cluster), or a kind cluster with Kourier or Istio (default: local and local-cluster)",
    )
    kind_hooks.addoption(parser)


def pytest_configure(config: pytest.Config) -> None:
    kind_hooks.print_plan_and_exit(config)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Kind-only scenarios are not collected on the local stack (not skipped: absent)."""
    if collection_path.name == "test_kind_only.py" and config.getoption("--backend") in (None, *LOCAL):
        return True
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every scenario once per local backend; on kind, once."""
    if "backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backend")
        names = LOCAL if chosen is None else (chosen,)
        metafunc.parametrize("backend", names, indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest):
    name = request.param
    if name in LOCAL:
        from backend_local import local_backend

        with local_backend(redis_cluster=3 if name == "local-cluster" else 0) as backend:
            yield backend
    else:
        with kind_hooks.kind_backend(request.config, name) as backend:
            yield backend
