"""The kind e2e set-up, checked without Docker: the plan, the manifests it names, the tools it refuses to run without.

The real run (tox -e e2e-kourier / e2e-istio) needs a Docker engine; everything
it depends on that can be checked here is checked here: that each step's file
exists and parses, that images, ports, versions and Redis addresses agree
between the plan and the repository's manifests, that the plan prints, that a
missing Docker engine stops the run at once, and how steps become kubectl calls.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis as sync_redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "e2e"))

from kind import manifests, plan, switches, versions  # noqa: E402
from kind.backend import KindBackend, StreamNames, pod_ready, stream_names  # noqa: E402
from kind.cluster import Executor, Kubectl, KubectlError, RunningCluster, StepFailed, wait_command  # noqa: E402
from kind.portforward import PortForward, port_open  # noqa: E402
from kind.tools import DockerUnavailable, require_docker  # noqa: E402

from async_component.settings import INGRESS_CLASSES  # noqa: E402

PINNED = versions.load({})
LAYERS = plan.LAYERS


def kubectl_output(*args: str) -> str:
    return subprocess.run(["kubectl", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def steps_of(layer: str, kind: str) -> list[plan.Step]:
    return [step for step in plan.build_plan(layer, PINNED, ROOT) if step.kind == kind]


def rendered_overlay(layer: str) -> list[dict]:
    return manifests.kustomize(ROOT / plan.overlay(layer), kubectl_output)


# --- versions


def test_versions_are_the_pinned_ones():
    assert (PINNED.serving, PINNED.net_kourier, PINNED.net_istio, PINNED.eventing, PINNED.eventing_redis) == (
        "1.22.1", "1.22.1", "1.22.0", "1.22.2", "1.22.1")
    assert PINNED.kind == "v0.30.0"
    assert PINNED.node_image.startswith("kindest/node:v1.34.") and "@sha256:" in PINNED.node_image
    assert PINNED.release_url("serving", "serving-core.yaml") == (
        "https://github.com/knative/serving/releases/download/knative-v1.22.1/serving-core.yaml")
    assert PINNED.release_url("net_kourier", "kourier.yaml") == (
        "https://github.com/knative-extensions/net-kourier/releases/download/knative-v1.22.1/kourier.yaml")
    assert PINNED.release_url("eventing_redis", "redis-source.yaml") == (
        "https://github.com/knative-extensions/eventing-redis/releases/download/knative-v1.22.1/redis-source.yaml")
    assert PINNED.istio_kind_url() == (
        "https://raw.githubusercontent.com/knative-extensions/net-istio/knative-v1.22.0"
        "/third_party/istio-latest/istio-kind-no-mesh/istio.yaml")
    assert PINNED.kind_url("linux", "amd64") == (
        "https://github.com/kubernetes-sigs/kind/releases/download/v0.30.0/kind-linux-amd64")


def test_env_overrides_reach_the_plan():
    overridden = versions.load({
        "KNATIVE_SERVING_VERSION": "v1.22.3", "NET_ISTIO_VERSION": "knative-v1.22.4",
        "KIND_VERSION": "0.31.0", "KIND_NODE_IMAGE": "kindest/node:v1.35.0",
    })
    assert (overridden.serving, overridden.net_istio, overridden.kind) == ("1.22.3", "1.22.4", "v0.31.0")
    urls = [step.args["url"] for step in plan.build_plan("istio", overridden, ROOT) if step.kind == "kubectl-apply-url"]
    assert "https://github.com/knative/serving/releases/download/knative-v1.22.3/serving-crds.yaml" in urls
    assert any("net-istio/knative-v1.22.4/" in url for url in urls)
    assert any("net-istio/releases/download/knative-v1.22.4/net-istio.yaml" in url for url in urls)
    create = plan.build_plan("istio", overridden, ROOT)[0]
    assert create.args["image"] == "kindest/node:v1.35.0"
    assert set(versions.env_names().values()) >= {"KIND_VERSION", "KIND_NODE_IMAGE", "KNATIVE_SERVING_VERSION",
                                                  "NET_KOURIER_VERSION", "NET_ISTIO_VERSION",
                                                  "KNATIVE_EVENTING_VERSION", "EVENTING_REDIS_VERSION"}


@pytest.mark.parametrize("environ, message", [
    ({"KIND_VERSION": "v0.17.0"}, "kind >= v0.30.0"),
    ({"KIND_NODE_IMAGE": "kindest/node:v1.33.4"}, "Knative needs >= 1.34"),
    ({"KNATIVE_SERVING_VERSION": "latest"}, "KNATIVE_SERVING_VERSION='latest' is not a version"),
    ({"KUBERNETES_VERSION": "1.33.2"}, "KUBERNETES_VERSION=v1.33.2 is too old"),
    ({"ETCD_VERSION": "latest"}, "ETCD_VERSION='latest' is not a version"),
])
def test_versions_the_run_cannot_use_are_refused(environ, message):
    with pytest.raises(versions.VersionsError, match=message):
        versions.load(environ)


def test_tox_passes_the_version_overrides():
    tox = (ROOT / "tox.ini").read_text()

    def section(env: str) -> tuple[str, str]:
        text = tox.split(f"[testenv:{env}]")[1].split("\n[")[0]
        return text, text.split("pass_env")[1].split("\n")[0]

    kind_section, kind_pass_env = section("e2e-kourier")
    _, kube_pass_env = section("kube")
    for field, env in versions.env_names().items():
        # the control plane's own versions are for the kube backend (e2e/kube/), which builds it
        pass_env = kube_pass_env if field in ("kubernetes", "etcd") else kind_pass_env
        prefix = env.split("_")[0] + "_*"
        assert env in pass_env or prefix in pass_env, env
    assert "pytest-kind-ng==" in kind_section


# --- the plan against the repository


@pytest.mark.parametrize("layer", LAYERS)
def test_every_local_file_of_the_plan_exists_and_parses(layer):
    steps = plan.build_plan(layer, PINNED, ROOT)
    assert {step.kind for step in steps} <= set(plan.STEP_KINDS)
    for step in steps:
        for key in ("path", "config"):
            if key in step.args and step.kind != "kubectl-apply-kustomize":
                docs = manifests.load_docs((ROOT / step.args[key]).read_text())
                assert docs and all("apiVersion" in doc and "kind" in doc for doc in docs), step.name
        if step.kind == "docker-build":
            assert (ROOT / step.args["dockerfile"]).is_file()
            assert (ROOT / step.args["context"]).is_dir()
    (kustomize,) = steps_of(layer, "kubectl-apply-kustomize")
    assert kustomize.args["path"] == f"component/config/overlays/{layer}"
    docs = rendered_overlay(layer)
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    for name in plan.COMPONENT_DEPLOYMENTS:
        assert ("Deployment", name) in kinds
    for name in plan.COMPONENT_SERVICES:
        assert ("Service", name) in kinds
    waited = {name for wait in kustomize.waits for name in wait.names}
    assert waited == set(plan.COMPONENT_DEPLOYMENTS) | set(plan.COMPONENT_SERVICES)


@pytest.mark.parametrize("path", [plan.REDIS_MANIFEST, plan.KOURIER_NODEPORT_MANIFEST])
def test_own_manifests_are_valid_kubernetes(path):
    docs = manifests.load_docs((ROOT / path).read_text())
    assert docs, f"no documents in {path}"
    for doc in docs:
        kubernetes_validate.validate(doc, f"1.{versions.MIN_KUBERNETES_MINOR}.0", strict=True)


def test_sample_services_are_applied_and_waited_for():
    steps = steps_of("kourier", "kubectl-apply-file")
    by_path = {step.args["path"]: step for step in steps}
    for path, service in zip(plan.APP_MANIFESTS, plan.APP_SERVICES):
        (doc,) = manifests.load_docs((ROOT / path).read_text())
        assert (doc["kind"], doc["metadata"]["name"]) == ("Service", service)
        assert doc["metadata"].get("namespace", plan.APP_NAMESPACE) == plan.APP_NAMESPACE
        assert by_path[path].waits == (plan.Wait("ksvc", plan.APP_NAMESPACE, plan.READY, (service,)),)


@pytest.mark.parametrize("layer", LAYERS)
def test_images_agree_between_build_load_and_manifests(layer):
    built = {step.args["image"] for step in steps_of(layer, "docker-build")}
    loaded = {step.args["image"] for step in steps_of(layer, "kind-load")}
    assert built == loaded == {plan.COMPONENT_IMAGE, plan.APP_IMAGE}
    assert not any(image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1] for image in built)
    component_images = manifests.images(rendered_overlay(layer))
    assert component_images == {plan.COMPONENT_IMAGE}
    app_images = manifests.images(doc for path in plan.APP_MANIFESTS
                                  for doc in manifests.load_docs((ROOT / path).read_text()))
    assert app_images == {plan.APP_IMAGE}
    builds = {step.args["image"]: step for step in steps_of(layer, "docker-build")}
    assert builds[plan.COMPONENT_IMAGE].args["dockerfile"] == "component/Dockerfile"
    assert builds[plan.APP_IMAGE].args["context"] == "test/app"


def test_network_layer_steps_belong_to_their_layer():
    def urls(layer: str) -> list[str]:
        return [step.args["url"] for step in steps_of(layer, "kubectl-apply-url")]

    kourier, istio = urls("kourier"), urls("istio")
    assert any(url.endswith("/kourier.yaml") for url in kourier)
    assert not any("istio" in url for url in kourier)
    assert PINNED.istio_kind_url() in istio and "istio-kind-no-mesh" in PINNED.istio_kind_url()
    assert any(url.endswith("/net-istio.yaml") for url in istio)
    assert not any("kourier" in url for url in istio)
    kourier_files = [step.args["path"] for step in steps_of("kourier", "kubectl-apply-file")]
    istio_files = [step.args["path"] for step in steps_of("istio", "kubectl-apply-file")]
    assert plan.KOURIER_NODEPORT_MANIFEST in kourier_files and plan.KOURIER_NODEPORT_MANIFEST not in istio_files
    for layer in LAYERS:
        common = {url for url in urls(layer) if "serving/" in url or "eventing" in url}
        assert len(common) == 5, common  # serving crds+core, eventing crds+core, redis-source


@pytest.mark.parametrize("layer, ingress_class", list(zip(LAYERS, INGRESS_CLASSES)))
def test_knative_and_the_component_use_the_layer_ingress_class(layer, ingress_class):
    patches = {step.args["resource"]: step.args["patch"] for step in steps_of(layer, "kubectl-patch")}
    assert patches["configmap/config-network"] == {"data": {"ingress-class": ingress_class}}
    assert patches["configmap/config-domain"] == {"data": {"example.com": ""}}
    docs = rendered_overlay(layer)
    controller = manifests.find(docs, "Deployment", "async-controller")
    assert manifests.env_value(docs, controller, "INGRESS_CLASS_NAME") == ingress_class


def test_ports_agree_with_kind_config():
    config = yaml.safe_load((ROOT / plan.KIND_CONFIG).read_text())
    (node,) = config["nodes"]
    (mapping,) = node["extraPortMappings"]
    assert mapping["containerPort"] == plan.GATEWAY_NODE_PORT == 31080
    host_port = plan.gateway_host_port(ROOT)
    assert host_port == mapping["hostPort"]

    (nodeport,) = manifests.load_docs((ROOT / plan.KOURIER_NODEPORT_MANIFEST).read_text())
    assert nodeport["spec"]["type"] == "NodePort"
    assert nodeport["metadata"]["namespace"] == "kourier-system"
    assert nodeport["spec"]["selector"] == {"app": "3scale-kourier-gateway"}
    assert [(p["port"], p["nodePort"]) for p in nodeport["spec"]["ports"]] == [(80, 31080)]

    (patch,) = [step for step in steps_of("istio", "kubectl-patch") if "istio-ingressgateway" in step.args["resource"]]
    assert patch.args["type"] == "strategic"
    assert patch.args["patch"]["spec"]["ports"] == [{"name": "http2", "port": 80, "nodePort": 31080}]
    for layer in LAYERS:
        (probe,) = steps_of(layer, "http-get")
        assert urlsplit(probe.args["url"]).port == host_port


def test_kind_config_without_the_gateway_port_is_refused(tmp_path):
    (tmp_path / plan.KIND_CONFIG).write_text("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n"
                                             "  - role: control-plane\n")
    with pytest.raises(plan.PlanError, match="31080"):
        plan.build_plan("kourier", PINNED, tmp_path)
    with pytest.raises(plan.PlanError, match="layer must be one of"):
        plan.build_plan("contour", PINNED, ROOT)


def test_component_secret_points_at_the_cluster_redis():
    docs = manifests.load_docs((ROOT / plan.REDIS_MANIFEST).read_text())
    service = manifests.find(docs, "Service", "redis")
    deployment = manifests.find(docs, "Deployment", plan.REDIS_DEPLOYMENT)
    url = urlsplit(plan.REDIS_URL_IN_CLUSTER)
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert url.port == service["spec"]["ports"][0]["port"] == 6379
    assert deployment["metadata"]["namespace"] == plan.REDIS_NAMESPACE
    key, value = plan.REDIS_SELECTOR.split("=")
    assert deployment["spec"]["template"]["metadata"]["labels"][key] == value == service["spec"]["selector"][key]
    assert "--appendonly" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    (step,) = steps_of("kourier", "kubectl-apply-kustomize")
    applied = manifests.with_secret_value(rendered_overlay("kourier"), **step.args["secret"])
    secrets = [doc for doc in applied if doc["kind"] == "Secret" and doc["metadata"]["name"] == plan.REDIS_SECRET]
    assert len(secrets) == 1
    assert secrets[0]["stringData"][plan.REDIS_SECRET_KEY] == plan.REDIS_URL_IN_CLUSTER
    assert plan.REDIS_SECRET_KEY not in (secrets[0].get("data") or {})


def test_secret_override_replaces_data_or_adds_the_secret():
    docs = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "async-redis", "namespace": "knative-serving"},
             "data": {"url": "cmVkaXM6Ly9vbGQ="}}]
    changed = manifests.with_secret_value(docs, namespace="knative-serving", name="async-redis", key="url",
                                          value="redis://new:6379/0")
    assert changed[0]["stringData"] == {"url": "redis://new:6379/0"} and changed[0]["data"] == {}
    assert docs[0]["data"] == {"url": "cmVkaXM6Ly9vbGQ="}  # input untouched
    added = manifests.with_secret_value([], namespace="ns", name="s", key="k", value="v")
    assert added == [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "ns"},
                      "stringData": {"k": "v"}}]


def test_stream_names_follow_the_component_manifests():
    docs = rendered_overlay("kourier")
    names = stream_names(docs)
    consumer = manifests.find(docs, "Service", "async-consumer")
    for variable, value in (("STREAM_NAME", names.stream), ("DEAD_LETTER_STREAM", names.dead_letter_stream),
                            ("KEY_PREFIX", names.key_prefix)):
        assert manifests.env_value(docs, consumer, variable) in (None, value)
    assert stream_names([]) == StreamNames()
    config_map = {"kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"STREAM_NAME": "s2", "KEY_PREFIX": "p2"}}
    service = {"kind": "Service", "metadata": {"name": "async-consumer"}, "spec": {"template": {"spec": {
        "containers": [{"envFrom": [{"configMapRef": {"name": "cfg"}}],
                        "env": [{"name": "KEY_PREFIX", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "KEY_PREFIX"}}},
                                {"name": "DEAD_LETTER_STREAM", "value": "dead2"}]}]}}}}
    assert stream_names([config_map, service]) == StreamNames("s2", "dead2", "p2", StreamNames().group)


def test_redis_stream_source_manifest_reads_what_the_component_writes():
    path, source = switches.redis_stream_source_manifest(ROOT)
    assert path.is_file()
    spec = source["spec"]
    assert spec["address"].removeprefix("redis://").split("/")[0] == urlsplit(plan.REDIS_URL_IN_CLUSTER).netloc
    assert spec["stream"] == stream_names(rendered_overlay("kourier")).stream
    sink = spec["sink"]["ref"]
    assert (sink["kind"], sink["name"]) == ("Service", "async-consumer")
    assert sink.get("namespace", source["metadata"].get("namespace")) == plan.SYSTEM_NAMESPACE


# --- the printer and the Docker check, as a user runs them


@pytest.mark.parametrize("layer", LAYERS)
def test_plan_printer_shows_every_step_and_exits_0(layer):
    done = subprocess.run([sys.executable, "-m", "pytest", "e2e", "--e2e-plan", layer, "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for number, step in enumerate(plan.build_plan(layer, PINNED, ROOT), 1):
        assert f"{number:3}. {step.name}" in done.stdout
    assert "passed" not in done.stdout and "collected" not in done.stdout


def fake_tool(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(script))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_require_docker_without_docker_on_path(tmp_path):
    with pytest.raises(DockerUnavailable, match=r"^no Docker engine: `docker` is not on PATH"):
        require_docker(path=str(tmp_path))


def test_require_docker_when_the_engine_does_not_answer(tmp_path):
    fake_tool(tmp_path, "docker", """\
        import sys
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.", file=sys.stderr)
        sys.exit(1)
    """)
    with pytest.raises(DockerUnavailable) as failure:
        require_docker(path=str(tmp_path))
    assert str(failure.value) == ("no Docker engine: `docker info` failed: "
                                  "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")


def test_require_docker_does_not_hang_on_a_stuck_engine(tmp_path):
    fake_tool(tmp_path, "docker", "import time\ntime.sleep(60)\n")
    with pytest.raises(DockerUnavailable, match="did not answer within 0.5s"):
        require_docker(timeout=0.5, path=str(tmp_path))


def test_require_docker_returns_the_engine_version(tmp_path):
    fake_tool(tmp_path, "docker", "print('27.3.1')\n")
    assert require_docker(path=str(tmp_path)) == "27.3.1"


def test_kind_backend_without_docker_fails_at_once_in_one_line(tmp_path):
    conftest = (ROOT / "e2e" / "conftest.py").read_text()
    assert '"--backend"' in conftest and "print_plan_and_exit" in conftest
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "e2e", "--backend", "kourier", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "Exit: no Docker engine: `docker` is not on PATH (the kind e2e run needs Docker)"]


# --- how steps become kubectl calls


class FakeKubectl:
    """Records kubectl calls; answers from ``replies`` (args prefix -> list of outputs or exceptions)."""

    def __init__(self, replies: dict[tuple[str, ...], list] | None = None) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.replies = replies or {}

    def __call__(self, *args: str, input: str | None = None, **_: object) -> str:
        self.calls.append((args, input))
        if args[0] == "kustomize":
            return kubectl_output(*args)
        for prefix, outputs in self.replies.items():
            if args[:len(prefix)] == prefix and outputs:
                reply = outputs.pop(0)
                if isinstance(reply, BaseException):
                    raise reply
                return reply
        return ""


def failed(stderr: str) -> subprocess.CalledProcessError:
    return subprocess.CalledProcessError(1, ["kubectl"], output="", stderr=stderr)


def executor(fake: FakeKubectl, *, reused: bool = False, lines: list[str] | None = None) -> Executor:
    return Executor(Kubectl(fake), ROOT, (lines if lines is not None else []).append, create=lambda _: None,
                    load_image=lambda _: None, reused=reused, retry_pause=0.01)


def test_wait_commands():
    assert wait_command(plan.Wait("deployment", "ns", "Available", ("a", "b")), 90.5) == [
        "wait", "--for=condition=Available", "deployment/a", "deployment/b", "-n", "ns", "--timeout=90s"]
    assert wait_command(plan.Wait("crd", None, "Established"), 30) == [
        "wait", "--for=condition=Established", "crd", "--all", "--timeout=30s"]
    assert wait_command(plan.Wait("pod", "ns", "Ready", selector="x=y"), 0.2) == [
        "wait", "--for=condition=Ready", "pod", "-l", "x=y", "-n", "ns", "--timeout=1s"]
    assert wait_command(plan.Wait("statefulset", "ks", plan.ROLLED_OUT, ("c",)), 60) == [
        "rollout", "status", "statefulset/c", "-n", "ks", "--timeout=60s"]


@pytest.mark.parametrize("layer", LAYERS)
def test_kubectl_steps_run_in_order_with_their_waits(layer):
    fake = FakeKubectl()
    lines: list[str] = []
    steps = [step for step in plan.build_plan(layer, PINNED, ROOT)
             if step.kind.startswith("kubectl-") or step.kind == "restart-pods"]
    executor(fake, lines=lines).run(steps)
    applied = [args for args, _ in fake.calls if args[0] in ("apply", "patch")]
    assert len(applied) == len(steps) - 2  # the two restart steps are skipped on a fresh cluster
    urls = [args[2] for args in applied if args[:2] == ("apply", "-f") and args[2].startswith("https://")]
    assert urls == [step.args["url"] for step in steps if step.kind == "kubectl-apply-url"]
    (stdin,) = [text for args, text in fake.calls if args == ("apply", "-f", "-")]
    secret = manifests.find(manifests.load_docs(stdin), "Secret", plan.REDIS_SECRET)
    assert secret["stringData"]["url"] == plan.REDIS_URL_IN_CLUSTER
    waits = [args for args, _ in fake.calls if args[0] in ("wait", "rollout")]
    assert ("wait", "--for=condition=Ready", "ksvc/async-producer", "ksvc/async-consumer", "-n",
            "knative-serving") == waits[-4][:6]
    assert sum("skipped (fresh cluster)" in line for line in lines) == 2


def test_restart_steps_run_on_a_reused_cluster():
    fake = FakeKubectl()
    steps = [step for step in plan.build_plan("kourier", PINNED, ROOT) if step.kind == "restart-pods"]
    executor(fake, reused=True).run(steps)
    calls = [args for args, _ in fake.calls]
    assert ("rollout", "restart", "deployment/async-source", "-n", "knative-serving") in calls
    assert ("delete", "pod", "-l", "serving.knative.dev/service=helloworld-sleep-plain", "-n", "default") in calls
    restarted = calls.index(("rollout", "restart", "deployment/async-controller", "-n", "knative-serving"))
    status = [i for i, args in enumerate(calls) if args[:3] == ("rollout", "status", "deployment/async-controller")]
    assert status and status[0] > restarted


def test_apply_is_retried_while_a_webhook_refuses():
    fake = FakeKubectl({("patch",): [failed('Internal error occurred: failed calling webhook "config.webhook"'), ""]})
    lines: list[str] = []
    (step,) = [s for s in steps_of("kourier", "kubectl-patch") if "config-domain" in s.args["resource"]]
    executor(fake, lines=lines).run([step])
    assert [args[0] for args, _ in fake.calls] == ["patch", "patch"]
    assert any("retrying" in line and "failed calling webhook" in line for line in lines)


def test_a_wait_that_times_out_names_the_step_and_what_was_not_ready():
    fake = FakeKubectl({("wait",): [failed("error: timed out waiting for the condition on services/async-producer")]})
    (step,) = steps_of("kourier", "kubectl-apply-kustomize")
    with pytest.raises(StepFailed) as failure:
        executor(fake).run([step])
    message = str(failure.value)
    assert "install the component (kourier overlay)" in message
    assert "deployment async-controller, async-source in knative-serving Available" in message
    assert "timed out waiting for the condition on services/async-producer" in message


def test_a_wait_retries_while_the_objects_do_not_exist_yet():
    fake = FakeKubectl({("wait",): [failed("error: no matching resources found"), ""]})
    step = plan.Step("wait for pods", "kubectl-patch", {"resource": "configmap/x", "namespace": "ns",
                                                         "type": "merge", "patch": {}},
                     (plan.Wait("pod", "ns", "Ready", selector="a=b"),))
    executor(fake).run([step])
    assert [args[0] for args, _ in fake.calls] == ["patch", "wait", "wait"]


# --- pure helpers of the backend and the switches


def test_pod_ready_and_ingress_settled():
    ready = {"metadata": {"name": "p"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert pod_ready(ready)
    assert not pod_ready({**ready, "metadata": {"name": "p", "deletionTimestamp": "2024-01-01T00:00:00Z"}})
    assert not pod_ready({"metadata": {"name": "p"}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    ingress = {"metadata": {"generation": 2, "annotations": {"networking.knative.dev/ingress.class": "x"}},
               "status": {"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True"}]}}
    assert switches.ingress_settled(ingress, "x")
    assert not switches.ingress_settled(ingress, "y")
    assert not switches.ingress_settled({**ingress, "metadata": {**ingress["metadata"], "generation": 3}}, "x")


def test_switches_refuse_a_backend_that_is_not_kind():
    with pytest.raises(TypeError, match="kind backend"):
        with switches.async_by_default(object()):
            pass


def test_source_group_moves_past_what_another_source_delivered(redis_url):
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.xadd("s", {"data": "1"})
        client.xgroup_create("s", "ours", "0")
        client.xadd("s", {"data": "2"})
        switches.move_group_to_end(client, "s", "ours")
        assert client.xreadgroup("ours", "c", {"s": ">"}) == []
        client.xadd("s", {"data": "3"})
        [[_, entries]] = client.xreadgroup("ours", "c", {"s": ">"})
        assert [fields[b"data"] for _, fields in entries] == [b"3"]
        reader = sync_redis.Redis.from_url(redis_url)
        before = switches.stream_readers(client)
        reader.xreadgroup("ours", "c", {"s": ">"}, block=10)
        assert len(switches.stream_readers(client) - before) == 1
        reader.close()
        switches.move_group_to_end(client, "fresh", "new-group")  # neither stream nor group yet
        assert switches.group_names(client, "fresh") == {"new-group"}
    finally:
        client.close()


# --- port-forwards that keep their port


FAKE_PORT_FORWARD = """\
    import os, socket, sys, threading
    # argv: port-forward -n NS TARGET LOCAL:REMOTE --address 127.0.0.1
    target, local = sys.argv[4], int(sys.argv[5].split(":")[0])
    with open(os.environ["FORWARD_LOG"], "a") as log:
        log.write(target + "\\n")
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", local))
    server.listen()

    def pipe(source, sink):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.close()

    while True:
        conn, _ = server.accept()
        if os.environ.get("FORWARD_TO"):  # relay to a real server, as kubectl relays to the pod
            upstream = socket.create_connection(("127.0.0.1", int(os.environ["FORWARD_TO"])))
            threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        else:
            conn.sendall(target.encode())
            conn.close()
