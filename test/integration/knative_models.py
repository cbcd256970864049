"""What Knative's network layer and Serving do with an Ingress whose class switches, as test doubles.

Each model follows one namespace's Ingresses through the API's watch, so it
sees every event in order, the last state of a deleted object included, as an
informer does.

:class:`NetworkLayer` is Kourier as far as a class switch goes (Knative's
generated Ingress reconciler plus Kourier's cache): it acts only on events of
its own class (an Ingress that leaves the class is skipped, and its
translation kept), puts its finalizer on an Ingress it translates and drops it
when that Ingress is deleting, forgets a translation only when it sees the
Ingress deleted while of its class, refuses an Ingress whose hosts another
translated Ingress already has (until that one goes), and marks what it
translated Ready.

:class:`Serving` is the Route reconciler for one Route: it re-creates the
Ingress when it is gone and puts back the class it wants when someone else
changed it, until the Route is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kopf

from async_component.controller import resources as r
from async_component.controller.kubeapi import INGRESSES, ApiError, KubeApi


async def watch_ingresses(info: kopf.ConnectionInfo, namespace: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    path = INGRESSES.path(namespace)
    connector = aiohttp.TCPConnector(ssl=info.as_ssl_context())
    async with aiohttp.ClientSession(connector=connector, headers=info.as_http_headers(),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session, \
            session.get(info.server.rstrip("/") + path, params={"watch": "true"}) as resp:
        async for line in resp.content:
            if line.strip():
                event = json.loads(line)
                yield event["type"], event["object"]


def class_of(ingress: dict[str, Any]) -> str | None:
    return ((ingress.get("metadata") or {}).get("annotations") or {}).get(r.INGRESS_CLASS_ANNOTATION)


def hosts_of(ingress: dict[str, Any]) -> set[str]:
    return {host for rule in (ingress.get("spec") or {}).get("rules") or [] for host in rule.get("hosts") or []}


class _Model:
    def __init__(self, api: KubeApi, info: kopf.ConnectionInfo, namespace: str) -> None:
        self.api, self.info, self.namespace = api, info, namespace
        self._task: asyncio.Task[None] | None = None
        self.errors: list[str] = []

    async def handle(self, type_: str, ingress: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        async for type_, ingress in watch_ingresses(self.info, self.namespace):
            try:
                await self.handle(type_, ingress)
            except ApiError as exc:  # a stale read: the next event brings a fresh one
                self.errors.append(str(exc))

    async def __aenter__(self) -> _Model:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class NetworkLayer(_Model):
    def __init__(self, api: KubeApi, info: kopf.ConnectionInfo, namespace: str, ingress_class: str) -> None:
        super().__init__(api, info, namespace)
        self.ingress_class = ingress_class
        self.translated: dict[str, set[str]] = {}
        """Ingress name -> the hosts the layer serves for it."""
        self.conflicts: set[str] = set()

    async def handle(self, type_: str, ingress: dict[str, Any]) -> None:
        if class_of(ingress) != self.ingress_class:
            return  # the informer's class filter; a translation made earlier stays
        meta = ingress["metadata"]
        name = meta["name"]
        if type_ == "DELETED":
            self.translated.pop(name, None)  # ObserveDeletion
            for other in sorted(self.conflicts):  # resyncConflicts
                current = await self.api.get(INGRESSES, self.namespace, other)
                if current is not None:
                    await self.handle("MODIFIED", current)
            return
        finalizers = meta.get("finalizers") or []
        if meta.get("deletionTimestamp"):
            if r.LAYER_FINALIZER in finalizers:  # FinalizeKind, then the finalizer goes
                await self.api.patch(INGRESSES, self.namespace, name, r.release_patch(ingress))
            return
        if r.LAYER_FINALIZER not in finalizers:
            await self.api.patch(INGRESSES, self.namespace, name, {"metadata": {
                "resourceVersion": meta["resourceVersion"], "finalizers": [*finalizers, r.LAYER_FINALIZER]}})
            return  # the update is an event of its own
        hosts = hosts_of(ingress)
        if any(hosts & theirs for other, theirs in self.translated.items() if other != name):
            self.conflicts.add(name)
            return
        self.conflicts.discard(name)
        self.translated[name] = hosts
        status = ingress.get("status") or {}
        if status.get("observedGeneration") != meta.get("generation"):
            await self.api.patch(INGRESSES, self.namespace, name, {"status": {
                "observedGeneration": meta.get("generation"),
                "conditions": [{"type": t, "status": "True"} for t in ("LoadBalancerReady", "NetworkConfigured", "Ready")],
            }}, subresource="status")


class Serving(_Model):
    def __init__(self, api: KubeApi, info: kopf.ConnectionInfo, namespace: str, name: str,
                 make: Callable[[str], dict[str, Any]], ingress_class: str) -> None:
        super().__init__(api, info, namespace)
        self.name, self.make, self.ingress_class = name, make, ingress_class
        self.route_exists = True
        self.created = 0

    async def switch(self, ingress_class: str) -> None:
        """The Service's ingress-class annotation changed: the Route reconciler updates the Ingress."""
        self.ingress_class = ingress_class
        await self.api.patch(INGRESSES, self.namespace, self.name, {"metadata": {
            "annotations": {r.INGRESS_CLASS_ANNOTATION: ingress_class}}})

    async def handle(self, type_: str, ingress: dict[str, Any]) -> None:
        if ingress["metadata"]["name"] != self.name or not self.route_exists:
            return
        if type_ == "DELETED":
            await self.api.create(INGRESSES, self.make(self.ingress_class))
            self.created += 1
        elif class_of(ingress) != self.ingress_class:
            await self.api.patch(INGRESSES, self.namespace, self.name, {"metadata": {
                "resourceVersion": ingress["metadata"]["resourceVersion"],
                "annotations": {r.INGRESS_CLASS_ANNOTATION: self.ingress_class}}})
