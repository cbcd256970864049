"""What only a real control plane shows the controller (``--kube``): ownerReference
garbage collection, and an API server killed and restarted under it.

The operator here starts and stops per test, as the API server it talks to
is taken away or the operator itself is stopped.
"""

from __future__ import annotations

import asyncio

import pytest

from async_component.controller.kubeapi import INGRESSES, SERVICES, KubeApi

from .controller_backends import KubeCluster
from .controller_process import start_operator
from .test_controller import (  # noqa: F401  (fixtures used by name)
    SYSTEM_NAMESPACE,
    api,
    children,
    eventually,
    kingress,
    namespace,
    wait_for_children,
)


@pytest.fixture(scope="module")
def cluster(kube) -> KubeCluster:
    return KubeCluster(kube)


@pytest.fixture
def operator(cluster: KubeCluster, tmp_path):
    operator = start_operator(cluster.url, tmp_path, kubeconfig=cluster.operator_kubeconfig(tmp_path / "kubeconfig"),
                              SYSTEM_NAMESPACE=SYSTEM_NAMESPACE)
    yield operator
    operator.stop()


async def test_children_are_garbage_collected_while_the_controller_is_stopped(api, eventually, namespace, operator):
    await api.create(INGRESSES, kingress("hello", namespace))
    await wait_for_children(api, eventually, namespace, "hello")
    operator.stop()

    assert await api.delete(INGRESSES, namespace, "hello")

    async def collected() -> None:
        assert await children(api, namespace, "hello") == (None, None)

    await eventually(collected, timeout=60)  # kube-controller-manager's garbage collector: the controller is stopped


async def test_api_server_killed_and_restarted(api, eventually, namespace, operator, cluster):
    await api.create(INGRESSES, kingress("before", namespace))
    await wait_for_children(api, eventually, namespace, "before")
    pid = operator.process.pid

    cluster.control_plane.kill_apiserver()
    await asyncio.sleep(3)  # the operator's watches and requests fail meanwhile
    await asyncio.to_thread(cluster.control_plane.start_apiserver)

    # changes the operator has not seen: a new parent, and a child gone
    fresh = KubeApi(cluster.admin_info())  # the fixture's client holds connections to the killed process
    try:
        await fresh.create(INGRESSES, kingress("after", namespace))
        assert await fresh.delete(SERVICES, namespace, "before-async")
        await wait_for_children(fresh, eventually, namespace, "after")
        await wait_for_children(fresh, eventually, namespace, "before")
    finally:
        await fresh.close()
    assert operator.process.poll() is None and operator.process.pid == pid, "the operator restarted"
