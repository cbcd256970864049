"""The reconciler as a table: objects in the cluster -> the creates, patches, deletes, status update and events
it makes, against an in-memory Kubernetes API (the shape of Knative's TableTest).

The operator process against an emulated API server: test/integration/test_controller.py.
"""

from __future__ import annotations

import copy

import kopf
import pytest

from async_component.controller import operator
from async_component.controller import resources as r
from async_component.controller.kubeapi import INGRESSES, SERVICES, ApiError, Resource
from async_component.settings import INGRESS_CLASSES, ControllerSettings

KOURIER = INGRESS_CLASSES[0]
PRODUCER = "async-producer.knative-serving.svc.cluster.local"
NOW = "2030-01-01T00:00:00Z"
SETTINGS = ControllerSettings(ingress_class=KOURIER, system_namespace="knative-serving")


def apply_merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386, as the API server applies it."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = apply_merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


class MemoryKubeApi:
    """The KubeApi calls the reconciler makes, on a dict of objects; every write is recorded."""

    def __init__(self, objects: list[dict]) -> None:
        self.objects = {self._key(self._resource(obj), obj["metadata"]["namespace"], obj["metadata"]["name"]):
                        copy.deepcopy(obj) for obj in objects}
        self.creates: list[str] = []
        self.patches: list[tuple[str, list[str]]] = []
        self.status_updates: list[dict] = []
        self.deletes: list[str] = []

    @staticmethod
    def _resource(obj: dict) -> Resource:
        return SERVICES if obj["kind"] == "Service" else INGRESSES

    @staticmethod
    def _key(resource: Resource, namespace: str, name: str) -> tuple[str, str, str]:
        return resource.plural, namespace, name

    @staticmethod
    def _ref(resource: Resource, name: str) -> str:
        return f"{'Service' if resource is SERVICES else 'Ingress'} {name}"

    async def get(self, resource: Resource, namespace: str, name: str) -> dict | None:
        return copy.deepcopy(self.objects.get(self._key(resource, namespace, name)))

    async def create(self, resource: Resource, body: dict) -> dict:
        key = self._key(resource, body["metadata"]["namespace"], body["metadata"]["name"])
        if key in self.objects:
            raise ApiError(409, "POST", resource.path(key[1]), "already exists")
        self.objects[key] = copy.deepcopy(body)
        self.creates.append(self._ref(resource, key[2]))
        return copy.deepcopy(body)

    async def patch(self, resource: Resource, namespace: str, name: str, patch: dict,
                    subresource: str | None = None) -> dict | None:
        key = self._key(resource, namespace, name)
        if key not in self.objects:
            return None
        changed = apply_merge_patch(self.objects[key], patch)
        if subresource is None and changed.get("spec") != self.objects[key].get("spec"):
            changed["metadata"]["generation"] = changed["metadata"].get("generation", 0) + 1
        self.objects[key] = changed
        if subresource == "status":
            self.status_updates.append(patch["status"])
        else:
            self.patches.append((self._ref(resource, name), sorted(patch)))
        return copy.deepcopy(self.objects[key])

    async def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        self.deletes.append(self._ref(resource, name))
        return self.objects.pop(self._key(resource, namespace, name), None) is not None


# --- objects


def parent(mode: str | None = None, *, ingress_class: str = r.ASYNC_INGRESS_CLASS, annotations_extra: dict | None = None,
           **meta) -> dict:
    """The Ingress Knative Serving makes for Service ``hello``."""
    annotations = {r.INGRESS_CLASS_ANNOTATION: ingress_class, **(annotations_extra or {})}
    if mode is not None:
        annotations[r.MODE_ANNOTATION] = mode
    return {
        "apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress",
        "metadata": {"name": "hello", "namespace": "demo", "uid": "parent-uid", "generation": 2,
                     "annotations": annotations, **meta},
        "spec": {"rules": [{"hosts": ["hello.demo.example.com"], "visibility": r.VISIBILITY_EXTERNAL,
                            "http": {"paths": [{"splits": [{"serviceName": "hello-00001", "serviceNamespace": "demo",
                                                            "servicePort": 80, "percent": 100}]}]}}]},
    }


