"""Does a child object still say what the controller wants? Pure dict comparison.

Only the fields the controller sets are compared, never the ones the API
server fills in (uid, resourceVersion, status, defaulted Service fields), so an
unchanged child is never written and a hand-edited one is put back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

MANAGED_METADATA = ("labels", "annotations", "ownerReferences")
"""Metadata keys a child's builder sets; those it leaves out are not managed."""


def merge_patch(current: Mapping[str, Any], desired: Mapping[str, Any], *, prune: bool = True) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``current`` into ``desired``.

    With ``prune``, keys only ``current`` has are removed (set to None);
    without it they are left alone (fields the server defaults).
    """
    patch: dict[str, Any] = {}
    if prune:
        for key in current.keys() - desired.keys():
            patch[key] = None
    for key, value in desired.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            sub = merge_patch(old, value, prune=prune)
            if sub:
                patch[key] = sub
        elif key not in current or old != value:
            patch[key] = copy.deepcopy(value)
    return patch


def _managed_metadata(obj: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {key: meta[key] for key in keys if key in meta}


def drift_patch(current: Mapping[str, Any], desired: Mapping[str, Any], *, exact_spec: bool) -> dict[str, Any]:
    """The patch that puts ``current`` back to ``desired``; empty when nothing drifted.

    ``exact_spec``: the spec is entirely ours (a KIngress); otherwise keys the
    server adds to the spec (a Service's defaults) are left alone.
    """
    keys = [key for key in MANAGED_METADATA if key in desired.get("metadata", {})]
    patch: dict[str, Any] = {}
    metadata = merge_patch(_managed_metadata(current, keys), _managed_metadata(desired, keys))
    if metadata:
        patch["metadata"] = metadata
    spec = merge_patch(current.get("spec") or {}, desired.get("spec") or {}, prune=exact_spec)
    if spec:
        patch["spec"] = spec
    return patch
