"""The deployment manifests and the image: valid, and consistent with the code.

A manifest that `kubectl apply` accepts can still ship a pod that exits at
start (an env var no settings class reads, a value its parser rejects), a
probe on the wrong port, or a timeout shorter than the one it wraps; these
tests read the manifests the way the cluster and the processes would.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from async_component import cli, settings
from async_component.dataplane.replay import replay_grace
from async_component.dataplane.source import drain_grace
from async_component.controller.resources import INGRESS_CLASS_ANNOTATION

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "component" / "config"
BASE = CONFIG / "base"
OVERLAYS = {"kourier": "kourier.ingress.networking.knative.dev", "istio": "istio.ingress.networking.knative.dev",
            "openshift": "kourier.ingress.networking.knative.dev"}
# Where each overlay's network layer runs its gateway pods, and their labels (README "NetworkPolicy").
GATEWAYS = {"kourier": ("kourier-system", {"app": "3scale-kourier-gateway"}),
            "istio": ("istio-system", {"istio": "ingressgateway"}),
            "openshift": ("knative-serving-ingress", {"app": "3scale-kourier-gateway"})}
TLS_COMPONENT = CONFIG / "components" / "redis-tls"
SECRET_NAME_COMPONENT = CONFIG / "components" / "redis-secret-name"
KEDA_COMPONENT = CONFIG / "components" / "keda"
MONITORING_COMPONENT = CONFIG / "components" / "monitoring"
DATAPLANE_CONFIG = "async-dataplane"
REDIS_SECRET = "async-redis"
# The Secret the README has the user create (no manifest ships one): url, optional username and password.
USER_SECRET = {"url": "redis://redis.redis.svc.cluster.local:6379/0", "username": "async", "password": "s3cret"}
OPTIONAL = CONFIG / "optional"
DOCKERFILE = ROOT / "component" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
RELEASE_SCRIPT = ROOT / "scripts" / "render-release.py"
RELEASE_DIR = ROOT / "release"
SCALED_OBJECT = ("keda.sh/v1alpha1", "ScaledObject")
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")
POD_MONITOR = ("monitoring.coreos.com/v1", "PodMonitor")
# The name Knative gives the user container's port in every revision's pods (knative.dev/serving UserPortName).
KNATIVE_USER_PORT = "user-port"

NAMESPACE = settings.DEFAULT_SYSTEM_NAMESPACE
# Knative Serving 1.22 needs Kubernetes >= 1.34 (e2e/kind/versions.py); the
# manifests must also hold on the newest release the schemas cover.
MIN_KUBERNETES = "1.34"
NEWEST_KUBERNETES = kubernetes_validate.latest_version()

KSVC = ("serving.knative.dev/v1", "Service")
REDIS_STREAM_SOURCE = ("sources.knative.dev/v1alpha1", "RedisStreamSource")
KNATIVE_MAX_REVISION_TIMEOUT = 600  # config-defaults max-revision-timeout-seconds
KNATIVE_RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
# Fields Knative Serving's webhook accepts with its default feature flags
# (knative.dev/serving pkg/apis/serving/fieldmask.go).
KNATIVE_REVISION_SPEC = {"containers", "volumes", "serviceAccountName", "imagePullSecrets", "enableServiceLinks",
                         "automountServiceAccountToken", "timeoutSeconds", "containerConcurrency",
                         "idleTimeoutSeconds", "responseStartTimeoutSeconds"}
KNATIVE_CONTAINER = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                     "livenessProbe", "ports", "readinessProbe", "resources", "securityContext", "startupProbe",
                     "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
KNATIVE_SECURITY_CONTEXT = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                            "allowPrivilegeEscalation", "seccompProfile", "privileged"}

EXPECTED_RULES = {
    # (apiGroup, resource): verbs -- what controller.py and kubeapi.py call, plus kopf's list/watch
    ("networking.internal.knative.dev", "ingresses"): {"get", "list", "watch", "create", "patch", "delete"},
    ("networking.internal.knative.dev", "ingresses/status"): {"patch"},
    # blockOwnerDeletion on the children (OwnerReferencesPermissionEnforcement)
    ("networking.internal.knative.dev", "ingresses/finalizers"): {"update"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create"},
}


# --- loading


def load_yaml(source: Path | str) -> list[Any]:
    text = source.read_text() if isinstance(source, Path) else source
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


@functools.cache
def kustomize(path: Path) -> tuple[dict, ...]:
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed: {result.stderr}"
    return tuple(load_yaml(result.stdout))


def write_overlay(directory: Path, **fields: Any) -> Path:
    """A user's overlay in ``directory``; ``resources``/``components`` are given as absolute paths."""
    directory.mkdir(parents=True, exist_ok=True)
    for listed in ("resources", "components"):
        if listed in fields:
            fields[listed] = [os.path.relpath(path, directory) for path in fields[listed]]
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(fields))
    return directory


def base_files() -> list[Path]:
    return [BASE / name for name in load_yaml(BASE / "kustomization.yaml")[0]["resources"]]


def plain_objects() -> list[dict]:
    """Every object a user could `kubectl apply -f` file by file."""
    files = base_files() + sorted(OPTIONAL.glob("*.yaml"))
    return [doc for path in files for doc in load_yaml(path)]


