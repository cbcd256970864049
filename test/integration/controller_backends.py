"""Where the controller tests run: kmock's emulator, or a real API server (``--kube``).

Both give the tests the same handful of things: an admin connection, a
kubeconfig for the controller, a namespace ready for objects, the Events in a
namespace, and an injected error on the controller's next write. On the real
API server the controller logs in as the async-controller ServiceAccount from
the manifests, so its ClusterRole is enforced.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import kmock
import kopf

from .controller_process import emulator_kubeconfig
from .kube_emulator import EmulatorThread

KMOCK_ACTIONS = {"create": kmock.action.CREATE, "update": kmock.action.UPDATE}


class KmockCluster:
    name = "kmock"

    def __init__(self, emulator: EmulatorThread) -> None:
        self.emulator = emulator
        self.url = emulator.url

    def admin_info(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=self.url)

    def operator_kubeconfig(self, path: Path) -> Path:
        return emulator_kubeconfig(self.url, path)

    def prepare_namespace(self, namespace: str) -> None:
        """The emulator takes objects in any namespace."""

    async def list_events(self, namespace: str) -> list[dict[str, Any]]:
        def fetch() -> list[dict[str, Any]]:
            with urllib.request.urlopen(f"{self.url}/api/v1/namespaces/{namespace}/events", timeout=10) as resp:
                return json.loads(resp.read())["items"]

        return await asyncio.to_thread(fetch)

    def fail_next(self, operation: str, resource: str, namespace: str, *, status: int = 500) -> None:
        """The next ``operation`` (create, update) of ``resource`` in ``namespace`` is answered with ``status``."""
        assert self.emulator.emulator is not None
        self.emulator.emulator.fail_next(KMOCK_ACTIONS[operation], resource, namespace, status=status)


class KubeCluster:
    """The session's control plane (see test/conftest.py) with its fault webhook."""

    name = "kube"

    def __init__(self, session: Any) -> None:
        from kube import install

        self.control_plane = session.control_plane
        self.faults = session.faults
        self.install = install
        self.url = self.control_plane.url

    def admin_info(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=self.url, ca_path=str(self.control_plane.ca_file),
                                   scheme="Bearer", token=self.control_plane.admin_token)

    def operator_kubeconfig(self, path: Path) -> Path:
        return self.install.controller_kubeconfig(self.control_plane, path)

    def prepare_namespace(self, namespace: str) -> None:
        self.control_plane.ensure_namespace(namespace)

    async def list_events(self, namespace: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{namespace}/events"
        return (await asyncio.to_thread(self.control_plane.request, "GET", path))["items"]

    def fail_next(self, operation: str, resource: str, namespace: str, *, status: int = 500) -> None:
        """Refused by the admission webhook, for the controller's own writes only."""
        self.faults.fail_next(operation, resource, namespace, status=status, user=self.install.CONTROLLER_USER)
