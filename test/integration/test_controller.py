"""The real operator (``async-component controller``) against kmock's Kubernetes emulator,
and with ``--kube`` against a real kube-apiserver too.

One cluster per backend (the emulator in its own thread, or the session's
control plane) and one operator process serve the module; each test works in
its own namespace and talks to the cluster over HTTP, as kubectl would. On
the real API server the operator logs in as the async-controller
ServiceAccount, so a verb missing from its ClusterRole fails these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from async_component.controller import resources as r
from async_component.controller.kubeapi import INGRESSES, SERVICES, KubeApi
from async_component.protocol import DeliveryPolicy
from async_component.settings import INGRESS_CLASSES

from .controller_backends import KmockCluster, KubeCluster
from .controller_process import Operator, start_operator
from .knative_models import NetworkLayer, Serving
from .kube_emulator import EmulatorThread

KOURIER = INGRESS_CLASSES[0]
SYSTEM_NAMESPACE = "knative-serving"  # where the manifests run the controller and grant its Lease
PRODUCER = f"async-producer.{SYSTEM_NAMESPACE}.svc.cluster.local"
DEADLINE = 15.0  # generous: polls return as soon as the check passes


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that reaches a cluster runs on kmock, and with --kube on the real API server too."""
    if "cluster" in metafunc.fixturenames:
        on_kube = metafunc.config.getoption("--kube") and not metafunc.definition.get_closest_marker("kmock_only")
        backends = ["kmock", "kube"] if on_kube else ["kmock"]
        metafunc.parametrize("cluster", backends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest):
    if request.param == "kube":
        yield KubeCluster(request.getfixturevalue("kube"))
        return
    with EmulatorThread() as emulator:
        yield KmockCluster(emulator)


NOTIFICATION_ALLOWED_HOSTS = ".svc.cluster.local,hooks.example.com"
"""As the ConfigMap would set it: completion events go only to cluster Services and one outside collector; and
REQUEST_TIMEOUT 120 s, the longest attempt."""