def child_ingress(of: dict, *, ready: str | None = None, **changes) -> dict:
    """The child Ingress as the API serves it once created; ``ready``: its Ready condition's status."""
    child = r.make_child_ingress(of, ingress_class=KOURIER, producer_host=PRODUCER)
    child["metadata"].update(uid="child-uid", generation=1)
    if ready is not None:
        child["status"] = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": ready}],
                           "publicLoadBalancer": {"ingress": [{"domainInternal": "kourier.kourier-system.svc"}]}}
    return apply_merge_patch(child, changes)


def async_service(of: dict, **changes) -> dict:
    service = r.make_async_service(of, producer_host=PRODUCER)
    service["spec"]["clusterIP"] = ""  # a field the server defaults: never drift
    return apply_merge_patch(service, changes)


def foreign(obj: dict) -> dict:
    """The same object, made by someone else."""
    other = copy.deepcopy(obj)
    other["metadata"].pop("ownerReferences", None)
    other["metadata"]["labels"] = {}
    return other


def settled(of: dict, child: dict) -> dict:
    """``of`` with the status the reconciler would have written already."""
    return {**of, "status": r.parent_status(of, child, now=NOW)}


PARENT = parent()
READY_CHILD = child_ingress(PARENT, ready="True")
NO_STATUS = None


def ready(status: str, reason: str | None = None) -> tuple[str, str | None]:
    return status, reason


# --- the table

ROWS = [
    dict(name="a new async Ingress gets its Service, then its child Ingress",
         objects=[PARENT],
         creates=["Service hello-async", "Ingress hello-new"],
         status=ready("Unknown", r.REASON_CHILD_NOT_READY)),
    dict(name="nothing to do when the children and the status say what they should",
         objects=[settled(PARENT, READY_CHILD), READY_CHILD, async_service(PARENT)],
         status=NO_STATUS),
    dict(name="the parent becomes Ready with its child, load balancer copied",
         objects=[PARENT, READY_CHILD, async_service(PARENT)],
         status=ready("True"), load_balancer=READY_CHILD["status"]["publicLoadBalancer"]),
    dict(name="a child that is not ready keeps the parent from Ready",
         objects=[PARENT, child_ingress(PARENT, ready="False"), async_service(PARENT)],
         status=ready("False", r.REASON_CHILD_NOT_READY)),
    dict(name="a hand-edited child Ingress spec is put back",
         objects=[settled(PARENT, READY_CHILD), child_ingress(PARENT, ready="True", spec={"rules": []}),
                  async_service(PARENT)],
         patches=[("Ingress hello-new", ["spec"])], status=ready("Unknown", r.REASON_CHILD_NOT_READY)),
    dict(name="a Service pointing elsewhere is put back, its defaulted fields left alone",
         objects=[settled(PARENT, READY_CHILD), READY_CHILD,
                  async_service(PARENT, spec={"externalName": "elsewhere.example.com"})],
         patches=[("Service hello-async", ["spec"])], status=NO_STATUS),
    dict(name="an annotation added to a child by hand is taken off",
         objects=[settled(PARENT, READY_CHILD),
                  child_ingress(PARENT, ready="True", metadata={"annotations": {"edited-by": "hand"}}),
                  async_service(PARENT)],
         patches=[("Ingress hello-new", ["metadata"])], status=NO_STATUS),
    dict(name="a mode change rewrites the child Ingress",
         objects=[parent(r.MODE_ALWAYS), READY_CHILD, async_service(PARENT)],
         patches=[("Ingress hello-new", ["metadata", "spec"])], status=ready("Unknown", r.REASON_CHILD_NOT_READY)),
    dict(name="an invalid mode builds nothing and says why, with a warning event",
         objects=[parent("sometimes")],
         status=ready("False", r.REASON_INVALID_MODE), events=[r.REASON_INVALID_MODE]),
    dict(name="an invalid policy leaves the existing child as it is and says which annotation, with a warning event",
         objects=[parent(annotations_extra={"async.knative.dev/retry": "many"}), READY_CHILD, async_service(PARENT)],
         status=ready("False", r.REASON_INVALID_POLICY), events=[r.REASON_INVALID_POLICY],
         load_balancer=READY_CHILD["status"]["publicLoadBalancer"]),
    dict(name="a policy change rewrites the child Ingress's producer routes",
         objects=[parent(annotations_extra={"async.knative.dev/retry": "5"}), READY_CHILD, async_service(PARENT)],
         patches=[("Ingress hello-new", ["metadata", "spec"])], status=ready("Unknown", r.REASON_CHILD_NOT_READY)),
    dict(name="an object someone else made in a child's place is left alone and reported",
         objects=[PARENT, foreign(async_service(PARENT))],
         creates=["Ingress hello-new"], status=ready("False", r.REASON_NOT_OWNED)),
    dict(name="an Ingress of another class is not ours",
         objects=[parent(ingress_class=KOURIER)], status=NO_STATUS),
    dict(name="a parent being deleted is left to its owner references",
         objects=[parent(deletionTimestamp=NOW)], status=NO_STATUS),
    dict(name="the children of a parent that is gone are deleted",
         objects=[READY_CHILD, async_service(PARENT)],
         deletes=["Ingress hello-new", "Service hello-async"], status=NO_STATUS),
    dict(name="an object in a child's place whose parent is gone is not ours to delete",
         objects=[foreign(READY_CHILD)], status=NO_STATUS),
]


