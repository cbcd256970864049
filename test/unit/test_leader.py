import asyncio
import copy
import datetime

import pytest

from async_component.controller.kubeapi import ApiError
from async_component.controller.leader import LeaderElector, claim_patch, holder, new_lease, release_patch
from async_component.settings import ControllerSettings, SettingsError, load

NOW = datetime.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=datetime.UTC)
STAMP = "2026-11-30T12:00:00.123456Z"


def lease(holder_identity: str | None, transitions: int = 0) -> dict:
    spec = {"leaseDurationSeconds": 15, "renewTime": "2026-11-30T11:59:59.000000Z", "leaseTransitions": transitions}
    if holder_identity is not None:
        spec["holderIdentity"] = holder_identity
    return {"metadata": {"name": "async-controller", "namespace": "knative-serving", "resourceVersion": "7"},
            "spec": spec}


@pytest.mark.parametrize("current, transitions, expected", [
    # renewing our own Lease: a new renewTime, nothing else changes hands
    ("me", 2, {"holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": STAMP}),
    # taking over from another holder, or from a released Lease: a transition
    ("other", 2, {"holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": STAMP,
                  "acquireTime": STAMP, "leaseTransitions": 3}),
    ("", 0, {"holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": STAMP,
             "acquireTime": STAMP, "leaseTransitions": 1}),
    (None, 0, {"holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": STAMP,
               "acquireTime": STAMP, "leaseTransitions": 1}),
])
def test_a_claim_is_guarded_by_the_version_it_read(current, transitions, expected):
    patch = claim_patch(lease(current, transitions), "me", 14.2, NOW)
    assert patch == {"metadata": {"resourceVersion": "7"}, "spec": expected}


def test_a_new_lease_and_a_release():
    created = new_lease("knative-serving", "async-controller", "me", 15, NOW)
    assert holder(created) == "me" and created["spec"]["acquireTime"] == created["spec"]["renewTime"] == STAMP
    released = release_patch(lease("me"), NOW)
    assert released["spec"]["holderIdentity"] == "" and released["metadata"]["resourceVersion"] == "7"
    assert holder(None) == "" and holder({"spec": {"holderIdentity": None}}) == ""


def test_lease_settings():
    settings = load(ControllerSettings, {})
    assert (settings.lease_name, settings.lease_duration, settings.lease_renew_period) == ("async-controller", 15, 2)
    with pytest.raises(SettingsError, match="LEASE_RENEW_PERIOD"):
        load(ControllerSettings, {"LEASE_DURATION": "3", "LEASE_RENEW_PERIOD": "2"})
    assert load(ControllerSettings, {"LEASE_NAME": "", "LEASE_DURATION": "1", "LEASE_RENEW_PERIOD": "5"}).lease_name == ""


class FakeLeases:
    """The API server's side of a Lease: resourceVersion preconditions, 409 on a stale write."""

    def __init__(self) -> None:
        self.lease: dict | None = None
        self.version = 0

    async def get(self, resource, namespace, name):
        return copy.deepcopy(self.lease)

    async def create(self, resource, body):
        if self.lease is not None:
            raise ApiError(409, "POST", "leases", "already exists")
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    async def patch(self, resource, namespace, name, patch):
        assert self.lease is not None
        if patch["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "PATCH", "leases", "the object has been modified")
        self.version += 1
        self.lease["spec"].update(patch["spec"])
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(api, "knative-serving", "async-controller", identity, duration=15, renew_period=2,
                         clock=clock)


async def test_a_standby_waits_for_the_lease_to_expire_on_its_own_clock():
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a.try_acquire_or_renew() is True
    assert await b.try_acquire_or_renew() is False and b.taken_by == "a"
    clock.now += 10
    assert await a.try_acquire_or_renew() is True  # renewed ...
    clock.now += 6
    assert await b.try_acquire_or_renew() is False  # ... and b's wait starts again when b sees it
    clock.now += 14
    assert await b.try_acquire_or_renew() is False
    clock.now += 2  # 16 s since b saw the last change
    assert await b.try_acquire_or_renew() is True
    assert holder(api.lease) == "b" and api.lease["spec"]["leaseTransitions"] == 1
    assert await a.try_acquire_or_renew() is False and a.taken_by == "b"


async def test_a_released_lease_is_taken_at_once_and_a_leader_that_lost_it_stops():
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    await a.acquire()
    assert await b.try_acquire_or_renew() is False
    await a.release()
    assert await b.try_acquire_or_renew() is True  # no waiting for expiry
    a.renew_period = 0.01
    await asyncio.wait_for(a.keep(), 2)  # returns: b holds it now
