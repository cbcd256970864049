"""Runs a plan (plan.py) on a kind cluster made with pytest-kind, and explains failures.

The executor is thin on purpose: each step kind maps onto one kubectl, docker
or pytest-kind call. Mutating kubectl calls are retried until the step's
deadline, because a freshly installed webhook refuses requests for a while.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from . import manifests, plan, tools
from .plan import ROLLED_OUT, Step, Wait
from .versions import Versions

Write = Callable[[str], None]
RETRY_PAUSE = 5.0
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""The gateway is on loopback: never through an HTTP proxy from the environment."""


class KubectlError(RuntimeError):
    """A kubectl command failed; the message holds kubectl's own error."""


class StepFailed(RuntimeError):
    def __init__(self, number: int, step: Step, reason: str) -> None:
        super().__init__(f"kind setup failed at step {number} ({step.name}): {reason}")
        self.step = step


class Kubectl:
    """kubectl against one cluster, through pytest-kind's ``KindCluster.kubectl``."""

    def __init__(self, call: Callable[..., str]) -> None:
        self._call = call

    def run(self, *args: str, input: str | None = None, timeout: float | None = None) -> str:
        try:
            return self._call(*args, input=input, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.CalledProcessError as exc:
            message = (exc.stderr or exc.output or "").strip() or f"exit status {exc.returncode}"
            raise KubectlError(f"kubectl {' '.join(args)}: {message}") from None
        except subprocess.TimeoutExpired:
            raise KubectlError(f"kubectl {' '.join(args)}: no answer within {timeout}s") from None

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json"))


def _namespace_args(namespace: str | None) -> list[str]:
    return ["-n", namespace] if namespace else []


def wait_command(wait: Wait, seconds: float) -> list[str]:
    """The kubectl command that blocks until ``wait`` holds (or ``seconds`` pass)."""
    timeout = f"--timeout={max(int(seconds), 1)}s"
    ns = _namespace_args(wait.namespace)
    if wait.condition == ROLLED_OUT:
        (name,) = wait.names or ("",)
        return ["rollout", "status", f"{wait.resource}/{name}", *ns, timeout]
    targets = [f"{wait.resource}/{name}" for name in wait.names] or [wait.resource]
    select = ["-l", wait.selector] if wait.selector else ([] if wait.names else ["--all"])
    return ["wait", f"--for=condition={wait.condition}", *targets, *select, *ns, timeout]


def expand_rollouts(wait: Wait) -> list[Wait]:
    """``kubectl rollout status`` takes one object at a time."""
    if wait.condition != ROLLED_OUT or len(wait.names) <= 1:
        return [wait]
    return [dataclasses.replace(wait, names=(name,)) for name in wait.names]


class Executor:
    def __init__(self, kubectl: Kubectl, repo_root: Path, write: Write, *,
                 create: Callable[[Path], None], load_image: Callable[[str], None], reused: bool,
                 retry_pause: float = RETRY_PAUSE) -> None:
        self.kubectl = kubectl
        self.repo_root = repo_root
        self.write = write
        self.create = create
        self.load_image = load_image
        self.reused = reused
        self.retry_pause = retry_pause

    def run(self, steps: list[Step]) -> None:
        for number, step in enumerate(steps, 1):
            prefix = f"[kind {number}/{len(steps)}] {step.name}"
            if step.only_on_reused_cluster and not self.reused:
                self.write(f"{prefix}: skipped (fresh cluster)")
                continue
            self.write(f"{prefix} ...")
            started = time.monotonic()
            deadline = started + step.timeout
            try:
                getattr(self, "_" + step.kind.replace("-", "_"))(step, deadline)
                for wait in step.waits:
                    for single in expand_rollouts(wait):
                        self._wait(single, deadline)
            except (RuntimeError, OSError, ValueError, yaml.YAMLError, subprocess.SubprocessError) as exc:
                raise StepFailed(number, step, str(exc)) from None
            self.write(f"{prefix}: done in {time.monotonic() - started:.1f}s")

    # --- step kinds

    def _kind_create(self, step: Step, deadline: float) -> None:
        self.create(self.repo_root / step.args["config"])
        self._wait(Wait("node", None, plan.READY), deadline)

    def _docker_build(self, step: Step, deadline: float) -> None:
        args = step.args
        command = ["docker", "build", "-t", args["image"], "-f", args["dockerfile"], args["context"]]
        done = subprocess.run(command, cwd=self.repo_root, capture_output=True, text=True,
                              timeout=max(deadline - time.monotonic(), 1), stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
            raise RuntimeError(f"{' '.join(command)} failed:\n{tail}")

    def _kind_load(self, step: Step, deadline: float) -> None:
        self.load_image(step.args["image"])

    def _kubectl_apply_url(self, step: Step, deadline: float) -> None:
        args = ["apply", "-f", step.args["url"]]
        if step.args.get("server_side"):
            args += ["--server-side", "--force-conflicts"]
        self._retry(deadline, *args)

    def _kubectl_apply_file(self, step: Step, deadline: float) -> None:
        self._retry(deadline, "apply", "-f", str(self.repo_root / step.args["path"]))

    def _kubectl_apply_kustomize(self, step: Step, deadline: float) -> None:
        docs = manifests.kustomize(self.repo_root / step.args["path"], self.kubectl.run)
        secret = step.args.get("secret")
        if secret:
            docs = manifests.with_secret_value(docs, **secret)
        self._retry(deadline, "apply", "-f", "-", input=manifests.dump_docs(docs))

    def _kubectl_patch(self, step: Step, deadline: float) -> None:
        args = step.args
        self._retry(deadline, "patch", args["resource"], *_namespace_args(args["namespace"]),
                    "--type", args["type"], "-p", json.dumps(args["patch"]))

    def _restart_pods(self, step: Step, deadline: float) -> None:
        ns = _namespace_args(step.args["namespace"])
        for name in step.args["deployments"]:
            self._retry(deadline, "rollout", "restart", f"deployment/{name}", *ns)
        for name in step.args["knative_services"]:
            self._retry(deadline, "delete", "pod", "-l", f"{plan.KNATIVE_SERVICE_LABEL}={name}", *ns)

    def _http_get(self, step: Step, deadline: float) -> None:
        args = step.args
        last = "no answer"
        while True:
            request = urllib.request.Request(args["url"], headers={"Host": args["host"]})
            try:
                with DIRECT.open(request, timeout=10) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (OSError, urllib.error.URLError) as exc:
                status, last = None, str(exc)
            if status == args["expect"]:
                return
            if status is not None:
                last = f"HTTP {status}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"GET {args['url']} (Host: {args['host']}) still answers {last}, "
                                   f"expected {args['expect']}")
            time.sleep(2)

    # --- helpers

    def _retry(self, deadline: float, *args: str, input: str | None = None) -> str:
        while True:
            try:
                return self.kubectl.run(*args, input=input, timeout=max(deadline - time.monotonic(), 10))
            except KubectlError as exc:
                if time.monotonic() + self.retry_pause > deadline:
                    raise
                self.write(f"      retrying in {self.retry_pause:g}s: {str(exc).splitlines()[0][:200]}")
                time.sleep(self.retry_pause)

    def _wait(self, wait: Wait, deadline: float) -> None:
        """``kubectl wait``, retried while the objects do not exist yet."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                self.kubectl.run(*wait_command(wait, remaining), timeout=remaining + 15)
                return
            except KubectlError as exc:
                missing = "no matching resources" in str(exc) or "NotFound" in str(exc)
                if not missing or time.monotonic() + self.retry_pause > deadline:
                    raise KubectlError(f"not ready: {wait.describe()}: {exc}") from None
                time.sleep(self.retry_pause)


# --- diagnostics


def diagnose(kubectl: Kubectl, step: Step) -> str:
    """Status, recent events and the component's logs: what to read when a step failed."""
    sections: list[tuple[str, list[str]]] = []
    namespaces: list[str] = []
    for wait in step.waits:
        target = [wait.resource, *wait.names] + (["-l", wait.selector] if wait.selector else [])
        sections.append((f"{wait.describe()}", ["get", *target, *_namespace_args(wait.namespace), "-o", "wide"]))
        for name in wait.names:
            sections.append((f"{wait.resource} {name}", ["describe", wait.resource, name,
                                                         *_namespace_args(wait.namespace)]))
        if wait.namespace and wait.namespace not in namespaces:
            namespaces.append(wait.namespace)
    for namespace in namespaces or [step.args.get("namespace") or plan.SYSTEM_NAMESPACE]:
        sections.append((f"pods in {namespace}", ["get", "pods", "-n", namespace, "-o", "wide"]))
        sections.append((f"recent events in {namespace}",
                         ["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"]))
    ns = ["-n", plan.SYSTEM_NAMESPACE]
    for name in plan.COMPONENT_DEPLOYMENTS:
        sections.append((f"logs of {name}", ["logs", f"deployment/{name}", *ns, "--all-containers", "--tail=40"]))
    for name in plan.COMPONENT_SERVICES:
        sections.append((f"logs of {name}", ["logs", "-l", f"{plan.KNATIVE_SERVICE_LABEL}={name}", *ns,
                                             "--all-containers", "--prefix", "--tail=40"]))
    out = []
    for title, args in sections:
        try:
            text = kubectl.run(*args, timeout=30)
        except KubectlError as exc:
            text = str(exc)
        lines = text.strip().splitlines()[-25:] or ["(nothing)"]
        out.append(f"--- {title}\n" + "\n".join(lines))
    return "\n".join(out)


# --- the cluster's life


@dataclasses.dataclass
class RunningCluster:
    name: str
    layer: str
    kubectl: Kubectl
    kubectl_path: Path
    kubeconfig: Path
    gateway_url: str
    repo_root: Path


class SetupFailed(RuntimeError):
    """The cluster could not be made ready; diagnostics were written already."""


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set variables only where the user has not (pytest-kind reads download URLs from env)."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def host_port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Docker binds: TIME_WAIT is no conflict
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def existing_clusters(kind: Path) -> list[str]:
    done = subprocess.run([str(kind), "get", "clusters"], capture_output=True, text=True, timeout=60)
    return done.stdout.split() if done.returncode == 0 else []


@contextlib.contextmanager
def kind_cluster(layer: str, *, name: str, keep: bool, repo_root: Path, versions: Versions,
                 write: Write) -> Iterator[RunningCluster]:
    """A cluster with everything the plan installs; deleted afterwards unless ``keep``."""
    write(f"[kind] Docker engine {tools.require_docker()}")
    try:
        from pytest_kind import KindCluster
    except ImportError:
        raise SetupFailed("pytest-kind-ng is not installed: run `tox -e e2e-kourier` or `tox -e e2e-istio`") from None
    steps = plan.build_plan(layer, versions, repo_root)
    host_port = plan.gateway_host_port(repo_root)
    cache = (repo_root / ".pytest-kind" / "bin").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    kind_path, kubectl_path = tools.choose_tools(versions, cache)
    cluster = KindCluster(name, image=versions.node_image, kind_path=kind_path, kubectl_path=kubectl_path)
    os_name, arch = tools.machine()
    with _env(KIND_DOWNLOAD_URL=versions.kind_url(os_name, arch)):
        cluster.ensure_kind()
    with _env(KUBECTL_DOWNLOAD_URL=versions.kubectl_url(os_name, arch)):
        cluster.ensure_kubectl()
    write(f"[kind] kind {kind_path}, kubectl {kubectl_path}")
    reused = name in existing_clusters(kind_path)
    if not reused and not host_port_free(host_port):
        raise SetupFailed(f"host port {host_port} ({plan.KIND_CONFIG}) is in use, maybe by another kept kind "
                          f"cluster (`kind get clusters`, `kind delete cluster --name <name>`)")
    write(f"[kind] {'reusing' if reused else 'creating'} cluster {name} for {layer}")
    kubectl = Kubectl(cluster.kubectl)
    executor = Executor(kubectl, repo_root, write, create=lambda config: cluster.create(config_file=config),
                        load_image=cluster.load_docker_image, reused=reused)
    try:
        try:
            executor.run(steps)
        except StepFailed as exc:
            write(str(exc))
            write(diagnose(kubectl, exc.step))
            hint = "" if keep else " (rerun with --keep-cluster to inspect it)"
            raise SetupFailed(f"{exc}{hint}") from None
        yield RunningCluster(name, layer, kubectl, Path(cluster.kubectl_path).resolve(),
                             Path(cluster.kubeconfig_path).resolve(), f"http://127.0.0.1:{host_port}", repo_root)
    finally:
        if keep:
            write(f"[kind] kept cluster {name}: KUBECONFIG={Path(cluster.kubeconfig_path).resolve()} kubectl get pods -A")
        else:
            write(f"[kind] deleting cluster {name}")
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                cluster.delete()
