"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

No kubelet, no scheduler, no network: enough for what the controller meets
(CRDs with Knative's schemas, RBAC, server-side apply, watches, ownerReference
garbage collection, ServiceAccount tokens). Certificates and the
service-account key are made at start with openssl; an admin identity is a
static token in group system:masters, and other identities are ServiceAccount
tokens from the TokenRequest API, so RBAC is enforced for them.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from async_component.local.deathsig import DIE_WITH_PARENT
from async_component.local.ports import free_port

from kube.build import Binaries

KUBECTL = os.environ.get("KUBECTL", "kubectl")
SERVICE_CIDR = "10.96.0.0/16"  # addresses only allocated for Services, never routed
CONTROLLERS = ("garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
               "serviceaccount-token-controller", "root-ca-certificate-publisher-controller")


class ControlPlaneError(RuntimeError):
    """A component did not start or answer; the message ends with its log's tail."""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def make_pki(directory: Path) -> None:
    """A throwaway CA, a serving certificate for 127.0.0.1 and a service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=async-component test CA", cwd=directory)
    _openssl("req", *ec, "-keyout", "serving.key", "-out", "serving.csr", "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "serving.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n")
    _openssl("x509", "-req", "-in", "serving.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "serving.ext", "-out", "serving.crt", cwd=directory)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=directory)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)


def kubeconfig_text(server: str, ca_file: Path, token: str, user: str = "admin") -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [{"name": "kube", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "kube", "user": user}}],
    })


class ControlPlane:
    """Start with ``with ControlPlane(binaries, workdir, crds=...) as cp:``; everything stops on exit."""

    def __init__(self, binaries: Binaries, workdir: Path, *, crds: Iterable[dict[str, Any]] = (),
                 out: Callable[[str], None] = print) -> None:
        self.binaries = binaries
        self.crds = list(crds)
        self.workdir = workdir
        self.pki = workdir / "pki"
        self.out = out
        self.admin_token = uuid.uuid4().hex
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca_file = self.pki / "ca.crt"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self._processes: dict[str, subprocess.Popen] = {}
        self._ssl: ssl.SSLContext | None = None

    # -- processes ---------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        # The death signal fires when the starting *thread* ends: only the main thread's outlives the run.
        on_main_thread = threading.current_thread() is threading.main_thread()
        with self._log(name).open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=DIE_WITH_PARENT if on_main_thread else None)
        self._processes[name] = process
        return process

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        process = self._processes[name]
        while not ready():
            if process.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {process.returncode}:\n{_tail(self._log(name))}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{name} not ready after {timeout:.0f}s:\n{_tail(self._log(name))}")
            time.sleep(0.1)
        self.out(f"kube: {name} ready in {time.monotonic() - started:.1f}s")

    def _stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self._processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self._spawn("etcd", [
            str(self.binaries.etcd), "--name", "test", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--log-level", "warn",
            "--unsafe-no-fsync",  # a test cluster: durability across power loss does not matter
        ])
        self._wait("etcd", lambda: self._http_ok(f"{client}/health"), 60)

    def start_apiserver(self) -> None:
        (self.workdir / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        self._spawn("kube-apiserver", [
            str(self.binaries.kube_apiserver),
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--tls-cert-file={self.pki / 'serving.crt'}", f"--tls-private-key-file={self.pki / 'serving.key'}",
            f"--client-ca-file={self.ca_file}", f"--token-auth-file={self.workdir / 'tokens.csv'}",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            # as hardened clusters (OpenShift) do: setting blockOwnerDeletion needs update on the owner's finalizers
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--profiling=false", "--v=1",
        ])
        self._wait("kube-apiserver", lambda: self._api_ok("/readyz"), 180)

    def start_controller_manager(self) -> None:
        self._spawn("kube-controller-manager", [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={self.admin_kubeconfig}", f"--authentication-kubeconfig={self.admin_kubeconfig}",
            f"--authorization-kubeconfig={self.admin_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
            f"--controllers={','.join(CONTROLLERS)}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}", f"--root-ca-file={self.ca_file}",
            "--profiling=false", "--v=1",
        ])
        self._wait("kube-controller-manager", self._default_service_account_exists, 120)

    def kill_apiserver(self) -> None:
        """kill -9, as a crashed or evicted API server goes."""
        self._stop("kube-apiserver", signal.SIGKILL)

    def __enter__(self) -> ControlPlane:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            make_pki(self.pki)
            self.admin_kubeconfig.write_text(kubeconfig_text(self.url, self.ca_file, self.admin_token))
            self.start_etcd()
            self.start_apiserver()
            if self.crds:  # before the garbage collector starts, so it watches them from its first sync on
                self.install_crds(self.crds)
            self.start_controller_manager()
        except BaseException:
            self.stop()
            raise
        self.out(f"kube: control plane up at {self.url} in {time.monotonic() - started:.1f}s (logs in {self.workdir})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self._stop(name)

    # -- API ---------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _api_ok(self, path: str) -> bool:
        try:
            self.request("GET", path, timeout=2)
            return True
        except (OSError, urllib.error.URLError):
            return False

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30,
                content_type: str = "application/json") -> Any:
        """An admin request; its JSON answer, or its text (urllib.error.HTTPError on 4xx/5xx)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.admin_token}", "Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()) as resp:
            raw, is_json = resp.read(), resp.headers.get_content_type() == "application/json"
        return json.loads(raw) if raw and is_json else raw.decode(errors="replace")

    def _default_service_account_exists(self) -> bool:
        try:
            self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=2)
            return True
        except (OSError, urllib.error.URLError):
            return False

    def ensure_namespace(self, name: str) -> None:
        try:
            self.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": name}})
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A bound token for the ServiceAccount (TokenRequest API), as a pod would mount."""
        answer = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                              {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": seconds}})
        return answer["status"]["token"]

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([KUBECTL, f"--kubeconfig={self.admin_kubeconfig}", *args], input=stdin,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def apply(self, objects: Iterable[dict[str, Any]], *, field_manager: str = "async-component-tests",
              check: bool = True) -> subprocess.CompletedProcess[str]:
        """Server-side apply of ``objects``."""
        text = yaml.safe_dump_all(list(objects))
        return self.kubectl("apply", "--server-side", f"--field-manager={field_manager}", "-f", "-",
                            stdin=text, check=check)

    def install_crds(self, crds: list[dict[str, Any]]) -> None:
        started = time.monotonic()
        self.apply(crds)
        names = [f"crd/{crd['metadata']['name']}" for crd in crds]
        self.kubectl("wait", "--for=condition=Established", "--timeout=120s", *names)
        self.out(f"kube: {len(crds)} CRDs established in {time.monotonic() - started:.1f}s")

    def ca_bundle(self) -> str:
        return base64.b64encode(self.ca_file.read_bytes()).decode()

    def serving_cert(self) -> tuple[Path, Path]:
        """The loopback serving certificate and key (signed by the CA), for test webhooks."""
        return self.pki / "serving.crt", self.pki / "serving.key"
