"""Leader election on a coordination.k8s.io Lease: one controller replica reconciles, the others stand by.

kopf's peering would need its own CRDs and pauses every operator of equal
priority; a Lease is what Kubernetes' own controllers use and needs one Role.
A standby starts kopf only once it holds the Lease (kopf then lists every
Ingress, so nothing is missed during the handover); a leader that cannot
renew in time stops kopf before a standby may take over, and exits so that
its pod restarts as a standby. On SIGTERM the leader releases the Lease and a
standby takes over at its next attempt.

A standby judges expiry by its own clock, from when it last saw the Lease
change (as client-go does), so clocks that differ between nodes do not matter.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from .kubeapi import ApiError, KubeApi, Resource

log = logging.getLogger(__name__)

LEASES = Resource("coordination.k8s.io", "v1", "leases")


def micro_time(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def holder(lease: dict[str, Any] | None) -> str:
    return ((lease or {}).get("spec") or {}).get("holderIdentity") or ""


def new_lease(namespace: str, name: str, identity: str, duration: float, now: datetime.datetime) -> dict[str, Any]:
    stamp = micro_time(now)
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "async-component", "app.kubernetes.io/component": "controller"}},
        "spec": {"holderIdentity": identity, "leaseDurationSeconds": math.ceil(duration),
                 "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0},
    }


def claim_patch(lease: dict[str, Any], identity: str, duration: float, now: datetime.datetime) -> dict[str, Any]:
    """A merge patch making ``identity`` the holder; the resourceVersion makes it fail (409) if anyone wrote first."""
    spec = lease.get("spec") or {}
    stamp = micro_time(now)
    patch: dict[str, Any] = {"holderIdentity": identity, "leaseDurationSeconds": math.ceil(duration), "renewTime": stamp}
    if spec.get("holderIdentity") != identity:
        patch.update(acquireTime=stamp, leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1)
    return {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]}, "spec": patch}


def release_patch(lease: dict[str, Any], now: datetime.datetime) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": micro_time(now)}}


class LeaderElector:
    """Acquire, keep and release one Lease."""

    def __init__(self, api: KubeApi, namespace: str, name: str, identity: str, *, duration: float,
                 renew_period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.duration, self.renew_period = duration, renew_period
        self.renew_deadline = duration * 2 / 3  # stop leading well before a standby may take over
        self._clock = clock
        self._seen: tuple[str, float] | None = None  # (resourceVersion, when this process first saw it)
        self._last_holder: str | None = None
        self.taken_by = ""  # another replica that holds the Lease now, as last read

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    def _now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this process holds the Lease afterwards."""
        lease = await self.api.get(LEASES, self.namespace, self.name)
        if lease is None:
            try:
                created = await self.api.create(LEASES, new_lease(self.namespace, self.name, self.identity,
                                                                  self.duration, self._now()))
            except ApiError as exc:
                if exc.status == 409:  # another replica created it first
                    return False
                raise
            self._remember(created)
            return True
        self._remember(lease)
        current = holder(lease)
        self.taken_by = current if current != self.identity else ""
        if current and current != self.identity:
            assert self._seen is not None
            held_for = float((lease.get("spec") or {}).get("leaseDurationSeconds") or self.duration)
            if self._clock() - self._seen[1] < held_for:
                if current != self._last_holder:
                    log.info("standing by: %s is held by %s", self.where, current)
                    self._last_holder = current
                return False
            log.info("%s held by %s was not renewed for %.0fs; taking it over", self.where, current, held_for)
        try:
            patched = await self.api.patch(LEASES, self.namespace, self.name,
                                           claim_patch(lease, self.identity, self.duration, self._now()))
        except ApiError as exc:
            if exc.status == 409:  # someone renewed or claimed it meanwhile
                return False
            raise
        if patched is None:
            return False
        self._remember(patched)
        return True

    def _remember(self, lease: dict[str, Any]) -> None:
        version = lease["metadata"].get("resourceVersion", "")
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, self._clock())

    async def acquire(self) -> None:
        """Return once this process leads."""
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("leading: %s is held by %s", self.where, self.identity)
                    return
            except Exception as exc:  # API unreachable: keep trying, as a standby
                log.warning("%s: cannot read or claim it (%s: %s)", self.where, type(exc).__name__, exc)
            await asyncio.sleep(self.renew_period)

    async def keep(self) -> None:
        """Renew until another replica holds the Lease, or a renewal has not succeeded for ``renew_deadline``."""
        last_renewed = self._clock()
        while True:
            await asyncio.sleep(self.renew_period)
            try:
                if await self.try_acquire_or_renew():
                    last_renewed = self._clock()
                    continue
                if self.taken_by:
                    log.error("lost %s: it is held by %s now", self.where, self.taken_by)
                    return
                reason = "another replica wrote it first"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if self._clock() - last_renewed >= self.renew_deadline:
                log.error("lost %s: not renewed for %.0fs (%s)", self.where, self._clock() - last_renewed, reason)
                return
            log.warning("%s: renewal failed (%s); retrying", self.where, reason)

    async def release(self) -> None:
        """Hand the Lease back, so a standby takes over at once instead of after it expires."""
        try:
            lease = await self.api.get(LEASES, self.namespace, self.name)
            if holder(lease) == self.identity and lease is not None:
                await self.api.patch(LEASES, self.namespace, self.name, release_patch(lease, self._now()))
                log.info("released %s", self.where)
        except Exception as exc:  # it expires by itself
            log.warning("%s: could not release it (%s: %s); it expires in %.0fs", self.where,
                        type(exc).__name__, exc, self.duration)
