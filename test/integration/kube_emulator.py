"""kmock's Kubernetes emulator, with the server-set fields a controller relies on.

kmock 0.8 stores objects as they were sent. A real API server also sets
``uid``, ``resourceVersion``, ``generation`` (bumped when the spec changes),
``creationTimestamp`` and the namespace from the URL, names objects sent with
``generateName``, ignores ``status`` outside the status subresource, and
refuses a write whose ``resourceVersion`` is stale. This subclass adds that,
and :class:`EmulatorThread` serves it from its own thread and event loop so a
test's loop and the operator never share one.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import uuid
from http import HTTPStatus
from collections.abc import Mapping
from typing import Any

import kmock

INGRESS_RESOURCE = "networking.internal.knative.dev/v1alpha1/ingresses"
LEASE_RESOURCE = "coordination.k8s.io/v1/leases"

WRITE_ACTIONS = (kmock.action.CREATE, kmock.action.UPDATE)
RECENT_REQUESTS = 32


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus uid, resourceVersion, generation and subresource rules."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self._writes = asyncio.Lock()
        self._failures: list[tuple[kmock.action, str, str, int]] = []
        for plural, kind in (("namespaces", "Namespace"), ("services", "Service"), ("events", "Event")):
            self.resources[f"v1/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=plural != "namespaces",
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                subresources={"status"} if plural != "events" else set(),
            )
        self.resources[LEASE_RESOURCE] = kmock.ResourceInfo(
            kind="Lease", namespaced=True, verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        )
        self.resources[INGRESS_RESOURCE] = kmock.ResourceInfo(
            kind="Ingress", singular="ingress", namespaced=True, shortnames={"kingress", "king"},
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"}, subresources={"status"},
        )

    def fail_next(self, action: kmock.action, plural: str, namespace: str, times: int = 1, status: int = 500) -> None:
        """Answer the next ``times`` such requests with ``status`` (callable from any thread).

        ``plural`` names a subresource as ``ingresses/status``.
        """
        self._failures.extend([(action, plural, namespace, status)] * times)

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock keeps every request and matches each new one against all of them:
        # a long test module would slow down quadratically. Recent ones are enough.
        del self._requests[:-RECENT_REQUESTS]
        plural = request.resource and request.resource.plural
        if plural and request.subresource:
            plural = f"{plural}/{request.subresource}"
        wanted = (request.action, plural, request.namespace)
        failure = next((f for f in self._failures if f[:3] == wanted), None)
        if failure is not None:
            self._failures.remove(failure)
            status = failure[3]
            raise kmock.KubernetesError(status=status, reason=HTTPStatus(status).phrase.replace(" ", ""),
                                        message="injected by the test")
        if request.resource is None or request.action not in WRITE_ACTIONS or not isinstance(request.data, Mapping):
            return await super()._handle(request)
        async with self._writes:  # the emulator's own lock is taken inside; serialise around it
            data = self._server_side(request)
            request.data.clear()  # kmock finds its requests by identity: edit, do not replace
            request.data.update(data)
            return await super()._handle(request)

    def _current(self, request: kmock.Request) -> Mapping[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _has_status(self, request: kmock.Request) -> bool:
        return request.resource in self.resources and "status" in self.resources[request.resource].subresources

    def _server_side(self, request: kmock.Request) -> dict[str, Any]:
        data = copy.deepcopy(dict(request.data))
        meta = data.setdefault("metadata", {})
        if request.subresource == "status":
            data = {"metadata": meta, "status": data.get("status")}
        elif self._has_status(request):
            data.pop("status", None)
        if request.action == kmock.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace:
                meta["namespace"] = request.namespace
            meta.update(uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        else:
            current = self._current(request)
            if current is None:
                return data  # the emulator answers 404
            current_meta = current.get("metadata") or {}
            sent_version = meta.get("resourceVersion")
            if sent_version is not None and sent_version != current_meta.get("resourceVersion"):
                raise kmock.KubernetesError(status=409, reason="Conflict",
                                           message="the object has been modified; apply your changes to the latest version")
            for key in ("uid", "namespace", "name", "creationTimestamp"):
                meta.pop(key, None)
            generation = current_meta.get("generation", 1)
            if "spec" in data and _merged(current.get("spec"), data["spec"]) != current.get("spec"):
                generation += 1
            meta["generation"] = generation
        meta["resourceVersion"] = str(next(self._versions))
        return data


def _merged(current: Any, patch: Any) -> Any:
    """RFC 7386 merge, to tell whether a patch changes the spec."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(current) if isinstance(current, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merged(result.get(key), value)
    return result


class EmulatorThread:
    """Serves an :class:`Emulator` on 127.0.0.1 from a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kube-emulator", daemon=True)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Future[None] | None = None
        self.url = ""
        self.emulator: Emulator | None = None

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        started = threading.Event()

        async def serve() -> None:
            self._stop = asyncio.Event()
            async with Emulator() as emulator, kmock.Server(emulator) as server:
                self.emulator, self.url = emulator, str(server.url).rstrip("/")
                started.set()
                await self._stop.wait()

        self._task = asyncio.run_coroutine_threadsafe(serve(), self.loop)
        if not started.wait(10):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None and self._task is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._task.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