def renders() -> dict[str, tuple[dict, ...]]:
    return {name: kustomize(CONFIG / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def tls_render(tmp_path_factory) -> tuple[dict, ...]:
    overlay = write_overlay(tmp_path_factory.mktemp("tls") / "overlay",
                            resources=[CONFIG / "overlays" / "kourier"], components=[TLS_COMPONENT])
    return kustomize(overlay)


# A user's overlay with every optional component: TLS, their own Secret's name, KEDA, monitoring.
MY_SECRET = "team-redis"


@pytest.fixture(scope="module")
def options_render(tmp_path_factory) -> tuple[dict, ...]:
    overlay = write_overlay(
        tmp_path_factory.mktemp("options") / "overlay",
        resources=[CONFIG / "overlays" / "kourier"],
        components=[TLS_COMPONENT, SECRET_NAME_COMPONENT, KEDA_COMPONENT, MONITORING_COMPONENT],
        configMapGenerator=[{"name": "async-redis-secret-name", "literals": [f"name={MY_SECRET}"],
                             "options": {"disableNameSuffixHash": True,
                                         "annotations": {"config.kubernetes.io/local-config": "true"}}}])
    return kustomize(overlay)


def load_release_script():
    spec = importlib.util.spec_from_file_location("render_release", RELEASE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def releases() -> dict[str, list[dict]]:
    return {f"release/{path.name}": load_yaml(path) for path in sorted(RELEASE_DIR.glob("*.yaml"))}


def key(obj: dict) -> tuple[str, str]:
    return obj["apiVersion"], obj["kind"]


def find(objects, api_kind: tuple[str, str], name: str) -> dict:
    matches = [o for o in objects if key(o) == api_kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {api_kind[1]} {name}, found {len(matches)}"
    return matches[0]


def workloads(objects) -> Iterator[dict]:
    """Deployments and Knative Services: the objects that run our image."""
    return (o for o in objects if key(o) in (("apps/v1", "Deployment"), KSVC))


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict) -> dict:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1, f"{obj['metadata']['name']}: one container expected"
    return containers[0]


def env_of(obj: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container(obj).get("env", [])}


def image_reference() -> str:
    (entry,) = load_yaml(BASE / "kustomization.yaml")[0]["images"]
    return f"{entry['name']}:{entry['newTag']}"


# --- what a pod would see


def settings_class(obj: dict) -> type:
    command = container(obj)["args"][0]
    assert command in cli.COMMANDS, f"{obj['metadata']['name']}: {command!r} is not an async-component subcommand"
    cls = cli.COMMANDS[command][1]
    assert cls is not None, f"{command} takes flags, not settings from the environment"
    return cls


def resolve_env(obj: dict, objects, secret: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the container starts with, as the kubelet and Knative would build it.

    ``secret`` is the Redis Secret's data as the user created it (default: :data:`USER_SECRET`, with a
    rediss:// URL when the container mounts a CA, as components/redis-tls says).
    """
    environ: dict[str, str] = {}
    if secret is None:
        secret = dict(USER_SECRET)
        if any(m["name"] == "redis-ca" for m in container(obj).get("volumeMounts", [])):
            secret["url"] = secret["url"].replace("redis://", "rediss://", 1)
    if key(obj) == KSVC:
        environ["PORT"] = str(container(obj)["ports"][0]["containerPort"])
    for source in container(obj).get("envFrom", []):
        config_map = find(objects, ("v1", "ConfigMap"), source["configMapRef"]["name"])
        environ.update(config_map["data"])
    for name, item in env_of(obj).items():
        if "value" in item:
            environ[name] = item["value"]
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            assert field in ("metadata.namespace", "metadata.name"), f"{name}: unexpected fieldRef"
            environ[name] = obj["metadata"]["namespace"] if field == "metadata.namespace" else f"{obj['metadata']['name']}-0"
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = find(objects, ("v1", "ConfigMap"), ref["name"])["data"]
            if ref["key"] in data:
                environ[name] = data[ref["key"]]
            else:
                assert ref.get("optional") is True, f"{name}: the ConfigMap lacks {ref['key']} and it is not optional"
        else:
            ref = source["secretKeyRef"]
            assert ref["name"] in (REDIS_SECRET, MY_SECRET), f"{name}: only the Redis Secret is read"
            if ref["key"] in secret:
                environ[name] = secret[ref["key"]]
            else:
                assert ref.get("optional") is True, f"{name}: the Secret lacks {ref['key']} and it is not optional"
    return environ


def process_settings(obj: dict, objects):
    return settings.load(settings_class(obj), environ=resolve_env(obj, objects))


def fields_by_env(cls: type) -> dict[str, dataclasses.Field]:
    out = {}
    for field in dataclasses.fields(cls):
        out[field.metadata["env"]] = field
        if field.metadata["alias"]:
            out[field.metadata["alias"]] = field
    return out


def probe_port(obj: dict, probe: dict) -> int:
    """The port a probe hits: Knative probes the serving port when none is given."""
    port = probe["httpGet"].get("port")
    ports = container(obj).get("ports", [])
    if port is None:
        assert key(obj) == KSVC, "only Knative fills in a probe's port"
        return ports[0]["containerPort"]
    if isinstance(port, str):
        return next(p["containerPort"] for p in ports if p.get("name") == port)
    return port


# --- every file parses; every object is valid


def test_every_yaml_file_under_config_parses_and_every_base_file_is_a_kustomize_resource():
    yaml_files = sorted(CONFIG.rglob("*.yaml"))
    assert yaml_files
    for path in yaml_files:
        assert load_yaml(path), f"{path} is empty"
    listed = {path.name for path in base_files()}
    on_disk = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "base/kustomization.yaml must list every file in base/"


def test_schema_versions_cover_the_kubernetes_knative_needs():
    assert kubernetes_validate.utils.major_minor(NEWEST_KUBERNETES) >= kubernetes_validate.utils.major_minor(MIN_KUBERNETES)


@pytest.mark.parametrize("version", [MIN_KUBERNETES, NEWEST_KUBERNETES])
def test_builtin_kinds_validate_against_the_kubernetes_schemas(version, tls_render, options_render):
    sets = {"plain files": plain_objects(), **renders(), "kourier + redis-tls": tls_render,
            "kourier + every optional component": options_render, **releases()}
    for label, objects in sets.items():
        assert objects, label
        for obj in objects:
            if key(obj) in (KSVC, REDIS_STREAM_SOURCE, SCALED_OBJECT, SERVICE_MONITOR, POD_MONITOR):
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{label}: {obj['kind']} {obj['metadata']['name']} is invalid for {version}: {exc.message}")


def knative_revision_errors(ksvc: dict) -> list[str]:
    """What Knative Serving's webhook (default features) would reject in a Service's revision template."""
    spec = pod_spec(ksvc)
    errors = [f"revision field {f} is not allowed" for f in set(spec) - KNATIVE_REVISION_SPEC]
    if spec.get("automountServiceAccountToken", False) is not False:
        errors.append("automountServiceAccountToken may only be false")
    ctr = container(ksvc)
    errors += [f"container field {f} is not allowed" for f in set(ctr) - KNATIVE_CONTAINER]
    errors += [f"securityContext.{f} is not allowed" for f in set(ctr.get("securityContext", {})) - KNATIVE_SECURITY_CONTEXT]
    errors += [f"{item['name']} is reserved" for item in ctr.get("env", []) if item["name"] in KNATIVE_RESERVED_ENV]
    errors += [f"{item['name']}: fieldRef needs a feature flag" for item in ctr.get("env", [])
               if "fieldRef" in item.get("valueFrom", {})]
    ports = ctr.get("ports", [])
    if len(ports) != 1 or ports[0].get("name", "") not in ("", "http1", "h2c"):
        errors.append("exactly one port, named '', http1 or h2c")
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = ctr.get(probe_name)
        if probe and probe["httpGet"].get("port") not in (None, ports[0]["containerPort"] if ports else None):
            errors.append(f"{probe_name} must probe the serving port")
    readiness = ctr.get("readinessProbe", {})
    if readiness.get("periodSeconds", 0) > 0 and not all(readiness.get(f, 0) >= 1 for f in
                                                        ("timeoutSeconds", "failureThreshold", "successThreshold")):
        errors.append("readinessProbe with periodSeconds needs timeoutSeconds, failureThreshold, successThreshold >= 1")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in ctr.get("volumeMounts", []):
        if mount["name"] not in volumes:
            errors.append(f"volumeMount {mount['name']} has no volume")
        elif "secret" in volumes[mount["name"]] and not mount.get("readOnly"):
            errors.append(f"volumeMount {mount['name']} of a Secret must be readOnly")
    timeout = spec.get("timeoutSeconds", 300)
    if not 0 < timeout <= KNATIVE_MAX_REVISION_TIMEOUT:
        errors.append("timeoutSeconds must be within Knative's max-revision-timeout-seconds")
    if not 0 < spec.get("responseStartTimeoutSeconds", 1) <= timeout:
        errors.append("responseStartTimeoutSeconds must be within timeoutSeconds")
    if not 0 <= spec.get("idleTimeoutSeconds", 0) <= KNATIVE_MAX_REVISION_TIMEOUT:
        errors.append("idleTimeoutSeconds must be within Knative's max-revision-timeout-seconds")
    return errors


def as_pod(ksvc: dict) -> dict:
    """The Pod a revision becomes, for the core schema: Knative fields dropped, probe ports filled in."""
    spec = {k: v for k, v in json.loads(json.dumps(pod_spec(ksvc))).items()
            if k not in ("timeoutSeconds", "containerConcurrency", "idleTimeoutSeconds", "responseStartTimeoutSeconds")}
    ctr = spec["containers"][0]
    for probe_name in ("readinessProbe", "livenessProbe"):
        if probe_name in ctr:
            ctr[probe_name]["httpGet"].setdefault("port", ctr["ports"][0]["containerPort"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": ksvc["metadata"]["name"]}, "spec": spec}


def test_knative_services_are_well_formed(tls_render):
    for objects in (plain_objects(), *renders().values(), tls_render):
        ksvcs = [o for o in objects if key(o) == KSVC]
        assert {o["metadata"]["name"] for o in ksvcs} == {"async-producer", "async-consumer"}
        for ksvc in ksvcs:
            assert ksvc["metadata"]["namespace"] == NAMESPACE
            assert isinstance(container(ksvc)["image"], str) and container(ksvc)["image"]
            assert knative_revision_errors(ksvc) == [], ksvc["metadata"]["name"]
            kubernetes_validate.validate(as_pod(ksvc), NEWEST_KUBERNETES, strict=True)


def test_knative_check_rejects_what_the_webhook_would():
    producer = find(plain_objects(), KSVC, "async-producer")
    broken = json.loads(json.dumps(producer))
    ctr = container(broken)
    ctr["env"].append({"name": "PORT", "value": "9000"})
    ctr["readinessProbe"]["httpGet"]["port"] = 9000
    ctr["lifecycle"] = {}
    pod_spec(broken)["automountServiceAccountToken"] = True
    pod_spec(broken)["responseStartTimeoutSeconds"] = pod_spec(broken).get("timeoutSeconds", 300) + 1
    errors = knative_revision_errors(broken)
    assert len(errors) == 5, errors


def test_redis_stream_source_matches_the_source_and_the_consumer():
    objects = plain_objects()
    (rss,) = [o for o in objects if key(o) == REDIS_STREAM_SOURCE]
    assert rss["metadata"]["namespace"] == NAMESPACE and rss["metadata"]["name"]
    spec = rss["spec"]
    assert set(spec) <= {"address", "stream", "group", "consumers", "sink", "ceOverrides", "dialOptions"}
    source = find(objects, ("apps/v1", "Deployment"), "async-source")
    source_settings = process_settings(source, objects)
    assert settings.redis_url(spec["address"]) == source_settings.redis_url
    assert spec["stream"] == source_settings.stream
    # its adapter destroys its group when it stops: never ours
    assert spec["group"] and spec["group"] != source_settings.group
    consumer = find(objects, KSVC, "async-consumer")
    assert spec["sink"] == {"ref": {"apiVersion": KSVC[0], "kind": KSVC[1],
                                    "name": consumer["metadata"]["name"], "namespace": consumer["metadata"]["namespace"]}}


# --- consistency with the code


def test_every_env_var_is_read_by_the_process_and_every_value_parses(tls_render):
    for objects in (plain_objects(), *renders().values(), tls_render):
        for obj in workloads(objects):
            cls = settings_class(obj)
            known = fields_by_env(cls)
            for name, item in env_of(obj).items():
                assert name in known, f"{obj['metadata']['name']}: {name} is not read by {cls.__name__}"
                if "value" in item:
                    known[name].metadata["parse"](item["value"])
            process_settings(obj, objects)  # raises SettingsError as the process would


def test_a_value_the_parser_rejects_is_caught():
    objects = [json.loads(json.dumps(o)) for o in plain_objects()]
    find(objects, ("v1", "ConfigMap"), DATAPLANE_CONFIG)["data"]["MAX_ATTEMPTS"] = "three"
    with pytest.raises(settings.SettingsError, match="MAX_ATTEMPTS"):
        process_settings(find(objects, KSVC, "async-consumer"), objects)


def test_each_process_runs_once_with_its_subcommand():
    commands = {o["metadata"]["name"]: container(o)["args"] for o in workloads(plain_objects())}
    assert commands == {"async-controller": ["controller"], "async-producer": ["producer"],
                        "async-consumer": ["consumer"], "async-source": ["source"]}
    assert all("command" not in container(o) for o in workloads(plain_objects())), "the image's ENTRYPOINT runs"


def test_every_container_runs_the_one_image(tmp_path):
    reference = image_reference()
    for objects in (plain_objects(), *renders().values()):
        assert {container(o)["image"] for o in workloads(objects)} == {reference}
    # A user's overlay that moves the image to their registry moves every container, Knative's too.
    overlay = write_overlay(tmp_path / "mine", resources=[CONFIG / "overlays" / "kourier"],
                            images=[{"name": reference.split(":")[0], "newName": "registry.example.com/team/async-component",
                                     "newTag": "9.9.9"}])
    moved = {container(o)["image"] for o in workloads(kustomize(overlay))}
    assert moved == {"registry.example.com/team/async-component:9.9.9"}


def test_the_image_tag_is_the_package_version_the_dockerfile_labels():
    name, tag = image_reference().rsplit(":", 1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert tag == project["version"]
    labels = dockerfile_labels(dockerfile_stages()[-1])
    assert labels["org.opencontainers.image.version"] == tag
    assert labels["org.opencontainers.image.title"] == name.rsplit("/", 1)[1] == project["name"]
    build = f"docker build -f component/Dockerfile -t {image_reference()} ."
    assert build in (CONFIG / "README.md").read_text() and build in DOCKERFILE.read_text()


def test_ports_agree_with_settings_and_probes():
    objects = plain_objects()
    for obj in workloads(objects):
        values = process_settings(obj, objects)
        ctr = container(obj)
        ports = [p["containerPort"] for p in ctr.get("ports", [])]
        listening = values.port if key(obj) == KSVC else values.health_port
        assert ports == [listening], obj["metadata"]["name"]
        probes = {n: ctr[n] for n in ("livenessProbe", "readinessProbe") if n in ctr}
        assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
        if "readinessProbe" in probes:
            assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
        elif obj["metadata"]["name"] != "async-controller":  # kopf serves liveness only
            pytest.fail(f"{obj['metadata']['name']} has no readiness probe")
        assert {probe_port(obj, p) for p in probes.values()} == {listening}, obj["metadata"]["name"]
    assert find(objects, KSVC, "async-producer")["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] \
        == dockerfile_expose()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_gives_its_ingress_class_to_the_controller_and_the_component_services(overlay):
    objects = renders()[overlay]
    controller = find(objects, ("apps/v1", "Deployment"), "async-controller")
    assert process_settings(controller, objects).ingress_class == OVERLAYS[overlay]
    for name in ("async-producer", "async-consumer"):
        assert find(objects, KSVC, name)["metadata"]["annotations"][INGRESS_CLASS_ANNOTATION] == OVERLAYS[overlay]


def canonical(objects, ingress_class: str) -> list[str]:
    return sorted(json.dumps(o, sort_keys=True).replace(ingress_class, "<layer>") for o in objects)


def without_layer_specifics(objects, overlay: str) -> list[str]:
    """The render with what an overlay may change taken out: the class, the gateway peer, the fixed user."""
    namespace, labels = GATEWAYS[overlay]
    out = []
    for obj in json.loads(json.dumps(objects)):
        if key(obj) == ("networking.k8s.io/v1", "NetworkPolicy"):
            peer = obj["spec"]["ingress"][0]["from"][1]
            assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                            "podSelector": {"matchLabels": labels}}, overlay
            peer.clear()
        if key(obj) in (("apps/v1", "Deployment"), KSVC):
            for security in (pod_spec(obj).get("securityContext", {}), container(obj)["securityContext"]):
                security.pop("runAsUser", None)
                security.pop("runAsGroup", None)
        out.append(obj)
    return canonical(out, OVERLAYS[overlay])


def test_the_overlays_differ_only_in_their_layer_and_the_base_files_are_the_kourier_install():
    rendered = {name: without_layer_specifics(objects, name) for name, objects in renders().items()}
    assert rendered["kourier"] == rendered["istio"] == rendered["openshift"]
    base = [doc for path in base_files() + sorted((CONFIG / "components" / "network-policy").glob("network-policy.yaml"))
            for doc in load_yaml(path)]
    assert canonical(base, OVERLAYS["kourier"]) == canonical(renders()["kourier"], OVERLAYS["kourier"])


def test_the_controller_points_children_at_the_producer_service():
    objects = plain_objects()
    controller = process_settings(find(objects, ("apps/v1", "Deployment"), "async-controller"), objects)
    producer = find(objects, KSVC, "async-producer")
    assert producer["metadata"]["name"] == settings.PRODUCER_SERVICE_NAME
    assert controller.producer_host == f"{producer['metadata']['name']}.{producer['metadata']['namespace']}.svc.cluster.local"


def test_the_controller_and_the_data_plane_agree_on_the_cluster_domain():
    """Children replay to <service>.<ns>.svc.<domain>; the producer, and the replays, must allow exactly those hosts."""
    objects = plain_objects()
    controller_obj = find(objects, ("apps/v1", "Deployment"), "async-controller")
    controller = process_settings(controller_obj, objects)
    assert "CLUSTER_DOMAIN" in env_of(controller_obj)
    assert "CLUSTER_DOMAIN" in find(objects, ("v1", "ConfigMap"), DATAPLANE_CONFIG)["data"]
    for obj in dataplane_workloads(objects):
        process = process_settings(obj, objects)
        assert process.cluster_domain == controller.cluster_domain, obj["metadata"]["name"]
        assert process.allowed_hosts == (f".svc.{controller.cluster_domain}",), obj["metadata"]["name"]
        assert process.allowed_ports == (), obj["metadata"]["name"]


def test_the_controller_reads_the_longest_attempt_the_data_plane_allows_from_its_configmap():
    """An operator sets REQUEST_TIMEOUT once, in the ConfigMap: the controller refuses a Service's longer timeout."""
    objects = plain_objects()
    config = find(objects, ("v1", "ConfigMap"), DATAPLANE_CONFIG)["data"]
    for value in (config["REQUEST_TIMEOUT"], "900"):
        config["REQUEST_TIMEOUT"] = value
        controller = process_settings(find(objects, ("apps/v1", "Deployment"), "async-controller"), objects)
        replaying = [process_settings(obj, objects).request_timeout for obj in dataplane_workloads(objects)
                     if obj["metadata"]["name"] != "async-producer"]
        assert replaying == [float(value)] * 2 and controller.request_timeout == float(value)


def test_the_controller_reads_the_sinks_the_data_plane_allows_from_its_configmap():
    """An operator sets NOTIFICATION_ALLOWED_HOSTS once, in the ConfigMap: the controller flags a sink the source
    and the consumer would refuse (empty, the default: both allow any host)."""
    objects = plain_objects()
    for value, expected in (("", None), (".svc.cluster.local, hooks.example.com", (".svc.cluster.local",
                                                                                   "hooks.example.com"))):
        find(objects, ("v1", "ConfigMap"), DATAPLANE_CONFIG)["data"]["NOTIFICATION_ALLOWED_HOSTS"] = value
        controller = process_settings(find(objects, ("apps/v1", "Deployment"), "async-controller"), objects)
        assert controller.notification_allowed_hosts == expected
        replaying = [process_settings(obj, objects) for obj in dataplane_workloads(objects)
                     if obj["metadata"]["name"] != "async-producer"]
        assert len(replaying) == 2 and all(p.notification_allowed_hosts == expected for p in replaying)


def test_producer_and_consumer_are_cluster_local_and_kept_warm():
    for ksvc in (o for o in plain_objects() if key(o) == KSVC):
        assert ksvc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
        assert ksvc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "1"


def test_the_source_replays_in_process_as_the_consumer_would():
    objects = plain_objects()
    source = process_settings(find(objects, ("apps/v1", "Deployment"), "async-source"), objects)
    consumer = process_settings(find(objects, KSVC, "async-consumer"), objects)
    assert source.sink_url is None
    replay = [field.name for field in dataclasses.fields(settings.ReplaySettings)]
    assert {name: getattr(source, name) for name in replay} == {name: getattr(consumer, name) for name in replay}


# Shared by the producer, the source and the consumer: in the one ConfigMap, never per workload.
SHARED_SETTINGS = ({f.metadata["env"] for f in dataclasses.fields(settings.ReplaySettings)}
                   | {"STREAM_NAME", "KEY_PREFIX", "STATUS_RETENTION_SECONDS", "REQUEST_SIZE_LIMIT"}) \
    - {"REDIS_URL", "REDIS_USERNAME", "REDIS_PASSWORD", "REDIS_CA_FILE", "TARGET_GATEWAY_URL"}


def dataplane_workloads(objects) -> list[dict]:
    return [o for o in workloads(objects) if issubclass(settings_class(o), settings.RedisSettings)]


def test_one_config_map_holds_the_data_planes_shared_settings():
    for objects in (plain_objects(), *renders().values()):
        data = find(objects, ("v1", "ConfigMap"), DATAPLANE_CONFIG)["data"]
        assert SHARED_SETTINGS <= set(data), f"not in the ConfigMap: {sorted(SHARED_SETTINGS - set(data))}"
        readers = {o["metadata"]["name"]: fields_by_env(settings_class(o)) for o in dataplane_workloads(objects)}
        assert set(readers) == {"async-producer", "async-consumer", "async-source"}
        for env, raw in data.items():
            reading = [name for name, fields in readers.items() if env in fields]
            assert reading, f"{env}: no data-plane process reads it (settings.py)"
            for name in reading:
                try:
                    readers[name][env].metadata["parse"](raw)
                except ValueError as exc:
                    pytest.fail(f"{env}={raw!r} is invalid for {name}: {exc}")
        for obj in dataplane_workloads(objects):
            assert container(obj)["envFrom"] == [{"configMapRef": {"name": DATAPLANE_CONFIG}}]
            overridden = set(env_of(obj)) & set(data)
            assert not overridden, f"{obj['metadata']['name']} sets {overridden} itself: change them in one place"


def test_a_changed_shared_setting_reaches_every_process_that_reads_it():
    objects = [json.loads(json.dumps(o)) for o in plain_objects()]
    find(objects, ("v1", "ConfigMap"), DATAPLANE_CONFIG)["data"].update(MAX_ATTEMPTS="7", STATUS_RETENTION_SECONDS="60")
    seen = {o["metadata"]["name"]: process_settings(o, objects) for o in dataplane_workloads(objects)}
    assert seen["async-source"].max_attempts == seen["async-consumer"].max_attempts == 7
    assert {s.status_retention for s in seen.values()} == {60.0}


def test_timeouts_nest():
    objects = plain_objects()
    consumer_obj = find(objects, KSVC, "async-consumer")
    consumer = process_settings(consumer_obj, objects)
    source = process_settings(find(objects, ("apps/v1", "Deployment"), "async-source"), objects)
    spec = pod_spec(consumer_obj)
    assert source.delivery_timeout > consumer.request_timeout  # when SINK_URL points the source at the consumer
    # The consumer answers only once the replay is over: each of Knative's limits on that call must
    # outlast REQUEST_TIMEOUT (plus a margin to record the outcome), or queue-proxy answers 504 and the
    # sender delivers the request again. Set explicitly: Knative defaults responseStartTimeoutSeconds to 300.
    margin = 30
    for field in ("timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"):
        assert field in spec, f"consumer.yaml: set {field} explicitly"
        assert consumer.request_timeout + margin <= spec[field] <= KNATIVE_MAX_REVISION_TIMEOUT, field
    assert spec["responseStartTimeoutSeconds"] <= spec["timeoutSeconds"]


def test_a_stopping_source_finishes_its_replays_before_the_pod_is_killed():
    """SIGTERM during a replay must not make the Service be called twice: the pod outlives the source's drain."""
    objects = plain_objects()
    source_obj = find(objects, ("apps/v1", "Deployment"), "async-source")
    grace = pod_spec(source_obj).get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    environ = resolve_env(source_obj, objects)
    for sink_url in (None, "http://async-consumer.knative-serving.svc.cluster.local"):  # both ways README documents
        source = settings.load(settings.SourceSettings, environ={**environ, **({"SINK_URL": sink_url} if sink_url else {})})
        longest = source.delivery_timeout if sink_url else source.request_timeout
        assert longest < drain_grace(source) <= grace - 5, (sink_url, drain_grace(source), grace)
    consumer_obj = find(objects, KSVC, "async-consumer")
    consumer = process_settings(consumer_obj, objects)
    # Knative gives a revision's pods timeoutSeconds to finish; the consumer's own drain fits in it
    assert replay_grace(consumer) < pod_spec(consumer_obj)["timeoutSeconds"]


SHARED_REDIS_LAYOUT = ("REDIS_URL", "STREAM_NAME", "KEY_PREFIX", "DEAD_LETTER_STREAM", "STATUS_RETENTION_SECONDS")
"""Settings every process that reads them must agree on, or one writes where another never reads."""


def test_redis_processes_share_one_redis_stream_and_key_space():
    objects = plain_objects()
    redis_workloads = [o for o in workloads(objects) if issubclass(settings_class(o), settings.RedisSettings)]
    assert {o["metadata"]["name"] for o in redis_workloads} == {"async-producer", "async-consumer", "async-source"}
    for env in SHARED_REDIS_LAYOUT:
        values = {}
        for obj in redis_workloads:
            field = fields_by_env(settings_class(obj)).get(env)
            if field is not None:
                values[obj["metadata"]["name"]] = getattr(process_settings(obj, objects), field.name)
        assert len(values) >= 2 and len(set(values.values())) == 1, f"{env}: {values}"
    for obj in redis_workloads:
        env = env_of(obj)
        assert env["REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": REDIS_SECRET, "key": "url"}}
        for variable, secret_key in (("REDIS_USERNAME", "username"), ("REDIS_PASSWORD", "password")):
            assert env[variable]["valueFrom"] == {"secretKeyRef": {"name": REDIS_SECRET, "key": secret_key,
                                                                   "optional": True}}


def test_the_e2e_redis_meets_the_redis_requirements():
    """component/config/README.md asks for noeviction and appendonly yes; every Redis the project starts has them."""
    docs = [d for d in yaml.safe_load_all((ROOT / "e2e" / "kind" / "manifests" / "redis.yaml").read_text()) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    options = dict(zip(args[::2], args[1::2]))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in ("everysec", "always")
    assert options["--maxmemory-policy"] == "noeviction"
    readme = (CONFIG / "README.md").read_text()
    assert "maxmemory-policy noeviction" in readme and "appendonly yes" in readme


def test_no_secret_is_shipped_and_the_processes_take_what_the_user_creates(tls_render):
    """Re-applying the manifests must never reset the user's Secret: none is shipped."""
    for objects in (plain_objects(), *renders().values(), tls_render):
        assert [o for o in objects if o["kind"] == "Secret"] == []
    objects = plain_objects()
    for obj in dataplane_workloads(objects):
        # url alone (a password-less Redis, or credentials inside the URL) ...
        plain = settings.load(settings_class(obj), environ=resolve_env(obj, objects, {"url": USER_SECRET["url"]}))
        assert (plain.redis_url, plain.redis_username, plain.redis_password) == (USER_SECRET["url"], None, None)
        # ... or with an ACL user and password
        acl = process_settings(obj, objects)
        assert (acl.redis_username, acl.redis_password) == (USER_SECRET["username"], USER_SECRET["password"])
    readme = (CONFIG / "README.md").read_text()
    assert f"kubectl -n {NAMESPACE} create secret generic {REDIS_SECRET}" in readme
    assert "--from-literal=url=" in readme and "--from-literal=password=" in readme


def test_the_ca_file_is_set_only_with_the_tls_component(tls_render):
    for objects in (plain_objects(), *renders().values()):
        assert all("REDIS_CA_FILE" not in env_of(o) for o in workloads(objects)), \
            "redis:// with REDIS_CA_FILE set fails: redis-py refuses ssl_ca_certs on a plain connection"
    redis_workloads = [o for o in workloads(tls_render) if issubclass(settings_class(o), settings.RedisSettings)]
    assert len(redis_workloads) == 3
    for obj in redis_workloads:
        ca_file = Path(process_settings(obj, tls_render).redis_ca_file)
        (mount,) = [m for m in container(obj)["volumeMounts"] if Path(m["mountPath"]) == ca_file.parent]
        (volume,) = [v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == REDIS_SECRET
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": ca_file.name}]


def test_namespaced_objects_live_in_the_knative_namespace_which_is_not_ours(tls_render):
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for objects in (plain_objects(), *renders().values(), tls_render):
        assert all(o["kind"] != "Namespace" for o in objects)
        for obj in objects:
            if obj["kind"] not in cluster_scoped:
                assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


def test_the_redis_secret_name_component_moves_every_reference(options_render):
    objects = options_render
    assert not [o for o in objects if o["metadata"]["name"] == "async-redis-secret-name"], "local-config: not applied"
    for obj in dataplane_workloads(objects):
        refs = [item["valueFrom"]["secretKeyRef"]["name"] for item in env_of(obj).values()
                if "secretKeyRef" in item.get("valueFrom", {})]
        volumes = [v["secret"]["secretName"] for v in pod_spec(obj).get("volumes", []) if "secret" in v]
        assert len(refs) == 3 and len(volumes) == 1, obj["metadata"]["name"]
        assert set(refs + volumes) == {MY_SECRET}, obj["metadata"]["name"]
    assert "async-redis" not in json.dumps(objects).replace("async-redis-stream", "")


# --- NetworkPolicy


def producer_policy(objects) -> dict:
    (policy,) = [o for o in objects if key(o) == ("networking.k8s.io/v1", "NetworkPolicy")]
    return policy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_and_knative_reach_the_producer(overlay):
    objects = renders()[overlay]
    policy = producer_policy(objects)
    producer = find(objects, KSVC, "async-producer")
    # Knative copies the template's labels onto the producer's pods; the policy selects exactly those
    pod_labels = producer["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    for other in workloads(objects):
        if other is not producer:
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert not selector.items() <= labels.items(), f"{other['metadata']['name']} is selected too"
    assert policy["metadata"]["namespace"] == producer["metadata"]["namespace"]
    assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open: the producer only talks to Redis"
    namespace, labels = GATEWAYS[overlay]
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule, "every port: queue-proxy's serving and metrics ports alike"
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
         "podSelector": {"matchLabels": labels}},
    ]
    readme = (CONFIG / "README.md").read_text()
    for label, value in labels.items():
        assert f"{label}={value}" in readme and namespace in readme, "README documents the labels it relies on"


# --- KEDA


PROMETHEUS_TRIGGER = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                      "queryParameters", "ignoreNullValues", "unsafeSsl", "authModes"}


def test_the_keda_component_scales_the_source_on_its_queues_depth(options_render):
    objects = options_render
    (scaled,) = [o for o in objects if key(o) == SCALED_OBJECT]
    source = find(objects, ("apps/v1", "Deployment"), "async-source")
    spec = scaled["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "triggers", "advanced", "fallback", "idleReplicaCount"}
    assert scaled["metadata"]["namespace"] == source["metadata"]["namespace"]
    assert spec["scaleTargetRef"] == {"name": source["metadata"]["name"]}
    assert "replicas" not in source["spec"], "KEDA's autoscaler owns the count; apply must not reset it"
    assert 2 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "the disruption budget keeps a spare"
    # the per-Service queues' depth through Prometheus (the query's metrics: test_dashboard.py), not one stream
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert set(meta) <= PROMETHEUS_TRIGGER and {"serverAddress", "query", "threshold"} <= set(meta)
    assert all(isinstance(v, str) for v in meta.values()), "KEDA's trigger metadata is a map of strings"
    assert float(meta["threshold"]) > 0
    address = urlsplit(meta["serverAddress"])
    assert address.scheme in ("http", "https") and address.hostname and address.port, meta["serverAddress"]


def test_the_keda_prometheus_address_is_patched_in_the_users_overlay(tmp_path):
    """The README's patch: a user's overlay points the trigger at their Prometheus."""
    mine = "http://prometheus.observability.svc:9090"
    overlay = write_overlay(tmp_path / "mine", resources=[CONFIG / "overlays" / "kourier"], components=[KEDA_COMPONENT],
                            patches=[{"target": {"kind": "ScaledObject", "name": "async-source"},
                                      "patch": yaml.safe_dump([{"op": "replace", "value": mine,
                                                                "path": "/spec/triggers/0/metadata/serverAddress"}])}])
    (scaled,) = [o for o in kustomize(overlay) if key(o) == SCALED_OBJECT]
    assert scaled["spec"]["triggers"][0]["metadata"]["serverAddress"] == mine
    readme = (CONFIG / "README.md").read_text()
    assert "/spec/triggers/0/metadata/serverAddress" in readme, "README shows the patch"


# --- metrics


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In) against an object's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def template_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def scrape_annotations(annotations: dict) -> tuple[str, int, str]:
    return annotations["prometheus.io/scrape"], int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]


def test_every_process_is_scraped_where_it_serves_metrics():
    objects = plain_objects()
    source = find(objects, ("apps/v1", "Deployment"), "async-source")
    service = find(objects, ("v1", "Service"), "async-source-metrics")
    # the Service's selector picks the source's pods and no other workload's
    assert service["spec"]["selector"].items() <= template_labels(source).items()
    assert [o["metadata"]["name"] for o in workloads(objects)
            if service["spec"]["selector"].items() <= template_labels(o).items()] == ["async-source"]
    (port,) = service["spec"]["ports"]
    health_port = process_settings(source, objects).health_port
    assert probe_port(source, {"httpGet": {"port": port["targetPort"]}}) == health_port == port["port"]
    assert scrape_annotations(service["metadata"]["annotations"]) == ("true", port["port"], "/metrics")
    assert "prometheus.io/scrape" not in source["spec"]["template"]["metadata"].get("annotations", {}), \
        "annotated once: a Prometheus that discovers both pods and endpoints would scrape it twice"
    # the components that patch the workloads select them by component: not the Service
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] not in ("producer", "consumer", "source")
    for name in ("async-producer", "async-consumer"):
        ksvc = find(objects, KSVC, name)
        annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
        assert scrape_annotations(annotations) == ("true", process_settings(ksvc, objects).port, "/metrics")
        assert container(ksvc)["ports"][0]["containerPort"] == process_settings(ksvc, objects).port


MONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings",
                    "scheme", "tlsConfig"}


