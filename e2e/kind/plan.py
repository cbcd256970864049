"""What a kind cluster needs before the scenarios run, as a list of steps.

:func:`build_plan` is pure: versions, layer and repository in, steps out. All
the knowledge (which manifest, in which order, what to wait for, which ports)
is here, where tests can check it without Docker; ``cluster.py`` only runs the
steps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from async_component.settings import DEFAULT_SYSTEM_NAMESPACE, INGRESS_CLASSES

from .versions import Versions

LAYERS = ("kourier", "istio")
INGRESS_CLASS = dict(zip(LAYERS, INGRESS_CLASSES))

KIND_CONFIG = "kind-config.yaml"
GATEWAY_NODE_PORT = 31080
DOMAIN = "example.com"

COMPONENT_IMAGE = "dev.local/async-component:0.1.0"
APP_IMAGE = "dev.local/helloworld-sleep:0.1.0"
COMPONENT_DOCKERFILE = "component/Dockerfile"
APP_DIR = "test/app"
APP_MANIFESTS = ("test/app/service.yml", "test/app/alwaysAsyncService.yml", "test/app/noAnnoService.yml")
APP_SERVICES = ("helloworld-sleep", "helloworld-sleep-always", "helloworld-sleep-plain")
APP_NAMESPACE = "default"

SYSTEM_NAMESPACE = DEFAULT_SYSTEM_NAMESPACE
COMPONENT_OVERLAYS = "component/config/overlays"
COMPONENT_DEPLOYMENTS = ("async-controller", "async-source")
COMPONENT_SERVICES = ("async-producer", "async-consumer")
REDIS_SECRET = "async-redis"
REDIS_SECRET_KEY = "url"

MANIFESTS = "e2e/kind/manifests"
REDIS_MANIFEST = f"{MANIFESTS}/redis.yaml"
KOURIER_NODEPORT_MANIFEST = f"{MANIFESTS}/kourier-nodeport.yaml"
REDIS_NAMESPACE = "redis"
REDIS_DEPLOYMENT = "redis"
REDIS_SELECTOR = "app=redis"
REDIS_URL_IN_CLUSTER = f"redis://redis.{REDIS_NAMESPACE}.svc.cluster.local:6379/0"

SERVING_DEPLOYMENTS = ("activator", "autoscaler", "controller", "webhook")
KNATIVE_SERVICE_LABEL = "serving.knative.dev/service"

ESTABLISHED = "Established"
AVAILABLE = "Available"
READY = "Ready"
ROLLED_OUT = "rolled-out"
"""Not a condition: ``kubectl rollout status`` (StatefulSets have no Available condition)."""

STEP_KINDS = (
    "kind-create", "docker-build", "kind-load", "kubectl-apply-url", "kubectl-apply-file",
    "kubectl-apply-kustomize", "kubectl-patch", "restart-pods", "http-get",
)


@dataclasses.dataclass(frozen=True)
class Wait:
    """Objects that must reach ``condition``; no names means every one of that kind in the namespace."""

    resource: str
    namespace: str | None
    condition: str
    names: tuple[str, ...] = ()
    selector: str | None = None

    def describe(self) -> str:
        what = ", ".join(self.names) if self.names else (f"-l {self.selector}" if self.selector else "all")
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.resource} {what}{where} {self.condition}"


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    name: str
    kind: str
    args: dict[str, Any]
    waits: tuple[Wait, ...] = ()
    timeout: float = 300.0
    only_on_reused_cluster: bool = False
    """Skipped on a fresh cluster: it exists to pick up rebuilt images on a kept one."""

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}")

    def describe(self) -> str:
        args = " ".join(
            f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in self.args.items()
        )
        line = f"{self.kind} {args}"
        if self.waits:
            line += "\n      waits for: " + "; ".join(wait.describe() for wait in self.waits)
        if self.only_on_reused_cluster:
            line += "\n      only on a reused (--keep-cluster) cluster"
        return line


class PlanError(ValueError):
    """The repository does not hold what the plan needs (e.g. kind-config.yaml lacks the gateway's port)."""


def gateway_host_port(repo_root: Path) -> int:
    """The host port kind-config.yaml maps to the gateway's node port."""
    config = yaml.safe_load((repo_root / KIND_CONFIG).read_text())
    for node in config.get("nodes") or []:
        for mapping in node.get("extraPortMappings") or []:
            if mapping.get("containerPort") == GATEWAY_NODE_PORT:
                return int(mapping.get("hostPort") or GATEWAY_NODE_PORT)
    raise PlanError(f"{KIND_CONFIG} maps no host port to the gateway's node port {GATEWAY_NODE_PORT}")


def overlay(layer: str) -> str:
    return f"{COMPONENT_OVERLAYS}/{layer}"


def gateway_patch() -> dict[str, Any]:
    """Strategic merge patch giving the Istio gateway's http2 port (80) the kind-mapped node port."""
    return {"spec": {"type": "NodePort", "ports": [{"name": "http2", "port": 80, "nodePort": GATEWAY_NODE_PORT}]}}


def _apply_release(title: str, url: str, *waits: Wait, server_side: bool = False, timeout: float = 300.0) -> Step:
    args: dict[str, Any] = {"url": url}
    if server_side:
        args["server_side"] = True
    return Step(title, "kubectl-apply-url", args, waits, timeout)


def _all_available(namespace: str) -> Wait:
    return Wait("deployment", namespace, AVAILABLE)


def _available(namespace: str, *names: str) -> Wait:
    """Named, where the namespace also holds the component (on a kept cluster it may be broken)."""
    return Wait("deployment", namespace, AVAILABLE, names)


def _crds_established() -> Wait:
    return Wait("crd", None, ESTABLISHED)


def _network_layer(layer: str, versions: Versions) -> list[Step]:
    if layer == "kourier":
        return [
            _apply_release(
                f"install net-kourier {versions.net_kourier}", versions.release_url("net_kourier", "kourier.yaml"),
                _all_available("kourier-system"), _available(SYSTEM_NAMESPACE, "net-kourier-controller"),
            ),
            Step(
                f"expose the Kourier gateway on node port {GATEWAY_NODE_PORT}", "kubectl-apply-file",
                {"path": KOURIER_NODEPORT_MANIFEST},
            ),
        ]
    return [
        # The CRDs alone exceed client-side apply's annotation limit: apply server-side.
        _apply_release(
            f"install Istio for kind (net-istio {versions.net_istio}, no mesh)", versions.istio_kind_url(),
            _crds_established(), _all_available("istio-system"), server_side=True, timeout=600.0,
        ),
        Step(
            f"expose the Istio ingress gateway on node port {GATEWAY_NODE_PORT}", "kubectl-patch",
            {"resource": "service/istio-ingressgateway", "namespace": "istio-system", "type": "strategic",
             "patch": gateway_patch()},
        ),
        _apply_release(
            f"install net-istio {versions.net_istio}", versions.release_url("net_istio", "net-istio.yaml"),
            _available(SYSTEM_NAMESPACE, "net-istio-controller", "net-istio-webhook"),
        ),
    ]


def _restart(namespace: str, deployments: tuple[str, ...], knative_services: tuple[str, ...]) -> Step:
    """Same image tag, new image: only new pods run it (kind load retags it in the node).

    Knative Services' pods are deleted without waiting for new ones: a Service
    scaled to zero has none, and gets them (with the new image) on demand.
    """
    waits = (Wait("deployment", namespace, ROLLED_OUT, deployments),) if deployments else ()
    return Step(
        f"restart pods in {namespace} to run the freshly loaded images", "restart-pods",
        {"namespace": namespace, "deployments": list(deployments), "knative_services": list(knative_services)},
        waits, only_on_reused_cluster=True,
    )


def build_plan(layer: str, versions: Versions, repo_root: Path) -> list[Step]:
    """Every step from no cluster to the sample Services answering through ``layer``'s gateway.

    Local paths in the steps are relative to ``repo_root``; the executor runs there.
    Only kind-config.yaml is read (for the gateway's host port).
    """
    if layer not in LAYERS:
        raise PlanError(f"layer must be one of {', '.join(LAYERS)}, not {layer!r}")
    host_port = gateway_host_port(repo_root)
    component_waits = (
        Wait("deployment", SYSTEM_NAMESPACE, AVAILABLE, COMPONENT_DEPLOYMENTS),
        Wait("ksvc", SYSTEM_NAMESPACE, READY, COMPONENT_SERVICES),
    )
    return [
        Step(f"create the kind cluster ({versions.node_image.split('@')[0]})", "kind-create",
             {"config": KIND_CONFIG, "image": versions.node_image}, timeout=600.0),
        Step("build the component image", "docker-build",
             {"image": COMPONENT_IMAGE, "dockerfile": COMPONENT_DOCKERFILE, "context": "."}, timeout=900.0),
        Step("build the sleep app image", "docker-build",
             {"image": APP_IMAGE, "dockerfile": f"{APP_DIR}/Dockerfile", "context": APP_DIR}, timeout=900.0),
        Step("load the component image into the cluster", "kind-load", {"image": COMPONENT_IMAGE}),
        Step("load the sleep app image into the cluster", "kind-load", {"image": APP_IMAGE}),
        _apply_release(f"install Knative Serving {versions.serving} CRDs",
                       versions.release_url("serving", "serving-crds.yaml"), _crds_established()),
        _apply_release(f"install Knative Serving {versions.serving} core",
                       versions.release_url("serving", "serving-core.yaml"),
                       _available(SYSTEM_NAMESPACE, *SERVING_DEPLOYMENTS)),
        *_network_layer(layer, versions),
        Step(f"make {layer} Knative's ingress class", "kubectl-patch",
             {"resource": "configmap/config-network", "namespace": SYSTEM_NAMESPACE, "type": "merge",
              "patch": {"data": {"ingress-class": INGRESS_CLASS[layer]}}}),
        # Knative resolves image tags to digests through the registry, except for these
        # registries; the locally built images exist in no registry. (Also the default.)
        Step("run dev.local images without asking a registry", "kubectl-patch",
             {"resource": "configmap/config-deployment", "namespace": SYSTEM_NAMESPACE, "type": "merge",
              "patch": {"data": {"registries-skipping-tag-resolving": "kind.local,ko.local,dev.local"}}}),
        Step(f"serve every Service under {DOMAIN} (requests carry Host headers)", "kubectl-patch",
             {"resource": "configmap/config-domain", "namespace": SYSTEM_NAMESPACE, "type": "merge",
              "patch": {"data": {DOMAIN: ""}}}),
        _apply_release(f"install Knative Eventing {versions.eventing} CRDs",
                       versions.release_url("eventing", "eventing-crds.yaml"), _crds_established()),
        _apply_release(f"install Knative Eventing {versions.eventing} core",
                       versions.release_url("eventing", "eventing-core.yaml"), _all_available("knative-eventing")),
        _apply_release(f"install eventing-redis {versions.eventing_redis} (RedisStreamSource)",
                       versions.release_url("eventing_redis", "redis-source.yaml"),
                       Wait("statefulset", "knative-sources", ROLLED_OUT, ("redis-controller-manager",))),
        Step("run Redis in the cluster", "kubectl-apply-file", {"path": REDIS_MANIFEST},
             (Wait("deployment", REDIS_NAMESPACE, AVAILABLE, (REDIS_DEPLOYMENT,)),)),
        Step(f"install the component ({layer} overlay), its Redis secret pointing at the cluster's Redis",
             "kubectl-apply-kustomize",
             {"path": overlay(layer),
              "secret": {"namespace": SYSTEM_NAMESPACE, "name": REDIS_SECRET, "key": REDIS_SECRET_KEY,
                         "value": REDIS_URL_IN_CLUSTER}},
             component_waits),
        _restart(SYSTEM_NAMESPACE, COMPONENT_DEPLOYMENTS, COMPONENT_SERVICES),
        *(
            Step(f"deploy the sample Service {service}", "kubectl-apply-file", {"path": path},
                 (Wait("ksvc", APP_NAMESPACE, READY, (service,)),))
            for path, service in zip(APP_MANIFESTS, APP_SERVICES)
        ),
        _restart(APP_NAMESPACE, (), APP_SERVICES),
        Step("wait until the gateway routes to the sample Services", "http-get",
             {"url": f"http://127.0.0.1:{host_port}/?sleep=0",
              "host": f"{APP_SERVICES[2]}.{APP_NAMESPACE}.{DOMAIN}", "expect": 200}, timeout=180.0),
    ]


def format_plan(layer: str, steps: list[Step]) -> str:
    lines = [f"kind e2e plan for {layer}: {len(steps)} steps"]
    for number, step in enumerate(steps, 1):
        lines.append(f"{number:3}. {step.name}")
        lines.append(f"      {step.describe()}")
    return "\n".join(lines)
