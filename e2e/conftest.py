"""The backend fixture: the scenarios run unchanged on the local stack or on kind.

``pytest e2e`` uses the local stack; ``--backend kourier`` or ``--backend istio``
create a kind cluster with that network layer (see e2e/kind/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kind import hooks as kind_hooks  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend", choices=("local", "kourier", "istio"), default="local",
        help="where the e2e scenarios run: the local stack, or a kind cluster with Kourier or Istio",
    )
    kind_hooks.addoption(parser)


def pytest_configure(config: pytest.Config) -> None:
    kind_hooks.print_plan_and_exit(config)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Kind-only scenarios are not collected on the local stack (not skipped: absent)."""
    if collection_path.name == "test_kind_only.py" and config.getoption("--backend") == "local":
        return True
    return None


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest):
    name = request.config.getoption("--backend")
    if name == "local":
        from backend_local import local_backend

        with local_backend() as backend:
            yield backend
    else:
        with kind_hooks.kind_backend(request.config, name) as backend:
            yield backend