def test_the_monitoring_component_scrapes_the_source_producer_and_consumer(options_render):
    objects = options_render
    (service_monitor,) = [o for o in objects if key(o) == SERVICE_MONITOR]
    (pod_monitor,) = [o for o in objects if key(o) == POD_MONITOR]
    for monitor in (service_monitor, pod_monitor):
        assert monitor["metadata"]["namespace"] == NAMESPACE
        assert set(monitor["spec"]) <= {"selector", "endpoints", "podMetricsEndpoints", "namespaceSelector",
                                        "jobLabel", "podTargetLabels", "targetLabels"}
        (endpoint,) = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
        assert set(endpoint) <= MONITOR_ENDPOINT
        assert endpoint["path"] == "/metrics"
        # the metrics' own namespace and service labels (the Service a request is for) beat the target's
        assert endpoint["honorLabels"] is True
    services = [o for o in objects if key(o) == ("v1", "Service")]
    (scraped,) = [s for s in services if selects(service_monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert scraped["metadata"]["name"] == "async-source-metrics"
    assert service_monitor["spec"]["endpoints"][0]["port"] == scraped["spec"]["ports"][0]["name"]
    picked = sorted(o["metadata"]["name"] for o in workloads(objects)
                    if selects(pod_monitor["spec"]["selector"], template_labels(o)))
    assert picked == ["async-consumer", "async-producer"]
    assert all(key(find(objects, KSVC, name)) == KSVC for name in picked)
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == KNATIVE_USER_PORT
    # Prometheus's pods may reach the producer's serving port despite the gateway-only policy
    (policy,) = [o for o in objects if key(o) == ("networking.k8s.io/v1", "NetworkPolicy")
                 and o["metadata"]["name"] == "async-producer-metrics"]
    producer = find(objects, KSVC, "async-producer")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= template_labels(producer).items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": process_settings(producer, objects).port, "protocol": "TCP"}]
    assert all("podSelector" in peer and "namespaceSelector" in peer for peer in rule["from"]), "Prometheus only"
    # the dashboard, for Grafana's sidecar
    dashboard = find(objects, ("v1", "ConfigMap"), "async-component-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {"async-component.json": (MONITORING_COMPONENT / "async-component.json").read_text()}


# --- release YAML


def test_the_release_files_are_the_overlays_rendered_with_the_version(tmp_path):
    """What CI checks: the one command renders every overlay, and the committed files are its output."""
    script = load_release_script()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert script.main(["--out", str(tmp_path), "--kubectl", KUBECTL]) == 0
    rendered = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert rendered == [f"async-component-{overlay}.yaml" for overlay in sorted(OVERLAYS)]
    for name in rendered:
        committed = RELEASE_DIR / name
        assert committed.exists() and committed.read_text() == (tmp_path / name).read_text(), \
            f"release/{name} is stale: run python scripts/render-release.py"
    for overlay in OVERLAYS:
        objects = load_yaml(tmp_path / f"async-component-{overlay}.yaml")
        assert len(objects) == len(renders()[overlay])
        for obj in objects:
            assert obj["metadata"]["labels"]["app.kubernetes.io/version"] == version, obj["metadata"]["name"]
            selector = (obj.get("spec") or {}).get("selector") or {}
            assert "app.kubernetes.io/version" not in json.dumps(selector), "selectors never change on upgrade"
        assert {container(o)["image"] for o in workloads(objects)} == {f"dev.local/async-component:{version}"}
    other = tmp_path / "other"
    script.main(["--out", str(other), "--version", "9.9.9", "--image", "registry.example.com/ac", "--kubectl", KUBECTL])
    objects = load_yaml(other / "async-component-istio.yaml")
    assert {container(o)["image"] for o in workloads(objects)} == {"registry.example.com/ac:9.9.9"}


def test_the_readme_installs_a_release_file():
    readme = (ROOT / "README.md").read_text() + (CONFIG / "README.md").read_text()
    for overlay in ("kourier", "istio"):
        assert f"kubectl apply -f release/async-component-{overlay}.yaml" in readme
    assert "python scripts/render-release.py" in (CONFIG / "README.md").read_text()


# --- RBAC


def test_the_cluster_role_grants_exactly_what_the_controller_uses():
    objects = plain_objects()
    role = find(objects, ("rbac.authorization.k8s.io/v1", "ClusterRole"), "async-controller")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["apiGroups"] + rule["resources"], rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == EXPECTED_RULES


def test_the_controller_runs_as_the_bound_service_account():
    objects = plain_objects()
    account = find(objects, ("v1", "ServiceAccount"), "async-controller")
    binding = find(objects, ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), "async-controller")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "async-controller"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    controller = find(objects, ("apps/v1", "Deployment"), "async-controller")
    assert pod_spec(controller)["serviceAccountName"] == account["metadata"]["name"]
    for obj in workloads(objects):  # the others never call the API
        if obj is not controller:
            assert pod_spec(obj)["automountServiceAccountToken"] is False, obj["metadata"]["name"]


def test_two_controller_replicas_elect_a_leader_with_a_lease_their_role_allows():
    objects = plain_objects()
    controller = find(objects, ("apps/v1", "Deployment"), "async-controller")
    assert controller["spec"]["replicas"] == 2 and "strategy" not in controller["spec"]  # rolling: the Lease hands over
    values = process_settings(controller, objects)
    assert values.lease_name and values.lease_duration > 2 * values.lease_renew_period
    assert env_of(controller)["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # the Lease lives in SYSTEM_NAMESPACE, the controller's own (a fieldRef), where its Role is
    assert env_of(controller)["SYSTEM_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    role = find(objects, ("rbac.authorization.k8s.io/v1", "Role"), "async-controller-lease")
    assert role["metadata"]["namespace"] == controller["metadata"]["namespace"]
    allowed = {(verb, name) for rule in role["rules"] if rule["apiGroups"] == ["coordination.k8s.io"]
               and rule["resources"] == ["leases"] for verb in rule["verbs"] for name in rule.get("resourceNames", ["*"])}
    assert allowed == {("create", "*"), ("get", values.lease_name), ("patch", values.lease_name)}
    binding = find(objects, ("rbac.authorization.k8s.io/v1", "RoleBinding"), "async-controller-lease")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod_spec(controller)["serviceAccountName"],
                                    "namespace": controller["metadata"]["namespace"]}]


def test_disruption_budgets_cover_the_controller_and_the_source_and_never_block_a_drain():
    objects = plain_objects()
    budgets = {o["metadata"]["name"]: o for o in objects if key(o) == ("policy/v1", "PodDisruptionBudget")}
    assert set(budgets) == {"async-controller", "async-source"}
    for name, budget in budgets.items():
        deployment = find(objects, ("apps/v1", "Deployment"), name)
        assert budget["spec"]["selector"] == deployment["spec"]["selector"]
        assert deployment["spec"]["replicas"] >= 2, f"{name}: one replica and a budget leave no pod during a drain"
        assert budget["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}


# --- hardening


def test_every_container_is_unprivileged_read_only_and_bounded():
    uid = dockerfile_uid()
    for obj in workloads(plain_objects() + list(renders()["kourier"]) + list(renders()["istio"])):
        name, ctr = obj["metadata"]["name"], container(obj)
        pod_security = pod_spec(obj).get("securityContext", {})
        security = ctr["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["capabilities"] == {"drop": ["ALL"]}, name
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, name
        assert security.get("runAsUser", pod_security.get("runAsUser")) == uid, name
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}, name
        for bound in ("requests", "limits"):
            assert set(ctr["resources"][bound]) == {"cpu", "memory"}, f"{name}: resources.{bound}"


# OpenShift's default SecurityContextConstraints, restricted-v2 (OpenShift 4.11 and newer), as they
# judge a pod: the UID comes from the namespace's range (runAsUser MustRunAsRange), so a fixed one
# outside it is refused; fsGroup likewise (MustRunAs); no privilege escalation; every capability
# dropped (requiredDropCapabilities ALL; only NET_BIND_SERVICE may be added back); seccomp
# runtime/default; no host namespaces, ports or paths; only these volume types.
RESTRICTED_V2_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
                         "persistentVolumeClaim", "projected", "secret"}


def restricted_v2_violations(obj: dict) -> list[str]:
    """Why restricted-v2 would refuse ``obj``'s pods (empty: admitted)."""
    spec, errors = pod_spec(obj), []
    pod_security = spec.get("securityContext", {})
    for field in ("runAsUser", "fsGroup", "runAsGroup", "supplementalGroups"):
        if field in pod_security:
            errors.append(f"pod securityContext.{field} is fixed; OpenShift assigns it from the namespace's range")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            errors.append(f"{host} is not allowed")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_V2_VOLUMES:
            errors.append(f"volume {volume['name']}: {sorted(kinds)} is not an allowed volume type")
    for ctr in spec.get("initContainers", []) + spec["containers"]:
        security = ctr.get("securityContext", {})
        where = f"container {ctr['name']}"
        if "runAsUser" in security:
            errors.append(f"{where}: runAsUser is fixed; OpenShift assigns it from the namespace's range")
        if "runAsGroup" in security:
            errors.append(f"{where}: runAsGroup is fixed; the image's group 0 must stay")
        if security.get("privileged"):
            errors.append(f"{where}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}: allowPrivilegeEscalation must be false")
        capabilities = security.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            errors.append(f"{where}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            errors.append(f"{where}: adds capabilities {capabilities['add']}")
        if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
            errors.append(f"{where}: runAsNonRoot must be true")
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile"))
        if seccomp != {"type": "RuntimeDefault"}:
            errors.append(f"{where}: seccompProfile must be RuntimeDefault")
        for port in ctr.get("ports", []):
            if "hostPort" in port:
                errors.append(f"{where}: hostPort is not allowed")
    return errors


def test_restricted_v2_admits_every_workload_of_the_openshift_overlay(tmp_path):
    objects = renders()["openshift"]
    assert {o["metadata"]["name"] for o in workloads(objects)} == \
        {"async-controller", "async-producer", "async-consumer", "async-source"}
    # with the optional components too (the CA's Secret volume, KEDA's ScaledObject)
    overlay = write_overlay(tmp_path / "mine", resources=[CONFIG / "overlays" / "openshift"],
                            components=[TLS_COMPONENT, KEDA_COMPONENT])
    for obj in [*workloads(objects), *workloads(kustomize(overlay))]:
        assert restricted_v2_violations(obj) == [], obj["metadata"]["name"]


def test_restricted_v2_check_refuses_the_base_fixed_uid_and_the_rest():
    objects = plain_objects()
    for obj in workloads(objects):
        assert any("runAsUser is fixed" in e for e in restricted_v2_violations(obj)), obj["metadata"]["name"]
    broken = json.loads(json.dumps(find(renders()["openshift"], ("apps/v1", "Deployment"), "async-source")))
    pod_spec(broken)["securityContext"]["fsGroup"] = 1000
    pod_spec(broken)["hostNetwork"] = True
    pod_spec(broken)["volumes"] = [{"name": "h", "hostPath": {"path": "/"}}]
    security = container(broken)["securityContext"]
    security.update(allowPrivilegeEscalation=True, capabilities={"drop": ["NET_RAW"], "add": ["SYS_ADMIN"]})
    security["seccompProfile"] = {"type": "Unconfined"}
    assert len(restricted_v2_violations(broken)) == 7, restricted_v2_violations(broken)


# --- the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        assert stages, "instructions before the first FROM"
        stages[-1].append(instruction)
    return stages


def dockerfile_labels(stage) -> dict[str, str]:
    labels = {}
    for instruction, args in stage:
        if instruction == "LABEL":
            labels.update(dict(re.findall(r'([\w.-]+)="([^"]*)"', args)))
    return labels


def dockerfile_user(stage) -> str:
    users = [args for instruction, args in stage if instruction == "USER"]
    assert users, "the final stage sets no USER"
    return users[-1]


def dockerfile_uid() -> int:
    return int(dockerfile_user(dockerfile_stages()[-1]).split(":")[0])


def dockerfile_expose() -> int:
    (port,) = [args for instruction, args in dockerfile_stages()[-1] if instruction == "EXPOSE"]
    return int(port)


def copy_sources(stage) -> list[str]:
    sources = []
    for instruction, args in stage:
        if instruction in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            assert all(not w.startswith("--from") for w in args.split()), "no COPY --from: the wheels are bind-mounted"
            sources += words[:-1]
    return sources


def test_the_image_is_built_in_two_stages_and_ships_no_build_tools():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert stages[0][0][1].endswith(" AS builder")
    final = stages[-1]
    assert final[0][1] == "python:3.11-slim"
    final_text = " ".join(args for _, args in final)
    for tool in ("gcc", "build-essential", "apt-get install", "pip wheel", "setuptools", "git"):
        assert tool not in final_text, f"{tool!r} in the final stage"
    assert copy_sources(final) == [], "the final stage copies no sources; it installs the builder's wheels"
    assert "from=builder" in final_text and "pip install --no-index" in final_text


def test_the_image_runs_async_component_as_a_numeric_non_root_user():
    final = dockerfile_stages()[-1]
    user = dockerfile_user(final)
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user} is not a numeric non-root user"
    text = " ".join(args for _, args in final)
    assert f"--uid {dockerfile_uid()} --gid 0" in text, "the user has a passwd entry, in group 0"
    (entrypoint,) = [args for instruction, args in final if instruction == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["async-component"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["async-component"] == f"{cli.__name__}:main"


def test_the_image_runs_under_any_uid_with_group_0(tmp_path):
    """OpenShift runs it with a UID from the namespace's range and group 0: nothing may need 65532."""
    final = dockerfile_stages()[-1]
    assert dockerfile_user(final).endswith(":0"), "the image's group must be 0, the group OpenShift's UIDs run with"
    text = " ".join(args for _, args in final)
    assert "chown" not in text and not re.search(r"[0-7]?7[0-7]{2}|[go]\+w|a\+w", text), \
        "no file may belong to, or be writable for, the fixed user"
    assert not [i for i, _ in final if i in ("WORKDIR", "VOLUME")], "no directory to write to at run time"
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    python = re.fullmatch(r"python:(\d+\.\d+)-slim", final[0][1]).group(1)
    (chmod,) = re.findall(r"chmod -R (\S+) ((?:/\S+ ?)+)", text)
    mode, paths = chmod[0], chmod[1].split()
    assert set(paths) == {f"/usr/local/lib/python{python}/site-packages", "/usr/local/bin"}, \
        "what pip installs (the package, its dependencies, the console script) is covered"
    # what that mode does to files pip might have written owner-only
    tree = tmp_path / "site-packages"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "mod.py").write_text("x = 1\n")
    (tree / "pkg" / "mod.py").chmod(0o600)
    (tree / "pkg").chmod(0o700)
    subprocess.run(["chmod", "-R", mode, str(tree)], check=True)
    for path, wanted in ((tree / "pkg", 0o050), (tree / "pkg" / "mod.py", 0o040)):
        group = path.stat().st_mode & 0o070
        assert group & wanted == wanted and not group & 0o020, f"{path.name}: group bits {oct(group)}"


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line[1:] if negate else line
        regex = re.escape(glob.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((negate, re.compile(regex)))
    return patterns


def in_context(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negate, pattern in dockerignore_patterns():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            included = negate
    return included


def context_files(sources: list[str]) -> list[Path]:
    files = []
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        found = [item for item in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))
                 if in_context(str(item.relative_to(ROOT)))]
        assert found, f"COPY {source}: .dockerignore leaves it out of the build context"
        files += found
    return files


def test_dockerignore_keeps_the_context_to_what_the_build_copies():
    assert in_context("pyproject.toml") and in_context("component/async_component/cli.py")
    for excluded in (".git/HEAD", "test/unit/test_manifests.py", "perf/results/x.json",
                     "component/async_component/__pycache__/cli.cpython-311.pyc", "component/config/README.md"):
        assert not in_context(excluded), excluded


def test_the_builder_context_is_a_buildable_project_with_the_console_script(tmp_path):
    """Builds the package from exactly the files the builder stage copies (an sdist: offline, no wheel package)."""
    builder = dockerfile_stages()[0]
    sources = copy_sources(builder)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["readme"] in sources, "setuptools reads the readme named in pyproject.toml"
    context = tmp_path / "context"
    for path in context_files(sources):
        target = context / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=context,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sdist = tmp_path / "dist" / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        assert "component/async_component/cli.py" in names
        entry_points = next(n for n in archive.getnames() if n.endswith(".egg-info/entry_points.txt"))
        text = archive.extractfile(entry_points).read().decode()
    assert "async-component = async_component.cli:main" in text
