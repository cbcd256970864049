"""Two controller replicas against one emulator: only the Lease holder reconciles; the other takes over.

The Lease is short here (LEASE_DURATION 3 s, renewed every 0.5 s) so a
takeover after a crash fits in a test; the manifests keep the defaults.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import kopf
import pytest

from async_component.controller.kubeapi import KubeApi
from async_component.controller.leader import LEASES, holder

from .controller_process import Operator, start_operator
from .kube_emulator import EmulatorThread
from .test_controller import INGRESSES, children, kingress

LEASE = {"LEASE_DURATION": "3", "LEASE_RENEW_PERIOD": "0.5"}
NAMESPACE, LEASE_NAME = "knative-system", "async-controller"


@pytest.fixture
def cluster():
    with EmulatorThread() as emulator:
        yield emulator


@pytest.fixture
async def api(cluster: EmulatorThread):
    client = KubeApi(kopf.ConnectionInfo(server=cluster.url))
    yield client
    await client.close()


@pytest.fixture
def replicas(cluster: EmulatorThread, tmp_path):
    started: list[Operator] = []

    def start(name: str) -> Operator:
        operator = start_operator(cluster.url, tmp_path / name, name, POD_NAME=name, **LEASE)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        if operator.process.poll() is None:
            operator.stop()


async def until(check: Callable[[], Awaitable[bool]], what: str, logs: list[Operator], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {o.log_path.name} ---\n{o.log_tail()}" for o in logs)
            raise AssertionError(f"timed out waiting until {what}\n{tails}")
        await asyncio.sleep(0.1)


async def lease_holder(api: KubeApi) -> str:
    return holder(await api.get(LEASES, NAMESPACE, LEASE_NAME))


async def reconciled(api: KubeApi, namespace: str, name: str) -> bool:
    child, service = await children(api, namespace, name)
    return child is not None and service is not None


@pytest.mark.slow
async def test_only_the_lease_holder_reconciles_and_a_standby_takes_over(api, replicas):
    first = replicas("replica-a")
    await until(lambda: _equals(lease_holder(api), "replica-a"), "replica-a holds the Lease", [first])
    second = replicas("replica-b")  # its liveness probe answers while it stands by
    assert second.health() == {"state": "standby", "identity": "replica-b"}
    assert first.health() == {"state": "leading", "identity": "replica-a"}

    await api.create(INGRESSES, kingress("one", "ha"))
    await until(lambda: reconciled(api, "ha", "one"), "the leader made the children", [first, second])
    await asyncio.sleep(1.5)  # three renewals: the standby must still be standing by
    assert "created Ingress ha/one-new" in first.log_text()
    assert "created" not in second.log_text() and "watching Ingresses" not in second.log_text()
    assert "standing by: Lease knative-system/async-controller is held by replica-a" in second.log_text()
    assert await lease_holder(api) == "replica-a"

    # A graceful stop (SIGTERM, as on a rollout) hands the Lease over at once. Before, kopf held the exit 5 s
    # (its waiter on the operator's stop flag, never raised by a signal, looked like a hung task to it).
    stopping = time.monotonic()
    first.stop()
    assert time.monotonic() - stopping < 3, first.log_tail()
    assert first.process.returncode == 0, first.log_tail()
    assert "released Lease knative-system/async-controller" in first.log_text()
    await until(lambda: _equals(lease_holder(api), "replica-b"), "replica-b took over", [first, second], timeout=5)
    await api.create(INGRESSES, kingress("two", "ha"))
    await until(lambda: reconciled(api, "ha", "two"), "the new leader reconciled", [second])
    assert "created Ingress ha/two-new" in second.log_text()


@pytest.mark.slow
async def test_a_crashed_leader_is_replaced_once_its_lease_expires(api, replicas):
    first = replicas("replica-a")
    await until(lambda: _equals(lease_holder(api), "replica-a"), "replica-a holds the Lease", [first])
    second = replicas("replica-b")
    os.kill(first.process.pid, signal.SIGKILL)  # no release: the Lease must expire
    first.process.wait(10)
    killed_at = time.monotonic()
    await until(lambda: _equals(lease_holder(api), "replica-b"), "replica-b took over", [second], timeout=15)
    assert time.monotonic() - killed_at >= 2.0, "took over before the Lease could have expired"
    await api.create(INGRESSES, kingress("three", "crash"))
    await until(lambda: reconciled(api, "crash", "three"), "the new leader reconciled", [second])


async def _equals(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


async def test_the_controller_needs_no_passwd_entry(api, replicas, tmp_path, monkeypatch):
    """OpenShift runs the image with a UID of the namespace's range, which has no passwd entry."""
    hooks = tmp_path / "no-passwd"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import getpass, pwd\n"
        "def _unknown(*args, **kwargs):\n"
        "    raise KeyError('getpwuid(): uid not found: 1000650000')\n"
        "pwd.getpwuid = _unknown\n"
        "getpass.getuser = _unknown\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("LOGNAME", raising=False)
    operator = replicas("replica-a")
    await api.create(INGRESSES, kingress("four", "uid"))
    await until(lambda: reconciled(api, "uid", "four"), "it reconciled", [operator])
