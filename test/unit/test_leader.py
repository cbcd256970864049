import datetime

import pytest

from async_component.controller.leader import claim_patch, holder, new_lease, release_patch
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