"""


@pytest.mark.slow
def test_port_forward_keeps_its_port_across_restarts(tmp_path, monkeypatch):
    log = tmp_path / "forwards.log"
    monkeypatch.setenv("FORWARD_LOG", str(log))
    kubectl = fake_tool(tmp_path / "bin", "kubectl", FAKE_PORT_FORWARD)
    targets = iter(f"pod/p{i}" for i in range(100))
    forward = PortForward(kubectl, tmp_path / "kubeconfig", "ns", lambda: next(targets), 8012)
    forward.start(timeout=20)
    try:
        assert port_open(forward.local_port)
        port = forward.local_port
        forward.restart(timeout=20)  # on purpose: resolves the target again
        assert forward.local_port == port and port_open(port)
        forward._process.kill()  # as when the pod behind it went away
        deadline = time.monotonic() + 20
        while log.read_text().splitlines() != ["pod/p0", "pod/p1", "pod/p2"] or not port_open(port):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        forward.pause()
        time.sleep(1.5)
        assert not port_open(port)  # paused: not restarted while Redis is meant to be down
    finally:
        forward.close()
    assert forward.url == f"http://127.0.0.1:{port}"


def test_kubectl_errors_carry_kubectls_message():
    def call(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["kubectl"], output="", stderr="Error from server (NotFound): x")

    with pytest.raises(KubectlError, match=r"kubectl get pod x: Error from server \(NotFound\): x"):
        Kubectl(call).run("get", "pod", "x")


# --- the backend and the switches against a cluster that only answers kubectl


def pod(name: str) -> dict:
    return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


class FakeCluster:
    """Just enough of a cluster's kubectl for KindBackend and the switches; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.pods = {"serving.knative.dev/service=async-producer": [pod("producer-1")],
                     "serving.knative.dev/service=async-consumer": [pod("consumer-1")],
                     "app.kubernetes.io/component=source": [pod("source-1")],
                     plan.REDIS_SELECTOR: [pod("redis-1")]}
        self.after_delete: list[list[dict]] = []
        self.ingress_class = INGRESS_CLASSES[0]
        self.annotations: dict[str, dict] = {"async-producer": {}, "async-consumer": {}}

    def __call__(self, *args: str, input: str | None = None, **_: object) -> str:
        self.calls.append(args)
        if args[:2] == ("get", "pods"):
            selector = args[args.index("-l") + 1]
            items = self.pods[selector]
            if not items and self.after_delete:
                self.pods[selector] = self.after_delete.pop(0)
            return json.dumps({"items": items})
        if args[:2] == ("get", "deployment"):
            return json.dumps({"spec": {"replicas": 1, "selector": {"matchLabels": {
                "app.kubernetes.io/component": "source"}}}})
        if args[:3] == ("get", "configmap/config-network", "-n"):
            return json.dumps({"data": {"ingress-class": self.ingress_class}})
        if args[:2] == ("get", "ksvc"):  # Serving has made each spec its Ready revision
            ready = {"observedGeneration": 1, "latestReadyRevisionName": "r-1", "latestCreatedRevisionName": "r-1",
                     "conditions": [{"type": "Ready", "status": "True"}]}
            return json.dumps({"metadata": {"name": args[2], "generation": 1,
                                            "annotations": self.annotations[args[2]]}, "status": ready})
        if args[:2] == ("get", switches.INGRESS_RESOURCE):
            ready = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}
            items = [{"metadata": {"name": name, "generation": 1,
                                   "annotations": {"networking.knative.dev/ingress.class": self.ingress_class}},
                      "status": ready} for name in ("helloworld-sleep-plain",)]
            if self.ingress_class == switches.ASYNC_INGRESS_CLASS:  # the controller made the child
                items.append({"metadata": {"name": "helloworld-sleep-plain-new", "generation": 1,
                                           "labels": {switches.PARENT_LABEL: "helloworld-sleep-plain"},
                                           "annotations": {"networking.knative.dev/ingress.class": INGRESS_CLASSES[0]}},
                              "status": ready})
            return json.dumps({"items": items})
        if args[:2] == ("patch", "configmap/config-network"):
            value = json.loads(args[args.index("-p") + 1])["data"]["ingress-class"]
            self.ingress_class = value
        if args[:2] == ("delete", "pod"):
            for selector, items in self.pods.items():
                if any(p["metadata"]["name"] in args for p in items):
                    self.pods[selector] = []
        if args[:2] == ("scale", f"deployment/{plan.REDIS_DEPLOYMENT}"):
            self.pods[plan.REDIS_SELECTOR] = [] if args[-1] == "--replicas=0" else [pod("redis-2")]
        if args[0] == "annotate":
            key, _, value = args[-1].partition("=")
            if key.endswith("-"):
                self.annotations[args[2]].pop(key[:-1], None)
            else:
                self.annotations[args[2]][key] = value
        return ""


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("FORWARD_LOG", str(tmp_path / "forwards.log"))
    cluster = FakeCluster()
    running = RunningCluster("c", "kourier", Kubectl(cluster), fake_tool(tmp_path / "bin", "kubectl", FAKE_PORT_FORWARD),
                             tmp_path / "kubeconfig", "http://127.0.0.1:31080", ROOT)
    return cluster, running, tmp_path / "forwards.log"


