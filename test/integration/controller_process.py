"""``async-component controller`` as a child process, against the Kubernetes emulator or a real API server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from async_component.local.ports import free_port

STARTUP_DEADLINE = 30.0  # a busy machine imports kopf slowly


class Operator:
    def __init__(self, process: subprocess.Popen, log_path: Path, health_url: str) -> None:
        self.process, self.log_path, self.health_url = process, log_path, health_url

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def healthy(self) -> bool:
        return self.health() is not None

    def health(self) -> dict | None:
        """What /healthz answers, or None while it does not."""
        try:
            with urllib.request.urlopen(self.health_url, timeout=1) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def emulator_kubeconfig(server_url: str, path: Path) -> Path:
    """A kubeconfig for the emulator, which needs no credentials."""
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: emulator\n"
        f"clusters: [{{name: emulator, cluster: {{server: '{server_url}'}}}}]\n"
        "users: [{name: tester, user: {}}]\n"
        "contexts: [{name: emulator, context: {cluster: emulator, user: tester}}]\n"
    )
    return path


def start_operator(server_url: str, workdir: Path, name: str = "controller", *, kubeconfig: Path | None = None,
                   **env: str) -> Operator:
    """Start a controller on ``server_url`` (or as ``kubeconfig`` says) and wait until its liveness endpoint answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    if kubeconfig is None:
        kubeconfig = emulator_kubeconfig(server_url, workdir / "kubeconfig")
    health_port = free_port()
    environ = dict(os.environ, KUBECONFIG=str(kubeconfig), HEALTH_PORT=str(health_port),
                   SYSTEM_NAMESPACE="knative-system", LOG_LEVEL="INFO")
    environ.pop("INGRESS_CLASS_NAME", None)
    environ.update(env)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "async_component", "controller"],
                                   env=environ, stdout=log, stderr=subprocess.STDOUT)
    operator = Operator(process, log_path, f"http://127.0.0.1:{health_port}/healthz")
    deadline = time.monotonic() + STARTUP_DEADLINE
    while not operator.healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the controller did not start:\n{operator.log_tail()}")
        time.sleep(0.05)
    return operator
