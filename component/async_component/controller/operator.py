"""kopf operator: an async Knative Ingress gets a child Ingress and a Service.

Every event (of a parent, of a child Ingress, of a child Service) re-runs one
idempotent reconcile of the parent: read it, write the children only where
they drift, write its status only where it changes. The handlers are
``kopf.on.event`` on purpose: Knative Serving rewrites the parent's
annotations whenever it reconciles the Route, so kopf's usual per-object
state (an annotation) and finalizer would fight it. Without a finalizer the
children go by their owner references, and by an explicit delete when the
controller sees the parent gone or out of the async class.

Switching classes. Knative's network layers skip an Ingress whose class is
no longer theirs, and forget their translation of it only once it is gone
from the API. So when a parent that a layer translated becomes async (it
still carries the layer's finalizer), the controller deletes it, hands the
class back and drops the finalizer, so the layer forgets it; Serving then
re-creates the Ingress, in the async class, and it gets its children. When a
parent leaves the async class, its children are deleted, and the layer takes
the parent over.

Serving's Route reconciler puts its class back on the Ingress even while it
is deleting. If that lands while the API server already removes the Ingress
(an update that empties the finalizers deletes whatever state is stored by
then: the resourceVersion precondition of the release is checked before, and
Serving's guarded update can still land in between), the Ingress leaves with
the async class, the layer never sees it go and keeps a stale translation.
The controller sees that in the Ingress's DELETED event (the last stored
state) and hands the re-created Ingress over once more: it gives it the
layer's finalizer back (the layer does hold a translation of that name), so
the same delete, hand-back and release runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import kopf
from aiohttp import web

from .. import logs
from .drift import drift_patch
from .kubeapi import INGRESSES, SERVICES, ApiError, KubeApi, Resource
from .leader import LeaderElector
from .policy import ClusterLimits
from .resources import (
    ASYNC_INGRESS_CLASS,
    LAYER_FINALIZER,
    PARENT_LABEL,
    REASON_INVALID_MODE,
    REASON_INVALID_POLICY,
    InvalidAsyncMode,
    InvalidAsyncPolicy,
    async_service_name,
    check_parent,
    child_ingress_name,
    hand_back_patch,
    has_layer_finalizer,
    is_async_ingress,
    is_child_of,
    make_async_service,
    make_child_ingress,
    parent_name_of,
    parent_status,
    release_patch,
    status_patch,
)
from ..settings import ControllerSettings

log = logging.getLogger(__name__)

INGRESS_SELECTOR = (INGRESSES.group, INGRESSES.version, INGRESSES.plural)
SERVICE_SELECTOR = (SERVICES.version, SERVICES.plural)

Key = tuple[str, str]

RELEASE_ATTEMPTS = 5
RELEASE_BACKOFF = 0.05  # seconds, doubled per attempt


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """In a pod, its service account; elsewhere, the kubeconfig (``KUBECONFIG`` or ~/.kube/config)."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig found")
    return info


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    """One reconcile at a time per parent; failures are retried with a growing delay."""

    def __init__(self, api: KubeApi, settings: ControllerSettings, *,
                 retry_base_delay: float = 1.0, retry_max_delay: float = 60.0) -> None:
        self.api = api
        self.settings = settings
        self.limits = ClusterLimits(sink_hosts=settings.notification_allowed_hosts,
                                    max_timeout=settings.request_timeout)
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self._locks: dict[Key, asyncio.Lock] = {}
        self._users: dict[Key, int] = {}
        self._failures: dict[Key, int] = {}
        self._retries: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._children: dict[Key, set[str]] = {}
        self._handed: set[str] = set()
        """UIDs of Ingresses handed back to the layer, until their DELETED event."""
        self._stale: set[Key] = set()
        """Parents that left the API in the async class after a hand-back: the layer still translates them."""

    def deleted(self, ingress: dict[str, Any]) -> None:
        """An Ingress's DELETED event: did one the layer held leave in the async class, unseen by the layer?"""
        meta = ingress.get("metadata") or {}
        handed = meta.get("uid") in self._handed
        self._handed.discard(meta.get("uid"))
        # the layer's finalizer in the last state: it held the Ingress, whoever handed it back (another leader too)
        if is_async_ingress(ingress) and (handed or has_layer_finalizer(ingress)):
            key = (meta.get("namespace"), meta.get("name"))
            self._stale.add(key)
            log.warning("Ingress %s/%s left the API in class %s although it was handed back (Knative Serving put "
                        "its class back meanwhile): the network layer keeps its translation; handing the re-created "
                        "Ingress over once more", *key, ASYNC_INGRESS_CLASS)

    def note_child(self, namespace: str, parent: str, child: str, *, exists: bool) -> None:
        """Remember which parents have children, so an event of a non-async Ingress costs no API call."""
        key = (namespace, parent)
        if exists:
            self._children.setdefault(key, set()).add(child)
        elif key in self._children:
            self._children[key].discard(child)
            if not self._children[key]:
                del self._children[key]

    def concerns(self, ingress: dict[str, Any]) -> bool:
        """Is this (non-child) Ingress event one to reconcile: an async parent, or one that has children?"""
        meta = ingress.get("metadata") or {}
        return is_async_ingress(ingress) or (meta.get("namespace"), meta.get("name")) in self._children

    async def reconcile(self, namespace: str, name: str) -> None:
        """Reconcile now; on failure log one line and try again later."""
        key = (namespace, name)
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                gone = await self._reconcile(namespace, name)
        except Exception as exc:  # any failure: the next attempt starts from a fresh read
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(self.retry_base_delay * 2 ** (failures - 1), self.retry_max_delay)
            log.warning("Ingress %s/%s: reconcile failed (%s: %s); retrying in %.1fs",
                        namespace, name, type(exc).__name__, exc, delay)
            loop = asyncio.get_running_loop()
            self._retries[key] = loop.call_later(delay, self._spawn, namespace, name)
            return
        finally:
            self._users[key] -= 1
        self._failures.pop(key, None)
        if gone and not self._users[key]:  # forget a deleted parent once nobody waits for its lock
            del self._locks[key], self._users[key]

    def _spawn(self, namespace: str, name: str) -> None:
        task = asyncio.ensure_future(self.reconcile(namespace, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()

    async def _reconcile(self, namespace: str, name: str) -> bool:
        """True when the parent is gone."""
        parent = await self.api.get(INGRESSES, namespace, name)
        if parent is None:
            await self._remove_children(namespace, name, "its parent Ingress is gone")
            return True
        meta = parent["metadata"]
        if not is_async_ingress(parent):
            self._stale.discard((namespace, name))  # in the layer's class again: the layer serves it anew
            await self._remove_children(namespace, name, "its parent Ingress left the async class")
            return False
        if meta.get("deletionTimestamp"):
            if has_layer_finalizer(parent):
                await self._release(parent)
            return False
        if (namespace, name) in self._stale and not has_layer_finalizer(parent):
            await self.api.patch(INGRESSES, namespace, name, {"metadata": {
                "resourceVersion": meta.get("resourceVersion"),
                "finalizers": [*(meta.get("finalizers") or []), LAYER_FINALIZER]}})
            self._stale.discard((namespace, name))
            log.info("Ingress %s/%s: gave it back the finalizer %s (the network layer still translates it), "
                     "so it is handed over once more", namespace, name, LAYER_FINALIZER)
            return False
        self._stale.discard((namespace, name))
        if has_layer_finalizer(parent):
            log.info("Ingress %s/%s became async while the network layer still serves it (finalizer %s): "
                     "deleting it, so the layer drops its translation and Knative Serving re-creates it",
                     namespace, name, LAYER_FINALIZER)
            await self.api.delete(INGRESSES, namespace, name)
            return False

        foreign: list[str] = []
        limits = self.limits
        try:
            check_parent(parent, limits)
        except (InvalidAsyncMode, InvalidAsyncPolicy):  # the child keeps serving what it did: see the status
            child = await self.api.get(INGRESSES, namespace, child_ingress_name(parent))
        else:
            producer = self.settings.producer_host
            # the Service first: Kourier skips an Ingress whose backend Service is missing
            await self._apply(SERVICES, make_async_service(parent, producer_host=producer), name, foreign, exact_spec=False)
            desired = make_child_ingress(parent, ingress_class=self.settings.ingress_class, producer_host=producer,
                                         cluster_domain=self.settings.cluster_domain)
            child = await self._apply(INGRESSES, desired, name, foreign, exact_spec=True)
        if child is not None and not is_child_of(child, name):
            child = None

        status = parent_status(parent, child, now=_now(), foreign=foreign, limits=limits)
        patch = status_patch(parent.get("status"), status)
        if patch:
            await self.api.patch(INGRESSES, namespace, name, {"status": patch}, subresource="status")
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            log.info("Ingress %s/%s: Ready=%s%s", namespace, name, ready["status"],
                     f" ({ready['reason']}: {ready.get('message', '')})" if "reason" in ready else "")
            if ready.get("reason") in (REASON_INVALID_MODE, REASON_INVALID_POLICY):
                kopf.warn(parent, reason=ready["reason"], message=ready.get("message", ""))
        return False

    async def _apply(self, resource: Resource, desired: dict[str, Any], parent_name: str,
                     foreign: list[str], *, exact_spec: bool) -> dict[str, Any] | None:
        """Create ``desired`` or patch what drifted; an object someone else owns is left alone."""
        meta = desired["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        ref = f"{desired['kind']} {namespace}/{name}"
        current = await self.api.get(resource, namespace, name)
        if current is None:
            try:
                created = await self.api.create(resource, desired)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                current = await self.api.get(resource, namespace, name)
                if current is None:
                    raise
            else:
                log.info("created %s", ref)
                return created
        if not is_child_of(current, parent_name):
            foreign.append(ref)
            return current
        patch = drift_patch(current, desired, exact_spec=exact_spec)
        if not patch:
            return current
        updated = await self.api.patch(resource, namespace, name, patch)
        log.info("updated %s (%s drifted)", ref, ", ".join(sorted(patch)))
        return updated

    async def _release(self, parent: dict[str, Any]) -> None:
        """Let a deleting async Ingress go that the network layer still holds (see the module docstring).

        Serving may put its class back after the hand-back: the release, guarded
        by the hand-back's resourceVersion, then fails with 409, and the
        hand-back is done again, a few times with a short backoff before the
        reconcile's own retry takes over.
        """
        meta = parent["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        layer_class = self.settings.ingress_class
        current: dict[str, Any] | None = parent
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            if current is None or not has_layer_finalizer(current):
                return
            if is_async_ingress(current):
                current = await self.api.patch(INGRESSES, namespace, name, hand_back_patch(current, layer_class))
                if current is None:
                    return
                self._handed.add(current["metadata"]["uid"])
                if not has_layer_finalizer(current):
                    return
            try:
                await self.api.patch(INGRESSES, namespace, name, release_patch(current))
            except ApiError as exc:
                if exc.status != 409 or attempt == RELEASE_ATTEMPTS:
                    raise
                log.info("Ingress %s/%s: its class changed after the hand-back (Knative Serving puts its own "
                         "back); handing it back again (attempt %d of %d)", namespace, name, attempt + 1,
                         RELEASE_ATTEMPTS)
                await asyncio.sleep(RELEASE_BACKOFF * 2 ** (attempt - 1))
                current = await self.api.get(INGRESSES, namespace, name)
                continue
            log.info("Ingress %s/%s: handed back to class %s and released from finalizer %s, "
                     "so the network layer forgets it", namespace, name, layer_class, LAYER_FINALIZER)
            return

    async def _remove_children(self, namespace: str, parent_name: str, why: str) -> None:
        stub = {"metadata": {"name": parent_name, "namespace": namespace}}
        for resource, name, kind in ((INGRESSES, child_ingress_name(stub), "Ingress"),
                                     (SERVICES, async_service_name(stub), "Service")):
            current = await self.api.get(resource, namespace, name)
            if current is not None and is_child_of(current, parent_name):
                if await self.api.delete(resource, namespace, name):
                    log.info("deleted %s %s/%s: %s", kind, namespace, name, why)


def make_operator_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.posting.level = logging.WARNING  # our Events are explicit; log lines stay logs
    settings.scanning.disabled = True  # no RBAC needed for CRDs and namespaces
    settings.watching.label_selectors[SERVICE_SELECTOR] = PARENT_LABEL  # only our Services
    return settings


def make_registry(reconciler: Reconciler, operator_settings: kopf.OperatorSettings,
                  stop: asyncio.Event | None = None) -> kopf.OperatorRegistry:
    """``stop``: the operator's stop flag, raised as it stops for any reason (a signal too), so that kopf's task
    waiting on the flag ends at once: left waiting, kopf took it for a hung task and held the exit 5 s."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def log_in(**_: Any) -> kopf.ConnectionInfo:
        info = login(operator_settings)
        reconciler.api.use(info)
        return info

    # Every Ingress but our children: a parent that leaves the async class must lose its children.
    @kopf.on.event(*INGRESS_SELECTOR, labels={PARENT_LABEL: kopf.ABSENT}, registry=registry)
    async def parent_changed(type: str | None, body: kopf.Body, name: str, namespace: str, **_: Any) -> None:
        if type == "DELETED":
            reconciler.deleted(dict(body))
        if reconciler.concerns(dict(body)):
            await reconciler.reconcile(namespace, name)

    def on_child(kind: str) -> Any:
        async def child_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
            child = dict(body)
            parent, meta = parent_name_of(child), child["metadata"]
            if parent:
                reconciler.note_child(meta["namespace"], parent, f"{kind}/{meta['name']}", exists=type != "DELETED")
                await reconciler.reconcile(meta["namespace"], parent)

        return child_changed

    kopf.on.event(*INGRESS_SELECTOR, labels={PARENT_LABEL: kopf.PRESENT}, registry=registry,
                  id="child_ingress_changed")(on_child("Ingress"))
    kopf.on.event(*SERVICE_SELECTOR, labels={PARENT_LABEL: kopf.PRESENT}, registry=registry,
                  id="child_service_changed")(on_child("Service"))

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        reconciler.cancel()
        await reconciler.api.close()
        if stop is not None:
            stop.set()

    return registry


def run(settings: ControllerSettings) -> int:
    logs.configure("controller", settings.log_level)
    if settings.log_level != "DEBUG":  # kopf logs every handler call; ours say what changed
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return asyncio.run(_run(settings))


async def _run(settings: ControllerSettings) -> int:
    operator_settings = make_operator_settings()
    reconciler = Reconciler(KubeApi(login=functools.partial(login, operator_settings)), settings)
    identity = settings.identity or f"{socket.gethostname()}-{os.getpid()}"
    state = {"state": "standby" if settings.lease_name else "leading", "identity": identity}
    async with liveness_endpoint(settings.health_port, state):
        if not settings.lease_name:
            await _operate(settings, operator_settings, reconciler, identity, None)
            return 0
        # Its own client: kopf's cleanup closes the reconciler's, and the Lease outlives kopf.
        elector = LeaderElector(KubeApi(login=functools.partial(login, operator_settings)),
                                settings.system_namespace, settings.lease_name, identity,
                                duration=settings.lease_duration, renew_period=settings.lease_renew_period)
        try:
            await elector.acquire()
            state["state"] = "leading"
            lost = await _operate(settings, operator_settings, reconciler, identity, elector)
            if lost:
                return 1  # the pod restarts and stands by
            await elector.release()
            return 0
        finally:
            await elector.api.close()


async def _operate(settings: ControllerSettings, operator_settings: kopf.OperatorSettings, reconciler: Reconciler,
                   identity: str, elector: LeaderElector | None) -> bool:
    """Run kopf until it stops (a signal) or the Lease is lost; True when lost."""
    log.info("watching Ingresses of class %s cluster-wide; children get class %s, producer %s, cluster domain %s",
             ASYNC_INGRESS_CLASS, settings.ingress_class, settings.producer_host, settings.cluster_domain)
    stop = asyncio.Event()
    keeper = asyncio.create_task(_stop_when_lost(elector, stop)) if elector else None
    try:
        await kopf.operator(
            registry=make_registry(reconciler, operator_settings, stop),
            settings=operator_settings,
            identity=identity,  # kopf types it as a NewType of str; no getpass (any UID works)
            clusterwide=True,
            standalone=True,
            stop_flag=stop,
        )
    finally:
        if keeper is not None:
            keeper.cancel()
    return keeper is not None and keeper.done() and not keeper.cancelled() and keeper.result()


async def _stop_when_lost(elector: LeaderElector, stop: asyncio.Event) -> bool:
    await elector.keep()
    stop.set()
    return True


@contextlib.asynccontextmanager
async def liveness_endpoint(port: int, state: dict[str, str]) -> AsyncIterator[None]:
    """``/healthz`` for the process's whole life, standing by or leading (so no gap at a handover)."""
    if not port:
        yield
        return
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(state)

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    try:
        yield
    finally:
        await runner.cleanup()