@pytest.mark.slow
def test_killed_consumer_comes_back_behind_the_same_url(fake_cluster):
    cluster, running, log = fake_cluster
    cluster.after_delete = [[], [pod("consumer-2")]]  # the ReplicaSet needs a moment
    with KindBackend(running, StreamNames()) as backend:
        url = backend.consumer_url
        backend.kill("consumer")
        assert ("delete", "pod", "consumer-1", "-n", "knative-serving", "--grace-period=0", "--force",
                "--wait=false") in cluster.calls
        backend.wait_ready("consumer", timeout=20)
        assert backend.consumer_url == url and port_open(urlsplit(url).port)
        assert log.read_text().splitlines()[-1] == "pod/consumer-2"


def test_killed_source_pods_are_found_by_the_deployments_selector(fake_cluster):
    cluster, running, _ = fake_cluster
    backend = KindBackend(running, StreamNames())
    assert backend.host("helloworld-sleep") == f"helloworld-sleep.default.{plan.DOMAIN}"  # config-domain's
    assert backend.gateway_url == running.gateway_url and backend.name == "kourier"
    backend.kill("source")
    assert ("delete", "pod", "source-1", "-n", "knative-serving", "--grace-period=0", "--force",
            "--wait=false") in cluster.calls
    with pytest.raises(RuntimeError, match="no pod of deployment async-source"):
        backend.kill("source")