@pytest.mark.parametrize("row", ROWS, ids=[row["name"] for row in ROWS])
async def test_reconcile(row, monkeypatch):
    monkeypatch.setattr(operator, "_now", lambda: NOW)
    events: list[str] = []
    monkeypatch.setattr(kopf, "warn", lambda obj, *, reason, message: events.append(reason))
    api = MemoryKubeApi(row["objects"])
    reconciler = operator.Reconciler(api, SETTINGS)

    await reconciler._reconcile("demo", "hello")

    assert api.creates == row.get("creates", [])
    assert api.patches == row.get("patches", [])
    assert api.deletes == row.get("deletes", [])
    assert events == row.get("events", [])
    if row["status"] is NO_STATUS:
        assert api.status_updates == []
    else:
        (update,) = api.status_updates
        (condition,) = [c for c in update["conditions"] if c["type"] == "Ready"]
        assert (condition["status"], condition.get("reason")) == row["status"]
        assert condition["lastTransitionTime"] == NOW
        assert update.get("publicLoadBalancer") == row.get("load_balancer")
        assert api.objects[("ingresses", "demo", "hello")]["status"]["observedGeneration"] == 2
    if row.get("creates") or row.get("patches"):  # what was written is what the builders want
        again = MemoryKubeApi(list(api.objects.values()))
        await operator.Reconciler(again, SETTINGS)._reconcile("demo", "hello")
        assert (again.creates, again.patches) == ([], [])


async def test_a_failed_call_is_retried_later_from_a_fresh_read(monkeypatch):
    monkeypatch.setattr(operator, "_now", lambda: NOW)
    api = MemoryKubeApi([PARENT])
    calls = []

    async def refuse(resource, body):
        calls.append(body["metadata"]["name"])
        raise ApiError(500, "POST", "/x", "etcd is unhappy")

    monkeypatch.setattr(api, "create", refuse)
    reconciler = operator.Reconciler(api, SETTINGS, retry_base_delay=30)
    await reconciler.reconcile("demo", "hello")
    assert calls == ["hello-async"] and api.status_updates == []
    assert list(reconciler._retries) == [("demo", "hello")]
    reconciler.cancel()