@pytest.fixture(scope="module")
def operator(cluster: KmockCluster | KubeCluster, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("controller")
    operator = start_operator(cluster.url, workdir, kubeconfig=cluster.operator_kubeconfig(workdir / "kubeconfig"),
                              SYSTEM_NAMESPACE=SYSTEM_NAMESPACE, NOTIFICATION_ALLOWED_HOSTS=NOTIFICATION_ALLOWED_HOSTS,
                              REQUEST_TIMEOUT="120")
    yield operator
    operator.stop()


@pytest.fixture
async def api(cluster: KmockCluster | KubeCluster, operator: Operator):
    client = KubeApi(cluster.admin_info())
    yield client
    await client.close()


@pytest.fixture
def namespace(request: pytest.FixtureRequest, cluster: KmockCluster | KubeCluster) -> str:
    name = request.node.originalname.replace("_", "-")[:63].strip("-").lower()
    variant = [part for part in request.node.callspec.id.split("-") if part not in ("kmock", "kube")] \
        if hasattr(request.node, "callspec") else []
    if variant:  # a parametrized test: a namespace for each case
        suffix = "-".join(variant).lower()
        name = f"{name[:62 - len(suffix)].strip('-')}-{suffix}"
    cluster.prepare_namespace(name)
    return name


@pytest.fixture
def eventually(operator: Operator) -> Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]:
    """Retry an async check until it stops failing; past the deadline show the operator's log."""

    async def wait(check: Callable[[], Awaitable[None]], timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await check()
                return
            except AssertionError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{exc}\n--- controller log ---\n{operator.log_tail()}") from None
            await asyncio.sleep(0.05)

    return wait


def kingress(name: str, namespace: str, *, ingress_class: str = r.ASYNC_INGRESS_CLASS, mode: str | None = None) -> dict:
    """A parent Ingress as Knative Serving makes it for Service ``name``."""
    annotations = {r.INGRESS_CLASS_ANNOTATION: ingress_class}
    if mode is not None:
        annotations[r.MODE_ANNOTATION] = mode
    path = {"splits": [{"serviceName": f"{name}-00001", "serviceNamespace": namespace, "servicePort": 80, "percent": 100}]}
    return {
        "apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                     "labels": {"serving.knative.dev/service": name}},
        "spec": {"rules": [
            {"hosts": [f"{name}.{namespace}.example.com"], "visibility": r.VISIBILITY_EXTERNAL, "http": {"paths": [path]}},
            {"hosts": [f"{name}.{namespace}.svc.cluster.local"], "visibility": r.VISIBILITY_CLUSTER_LOCAL, "http": {"paths": [path]}},
        ]},
    }


def condition(obj: dict | None, type_: str = "Ready") -> dict:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item["type"] == type_:
            return item
    return {}


async def children(api: KubeApi, namespace: str, name: str) -> tuple[dict | None, dict | None]:
    return (await api.get(INGRESSES, namespace, f"{name}-new"),
            await api.get(SERVICES, namespace, f"{name}-async"))


async def wait_for_children(api: KubeApi, eventually, namespace: str, name: str) -> tuple[dict, dict]:
    found: list = []

    async def both_exist() -> None:
        found[:] = await children(api, namespace, name)
        assert all(found), f"children of {namespace}/{name}: {found}"

    await eventually(both_exist)
    return found[0], found[1]


async def mark_ready(api: KubeApi, ingress: dict, status: str = "True") -> dict:
    """What Kourier does once Envoy serves the child Ingress."""
    meta = ingress["metadata"]
    return await api.patch(INGRESSES, meta["namespace"], meta["name"], {"status": {
        "observedGeneration": meta["generation"],
        "conditions": [{"type": t, "status": status} for t in ("LoadBalancerReady", "NetworkConfigured", "Ready")],
        "publicLoadBalancer": {"ingress": [{"domainInternal": "kourier.kourier-system.svc.cluster.local"}]},
        "privateLoadBalancer": {"ingress": [{"domainInternal": "kourier-internal.kourier-system.svc.cluster.local"}]},
    }}, subresource="status")


async def test_liveness_endpoint(operator: Operator):
    async with aiohttp.ClientSession() as session, session.get(operator.health_url) as resp:
        assert resp.status == 200


async def test_async_ingress_gets_child_ingress_and_service(api, eventually, namespace):
    parent = await api.create(INGRESSES, kingress("hello", namespace))
    ingress, service = await wait_for_children(api, eventually, namespace, "hello")

    expected = r.make_child_ingress(parent, ingress_class=KOURIER, producer_host=PRODUCER)
    assert ingress["spec"] == expected["spec"]
    assert ingress["metadata"]["annotations"][r.INGRESS_CLASS_ANNOTATION] == KOURIER
    assert ingress["metadata"]["labels"] == {"serving.knative.dev/service": "hello", r.PARENT_LABEL: "hello"}
    owner = [{"apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress", "name": "hello",
              "uid": parent["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert ingress["metadata"]["ownerReferences"] == owner
    assert service["spec"]["type"] == "ExternalName"
    assert service["spec"]["externalName"] == PRODUCER
    assert service["metadata"]["ownerReferences"] == owner

    async def parent_waits_for_child() -> None:
        ready = condition(await api.get(INGRESSES, namespace, "hello"))
        assert ready.get("status") == "Unknown" and ready.get("reason") == r.REASON_CHILD_NOT_READY, ready
        assert f"Ingress {namespace}/hello-new" in ready["message"]

    await eventually(parent_waits_for_child)


async def test_other_ingress_classes_are_ignored(api, eventually, namespace):
    await api.create(INGRESSES, kingress("plain", namespace, ingress_class=KOURIER))
    await api.create(INGRESSES, kingress("after", namespace))
    await wait_for_children(api, eventually, namespace, "after")  # the operator got past "plain"
    assert await children(api, namespace, "plain") == (None, None)
    assert "status" not in await api.get(INGRESSES, namespace, "plain")


async def test_mode_change_updates_the_child(api, eventually, namespace):
    await api.create(INGRESSES, kingress("hello", namespace))
    ingress, _ = await wait_for_children(api, eventually, namespace, "hello")
    assert ingress["spec"]["rules"][0]["http"]["paths"][1]["headers"] == {"Prefer": {"exact": "respond-async"}}

    parent = await api.patch(INGRESSES, namespace, "hello", {"metadata": {"annotations": {r.MODE_ANNOTATION: r.MODE_ALWAYS}}})
    expected = r.make_child_ingress(parent, ingress_class=KOURIER, producer_host=PRODUCER)

    async def child_is_always_async() -> None:
        current = await api.get(INGRESSES, namespace, "hello-new")
        assert current["spec"] == expected["spec"]
        assert current["metadata"]["annotations"][r.MODE_ANNOTATION] == r.MODE_ALWAYS

    await eventually(child_is_always_async)
    paths = expected["spec"]["rules"][0]["http"]["paths"]
    assert paths[1]["headers"] == {"Prefer": {"exact": "respond-sync"}}


async def test_parent_ready_follows_the_child(api, eventually, namespace):
    await api.create(INGRESSES, kingress("hello", namespace))
    ingress, _ = await wait_for_children(api, eventually, namespace, "hello")
    ingress = await mark_ready(api, ingress)

    async def parent_ready() -> None:
        parent = await api.get(INGRESSES, namespace, "hello")
        assert condition(parent).get("status") == "True", parent.get("status")
        assert condition(parent, "LoadBalancerReady").get("status") == "True"
        assert condition(parent, "NetworkConfigured").get("status") == "True"
        assert parent["status"]["publicLoadBalancer"] == {"ingress": [{"domainInternal": "kourier.kourier-system.svc.cluster.local"}]}
        assert parent["status"]["privateLoadBalancer"] == {"ingress": [{"domainInternal": "kourier-internal.kourier-system.svc.cluster.local"}]}
        assert parent["status"]["observedGeneration"] == parent["metadata"]["generation"]

    await eventually(parent_ready)
    # the parent's status write was an event too; the child had not drifted, so it was not written
    current = await api.get(INGRESSES, namespace, "hello-new")
    assert current["metadata"]["resourceVersion"] == ingress["metadata"]["resourceVersion"]

    await mark_ready(api, ingress, status="Unknown")

    async def parent_not_ready() -> None:
        parent = await api.get(INGRESSES, namespace, "hello")
        assert condition(parent).get("status") == "Unknown", parent.get("status")
        assert "publicLoadBalancer" not in parent["status"]

    await eventually(parent_not_ready)


async def test_invalid_mode_is_reported_and_builds_nothing(api, eventually, namespace, cluster):
    await api.create(INGRESSES, kingress("hello", namespace, mode="sometimes"))

    async def reported() -> None:
        ready = condition(await api.get(INGRESSES, namespace, "hello"))
        assert ready.get("status") == "False" and ready.get("reason") == r.REASON_INVALID_MODE, ready
        assert "'sometimes'" in ready["message"]
        events = [e for e in await cluster.list_events(namespace) if e.get("reason") == r.REASON_INVALID_MODE]
        assert events, "no InvalidAsyncMode event"
        assert events[0]["type"] == "Warning"
        assert events[0]["involvedObject"]["name"] == "hello"
        assert "'sometimes'" in events[0]["message"]

    await eventually(reported)
    assert await children(api, namespace, "hello") == (None, None)

    # the operator keeps running: fixing the annotation builds the children
    await api.patch(INGRESSES, namespace, "hello", {"metadata": {"annotations": {r.MODE_ANNOTATION: r.MODE_CONDITIONAL}}})
    await wait_for_children(api, eventually, namespace, "hello")


async def test_an_invalid_policy_is_reported_and_the_child_keeps_the_last_good_one(api, eventually, namespace, cluster):
    await api.create(INGRESSES, kingress("hello", namespace))
    before, _ = await wait_for_children(api, eventually, namespace, "hello")
    await api.patch(INGRESSES, namespace, "hello", {"metadata": {"annotations": {"async.knative.dev/timeout": "5s"}}})

    async def reported() -> None:
        ready = condition(await api.get(INGRESSES, namespace, "hello"))
        assert ready.get("status") == "False" and ready.get("reason") == r.REASON_INVALID_POLICY, ready
        assert "async.knative.dev/timeout" in ready["message"] and "'5s'" in ready["message"]
        events = [e for e in await cluster.list_events(namespace) if e.get("reason") == r.REASON_INVALID_POLICY]
        assert events, "no InvalidAsyncPolicy event"
        assert events[0]["type"] == "Warning" and events[0]["involvedObject"]["name"] == "hello"
        assert "async.knative.dev/timeout" in events[0]["message"]

    await eventually(reported)
    after, _ = await children(api, namespace, "hello")
    assert after["spec"] == before["spec"] and after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    # fixed: the producer routes carry the new policy
    await api.patch(INGRESSES, namespace, "hello", {"metadata": {"annotations": {"async.knative.dev/timeout": "PT5S"}}})

    async def policy_routed() -> None:
        child, _ = await children(api, namespace, "hello")
        split = child["spec"]["rules"][0]["http"]["paths"][1]["splits"][0]
        assert split["appendHeaders"]["Async-Policy"] == "v1;timeout=5", split

    await eventually(policy_routed)


@pytest.mark.parametrize(("annotation", "refused", "fixed", "said", "field"), [
    ("async.knative.dev/on-failure-sink", "http://collector.example.net/", "https://hooks.example.com/",
     "NOTIFICATION_ALLOWED_HOSTS", "on_failure_sink"),
    ("async.knative.dev/timeout", "PT10M", "PT2M", "REQUEST_TIMEOUT (120s)", "timeout"),
], ids=["sink", "timeout"])
async def test_a_policy_past_the_clusters_limits_is_reported_and_the_child_keeps_the_last_good_one(
        api, eventually, namespace, cluster, annotation, refused, fixed, said, field):
    """Before, the data plane dropped every completion event for a sink off NOTIFICATION_ALLOWED_HOSTS (only its log
    and a metric said so), and cut an attempt at REQUEST_TIMEOUT however long the Service's own timeout."""
    await api.create(INGRESSES, kingress("hello", namespace))
    before, _ = await wait_for_children(api, eventually, namespace, "hello")
    await api.patch(INGRESSES, namespace, "hello", {"metadata": {"annotations": {annotation: refused}}})

    async def reported() -> None:
        ready = condition(await api.get(INGRESSES, namespace, "hello"))
        assert ready.get("status") == "False" and ready.get("reason") == r.REASON_INVALID_POLICY, ready
        assert annotation in ready["message"] and said in ready["message"], ready
        events = [e for e in await cluster.list_events(namespace) if e.get("reason") == r.REASON_INVALID_POLICY]
        assert events and repr(refused) in events[0]["message"], events

    await eventually(reported)
    after, _ = await children(api, namespace, "hello")
    assert after["spec"] == before["spec"]

    await api.patch(INGRESSES, namespace, "hello", {"metadata": {"annotations": {annotation: fixed}}})

    async def routed() -> None:
        child, _ = await children(api, namespace, "hello")
        split = child["spec"]["rules"][0]["http"]["paths"][1]["splits"][0]
        policy = DeliveryPolicy.decode(split["appendHeaders"]["Async-Policy"])
        assert getattr(policy, field) == (120.0 if field == "timeout" else fixed), split

    await eventually(routed)


async def test_a_failed_api_call_is_retried(api, eventually, namespace, cluster, operator):
    cluster.fail_next("create", "services", namespace)
    await api.create(INGRESSES, kingress("hello", namespace))
    await wait_for_children(api, eventually, namespace, "hello")
    assert f"Ingress {namespace}/hello: reconcile failed (ApiError: POST" in operator.log_tail(100)


async def test_a_conflict_on_update_is_retried(api, eventually, namespace, cluster, operator):
    cluster.fail_next("update", "ingresses/status", namespace, status=409)
    await api.create(INGRESSES, kingress("hello", namespace))
    await wait_for_children(api, eventually, namespace, "hello")

    async def status_written() -> None:
        ready = condition(await api.get(INGRESSES, namespace, "hello"))
        assert ready.get("reason") == r.REASON_CHILD_NOT_READY, ready

    await eventually(status_written)
    assert f"Ingress {namespace}/hello: reconcile failed (ApiError: PATCH" in operator.log_tail(100)
    assert ": 409 " in operator.log_tail(100)


async def test_deleted_children_are_recreated(api, eventually, namespace):
    await api.create(INGRESSES, kingress("hello", namespace))
    ingress, service = await wait_for_children(api, eventually, namespace, "hello")
    assert await api.delete(INGRESSES, namespace, "hello-new")
    assert await api.delete(SERVICES, namespace, "hello-async")
    again, service_again = await wait_for_children(api, eventually, namespace, "hello")
    assert again["metadata"]["uid"] != ingress["metadata"]["uid"]
    assert again["spec"] == ingress["spec"]
    assert service_again["spec"] == service["spec"]


async def test_hand_edited_children_are_put_back(api, eventually, namespace):
    await api.create(INGRESSES, kingress("hello", namespace))
    ingress, service = await wait_for_children(api, eventually, namespace, "hello")
    await api.patch(INGRESSES, namespace, "hello-new", {"spec": {"rules": []}})
    await api.patch(SERVICES, namespace, "hello-async", {"spec": {"externalName": "elsewhere.example.com"}})

    async def put_back() -> None:
        current_ingress, current_service = await children(api, namespace, "hello")
        assert current_ingress["spec"] == ingress["spec"]
        assert current_service["spec"]["externalName"] == PRODUCER

    await eventually(put_back)


async def test_parent_deletion_removes_children(api, eventually, namespace):
    await api.create(INGRESSES, kingress("hello", namespace))
    await wait_for_children(api, eventually, namespace, "hello")
    assert await api.delete(INGRESSES, namespace, "hello")

    async def gone() -> None:
        assert await children(api, namespace, "hello") == (None, None)

    await eventually(gone)


async def test_an_object_it_did_not_make_is_left_alone(api, eventually, namespace):
    squatter = kingress("hello-new", namespace, ingress_class=KOURIER)  # e.g. a Knative Service named hello-new
    squatter = await api.create(INGRESSES, squatter)
    await api.create(INGRESSES, kingress("hello", namespace))

    async def reported() -> None:
        ready = condition(await api.get(INGRESSES, namespace, "hello"))
        assert ready.get("status") == "False" and ready.get("reason") == r.REASON_NOT_OWNED, ready
        assert f"Ingress {namespace}/hello-new" in ready["message"]

    await eventually(reported)
    current = await api.get(INGRESSES, namespace, "hello-new")
    assert current["spec"] == squatter["spec"]
    assert current["metadata"]["resourceVersion"] == squatter["metadata"]["resourceVersion"]

    # deleting the parent removes its own Service, not the Ingress it does not own
    assert await api.get(SERVICES, namespace, "hello-async") is not None
    await api.delete(INGRESSES, namespace, "hello")

    async def service_gone() -> None:
        assert await api.get(SERVICES, namespace, "hello-async") is None

    await eventually(service_gone)
    assert await api.get(INGRESSES, namespace, "hello-new") is not None


def test_unknown_child_ingress_class_is_a_startup_error():
    env = dict(os.environ, INGRESS_CLASS_NAME="foo")
    result = subprocess.run([sys.executable, "-m", "async_component", "controller"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "INGRESS_CLASS_NAME='foo' is invalid" in lines[0]
    assert "kourier.ingress.networking.knative.dev" in lines[0]


# --- switching the async class on and off, with Kourier's and Serving's behaviour modelled


async def settle(eventually, check) -> None:
    await eventually(check, timeout=2 * DEADLINE)


@contextlib.asynccontextmanager
async def knative(api, cluster, namespace: str, serving_class: str):
    """The network layer (Kourier) and Serving's Route for a Service "hello" that wants ``serving_class``."""
    async with NetworkLayer(api, cluster.admin_info(), namespace, KOURIER) as layer, \
            Serving(api, cluster.admin_info(), namespace, "hello", lambda c: kingress("hello", namespace, ingress_class=c),
                    serving_class) as serving:
        yield layer, serving


async def served_by_the_layer(api, eventually, layer, namespace: str) -> dict:
    """Ingress "hello" made in the layer's class, once the layer translates it and holds it with its finalizer."""
    await api.create(INGRESSES, kingress("hello", namespace, ingress_class=KOURIER))

    async def translated() -> None:
        assert layer.translated.keys() == {"hello"}
        parent = await api.get(INGRESSES, namespace, "hello")
        assert parent["metadata"].get("finalizers") == [r.LAYER_FINALIZER]

    await settle(eventually, translated)
    return await api.get(INGRESSES, namespace, "hello")


async def test_turning_async_on_for_a_service_the_layer_already_serves(api, eventually, namespace, cluster, operator):
    async with knative(api, cluster, namespace, KOURIER) as (layer, serving):
        first = await served_by_the_layer(api, eventually, layer, namespace)
        await serving.switch(r.ASYNC_INGRESS_CLASS)

        async def async_now() -> None:
            parent = await api.get(INGRESSES, namespace, "hello")
            assert parent is not None and parent["metadata"]["uid"] != first["metadata"]["uid"], "not re-created yet"
            assert r.is_async_ingress(parent) and not parent["metadata"].get("finalizers"), parent["metadata"]
            assert layer.translated.keys() == {"hello-new"}, ("stale translation or conflict", layer.translated, layer.conflicts)
            ingress, service = await children(api, namespace, "hello")
            assert ingress is not None and service is not None
            assert ingress["metadata"]["ownerReferences"][0]["uid"] == parent["metadata"]["uid"]
            assert condition(parent).get("status") == "True", parent.get("status")

        await settle(eventually, async_now)
        assert serving.created == 1 + handed_over_again(operator, namespace)
        assert "became async while the network layer still serves it" in operator_log(operator, namespace)


async def test_turning_async_off_deletes_the_children_and_the_layer_takes_over(api, eventually, namespace, cluster,
                                                                               operator):
    async with knative(api, cluster, namespace, r.ASYNC_INGRESS_CLASS) as (layer, serving):
        await api.create(INGRESSES, kingress("hello", namespace))

        async def async_ready() -> None:
            assert layer.translated.keys() == {"hello-new"}
            assert condition(await api.get(INGRESSES, namespace, "hello")).get("status") == "True"

        await settle(eventually, async_ready)
        await serving.switch(KOURIER)

        async def sync_again() -> None:
            assert await children(api, namespace, "hello") == (None, None)
            assert layer.translated.keys() == {"hello"}, (layer.translated, layer.conflicts)
            parent = await api.get(INGRESSES, namespace, "hello")
            assert parent["metadata"].get("finalizers") == [r.LAYER_FINALIZER]  # the layer's own, as for any of its Ingresses

        await settle(eventually, sync_again)
        assert serving.created == 0

        # and back on: the layer served it meanwhile, so it is re-created once more
        await serving.switch(r.ASYNC_INGRESS_CLASS)

        async def async_again() -> None:
            assert layer.translated.keys() == {"hello-new"}, (layer.translated, layer.conflicts)
            assert all(await children(api, namespace, "hello"))

        await settle(eventually, async_again)
        assert serving.created == 1 + handed_over_again(operator, namespace)


HOLD = "example.com/hold"  # another controller's finalizer on the Ingress


async def test_an_ingress_that_leaves_in_the_async_class_after_the_hand_back_is_handed_over_again(
        api, eventually, namespace, cluster, operator):
    """Serving puts the async class back after the hand-back; it leaves the API so, and the layer keeps its translation.

    On a real API server this happens by chance when Serving's update lands
    while the release deletes the Ingress; here another finalizer holds the
    Ingress until Serving has put its class back, so it happens every time.
    """
    async with knative(api, cluster, namespace, KOURIER) as (layer, serving):
        parent = await served_by_the_layer(api, eventually, layer, namespace)
        await api.patch(INGRESSES, namespace, "hello", {"metadata": {
            "resourceVersion": parent["metadata"]["resourceVersion"], "finalizers": [r.LAYER_FINALIZER, HOLD]}})
        await serving.switch(r.ASYNC_INGRESS_CLASS)

        async def released_and_reverted() -> None:
            parent = await api.get(INGRESSES, namespace, "hello")
            assert parent["metadata"].get("deletionTimestamp") and parent["metadata"]["finalizers"] == [HOLD], parent
            assert r.is_async_ingress(parent), "Serving has not put its class back yet"

        await settle(eventually, released_and_reverted)
        await api.patch(INGRESSES, namespace, "hello", {"metadata": {"finalizers": []}})  # leaves in the async class

        async def async_now() -> None:
            parent = await api.get(INGRESSES, namespace, "hello")
            assert parent is not None and r.is_async_ingress(parent) and not parent["metadata"].get("finalizers")
            assert layer.translated.keys() == {"hello-new"}, ("stale translation", layer.translated, layer.conflicts)
            assert condition(parent).get("status") == "True", parent.get("status")

        await settle(eventually, async_now)
        assert handed_over_again(operator, namespace) >= 1
        assert serving.created == 1 + handed_over_again(operator, namespace)  # once more per unlucky deletion


async def test_deleting_a_service_right_after_the_switch_leaves_nothing_behind(api, eventually, namespace, cluster):
    async with knative(api, cluster, namespace, KOURIER) as (layer, serving):
        await api.create(INGRESSES, kingress("hello", namespace, ingress_class=KOURIER))

        async def translated() -> None:
            assert layer.translated.keys() == {"hello"}

        await settle(eventually, translated)
        serving.route_exists = False  # the Service goes: its Route no longer re-creates the Ingress
        await api.patch(INGRESSES, namespace, "hello", {"metadata": {
            "annotations": {r.INGRESS_CLASS_ANNOTATION: r.ASYNC_INGRESS_CLASS}}})
        await api.delete(INGRESSES, namespace, "hello")  # what the garbage collector does after the Route

        async def gone() -> None:
            assert await api.get(INGRESSES, namespace, "hello") is None, "stuck deleting"
            assert layer.translated == {}
            assert await children(api, namespace, "hello") == (None, None)

        await settle(eventually, gone)


def operator_log(operator: Operator, namespace: str) -> str:
    return "\n".join(line for line in operator.log_path.read_text(errors="replace").splitlines() if namespace in line)


def handed_over_again(operator: Operator, namespace: str) -> int:
    """How often the Ingress left in the async class after a hand-back (on a real API server, by chance)."""
    return operator_log(operator, namespace).count(f"left the API in class {r.ASYNC_INGRESS_CLASS} although it was handed back")


async def test_a_domain_mapping_parent_too_long_for_a_label_gets_valid_children(api, eventually, namespace):
    name = "shop." + "x" * 60 + ".example.com"  # a DomainMapping's Ingress is named after its domain
    parent = kingress(name, namespace)
    # labelled as Knative labels a DomainMapping's Ingress (a label value holds 63 characters: not the name)
    parent["metadata"]["labels"] = {"serving.knative.dev/domainMappingUID": "0b4a4a7e-5d0c-4b8e-9d0e-3c1f2b6a7d10",
                                    "serving.knative.dev/domainMappingNamespace": namespace}
    parent["spec"]["rules"] = [{"hosts": [name], "visibility": r.VISIBILITY_EXTERNAL, "http": {"paths": [{
        "rewriteHost": f"hello.{namespace}.svc.cluster.local",
        "splits": [{"serviceName": "hello", "serviceNamespace": namespace, "servicePort": 80, "percent": 100}]}]}}]
    parent = await api.create(INGRESSES, parent)
    ingress_name, service_name = r.child_ingress_name(parent), r.async_service_name(parent)
    assert (ingress_name, len(service_name)) == (f"{name}-new", 63)

    async def both() -> tuple[dict, dict]:
        found = (await api.get(INGRESSES, namespace, ingress_name), await api.get(SERVICES, namespace, service_name))
        assert all(found), found
        return found

    async def built() -> None:
        ingress, service = await both()
        assert service["metadata"]["labels"][r.PARENT_LABEL] != name  # hashed: a label value holds 63 characters
        replay = ingress["spec"]["rules"][0]["http"]["paths"][1]["splits"][0]["appendHeaders"]
        assert replay[r.ORIGINAL_HOST_HEADER] == f"hello.{namespace}.svc.cluster.local"

    await eventually(built)
    # a child's event finds its parent by its owner reference, whatever its label holds
    assert await api.delete(SERVICES, namespace, service_name)
    await eventually(built)
    assert await api.delete(INGRESSES, namespace, name)

    async def gone() -> None:
        assert await api.get(INGRESSES, namespace, ingress_name) is None
        assert await api.get(SERVICES, namespace, service_name) is None

    await eventually(gone)