def test_redis_outage_scales_redis_and_its_url_works_again(fake_cluster, redis_server, monkeypatch):
    cluster, running, log = fake_cluster
    monkeypatch.setenv("FORWARD_TO", str(redis_server.port))
    with KindBackend(running, StreamNames()) as backend:
        client = sync_redis.Redis.from_url(backend.redis_url)
        client.set("kept", "1")
        backend.stop_redis()
        assert ("scale", "deployment/redis", "-n", "redis", "--replicas=0") in cluster.calls
        backend.start_redis()
        assert ("scale", "deployment/redis", "-n", "redis", "--replicas=1") in cluster.calls
        assert sync_redis.Redis.from_url(backend.redis_url).get("kept") == b"1"
        assert log.read_text().splitlines().count("svc/redis") == 2  # re-established after the restart


def test_async_by_default_switches_the_class_and_restores_it(fake_cluster):
    cluster, running, _ = fake_cluster
    backend = KindBackend(running, StreamNames())
    layer_class = INGRESS_CLASSES[0]
    with switches.async_by_default(backend, timeout=10):
        assert cluster.ingress_class == "async.ingress.networking.knative.dev"
        # the component's own Services stay on the layer (no loop back to the producer)
        assert cluster.annotations["async-producer"] == {"networking.knative.dev/ingress.class": layer_class}
        assert cluster.annotations["async-consumer"] == {"networking.knative.dev/ingress.class": layer_class}
    assert cluster.ingress_class == layer_class
    assert cluster.annotations == {"async-producer": {}, "async-consumer": {}}


def test_redis_stream_source_replaces_our_source_and_hands_back(fake_cluster, redis_server, monkeypatch):
    cluster, running, _ = fake_cluster
    monkeypatch.setenv("FORWARD_TO", str(redis_server.port))
    direct = sync_redis.Redis.from_url(redis_server.url)
    adapter = sync_redis.Redis.from_url(redis_server.url)
    names = StreamNames()
    answer = cluster.__call__

    def kubectl(*args: str, **kwargs: object) -> str:
        if args[:2] == ("scale", "deployment/async-source"):
            cluster.pods["app.kubernetes.io/component=source"] = [] if args[-1] == "--replicas=0" else [pod("s-2")]
        if args[:3] == ("wait", "--for=condition=Ready", "redisstreamsource/async-requests"):
            # the adapter starts: it joins the group with its first read
            switches.move_group_to_end(direct, names.stream, names.group)
            adapter.xreadgroup(names.group, "rss-adapter-0", {names.stream: ">"}, block=10)
        if args[0] == "delete" and "-f" in args:  # the adapter destroys its group as it shuts down
            adapter.xgroup_destroy(names.stream, names.group)
            adapter.close()
        return answer(*args, **kwargs)

    running.kubectl = Kubectl(kubectl)
    with KindBackend(running, names) as backend:
        with switches.redis_stream_source(backend, timeout=20):
            assert cluster.pods["app.kubernetes.io/component=source"] == []
            direct.xadd(names.stream, {"data": "delivered by the RedisStreamSource"})
        assert cluster.pods["app.kubernetes.io/component=source"] == [pod("s-2")]
    # the producer queued in the single stream while the adapter ran, and per Service again after
    modes = [json.loads(args[-1]) for args in cluster.calls if args[:2] == ("patch", switches.DATAPLANE_CONFIG)]
    assert modes == [{"data": {"QUEUE_MODE": "single-stream"}}, {"data": {"QUEUE_MODE": "per-service"}}]
    revisions = [args for args in cluster.calls if args[:3] == ("patch", "ksvc", "async-producer")]
    assert [json.loads(args[-1])["spec"]["template"]["metadata"]["annotations"] for args in revisions] == [
        {switches.QUEUE_MODE_ANNOTATION: "single-stream"}, {switches.QUEUE_MODE_ANNOTATION: "per-service"}]
    calls = [args[:3] for args in cluster.calls]
    order = [calls.index(("delete", "secret", "tls-secret")),
             calls.index(("rollout", "restart", "statefulset/redis-controller-manager")),
             calls.index(("scale", "deployment/async-source", "-n")),
             calls.index(("apply", "-f", str(ROOT / switches.REDIS_STREAM_SOURCE_MANIFEST)))]
    assert order == sorted(order)
    # our source's group is back, past what the RedisStreamSource delivered
    assert direct.xreadgroup(names.group, "ours", {names.stream: ">"}) == []
    direct.close()


@pytest.mark.parametrize("doc", ["component/config/README.md", switches.REDIS_STREAM_SOURCE_MANIFEST])
def test_the_docs_give_the_redis_stream_source_steps_the_e2e_runs(doc):
    """Users meet the RedisStreamSource through these steps; the kind test runs the same ones, in the same order."""
    _, source = switches.redis_stream_source_manifest(ROOT)
    text = (ROOT / doc).read_text()
    positions = []
    for step in switches.enable_steps(source):
        line = "kubectl " + " ".join(step)
        assert line in text, f"{doc} lacks: {line}"
        positions.append(text.index(line))
    assert positions == sorted(positions), f"{doc} gives the steps in another order"
