"""``kubectl port-forward`` kept alive on one local port for the whole session.

pytest-kind's ``port_forward`` picks a new port per call and does not notice
when the pod behind it goes away; the backend's URLs must stay the same while
pods are killed and Redis restarts, so this keeps its own process per forward,
restarts it when it exits, and lets the backend restart it on purpose after it
replaced the pod.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from async_component.local.ports import free_port

log = logging.getLogger(__name__)


class PortForwardError(RuntimeError):
    """The forward did not open in time."""


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class PortForward:
    def __init__(self, kubectl: Path, kubeconfig: Path, namespace: str, target: Callable[[], str],
                 remote_port: int, *, scheme: str = "http") -> None:
        self.kubectl = kubectl
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.target = target
        """Returns what to forward to, e.g. ``svc/redis`` or ``pod/<name>``; called on every (re)start."""
        self.remote_port = remote_port
        self.local_port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.local_port}"
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._paused = False
        self._watchdog: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.restart(timeout)
        self._watchdog = threading.Thread(target=self._watch, name=f"port-forward-{self.local_port}", daemon=True)
        self._watchdog.start()

    def restart(self, timeout: float = 60.0) -> None:
        """(Re)start the forward, resolving the target again, and wait until the local port accepts."""
        deadline = time.monotonic() + timeout
        last = ""
        with self._lock:
            if self._stopped.is_set():
                return
            self._paused = False
            while True:
                self._kill()
                try:
                    last = self._spawn(min(deadline - time.monotonic(), 15.0))
                    if not last:
                        return
                except RuntimeError as exc:  # target not resolvable yet (no ready pod)
                    last = str(exc)
                if time.monotonic() > deadline:
                    raise PortForwardError(f"port-forward {self.namespace}/{self.remote_port} to "
                                           f"127.0.0.1:{self.local_port} did not open within {timeout:g}s: {last}")
                time.sleep(1)

    def pause(self) -> None:
        """Stop restarting it (the target is gone on purpose) until the next restart()."""
        with self._lock:
            self._paused = True
            self._kill()

    def close(self) -> None:
        self._stopped.set()
        with self._lock:
            self._kill()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)

    def _spawn(self, timeout: float) -> str:
        """Start kubectl; '' once the port accepts, else why not."""
        target = self.target()
        self._process = subprocess.Popen(
            [str(self.kubectl), "port-forward", "-n", self.namespace, target,
             f"{self.local_port}:{self.remote_port}", "--address", "127.0.0.1"],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return f"kubectl port-forward {target} exited with {self._process.returncode}"
            if port_open(self.local_port):
                log.info("port-forward %s/%s:%s on 127.0.0.1:%s", self.namespace, target, self.remote_port,
                         self.local_port)
                return ""
            time.sleep(0.2)
        return f"kubectl port-forward {target} did not listen within {timeout:g}s"

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopped.wait(backoff):
            with self._lock:
                alive = self._paused or (self._process is not None and self._process.poll() is None)
            if alive:
                backoff = 1.0
                continue
            try:
                self.restart(timeout=10)
                backoff = 1.0
            except PortForwardError as exc:
                log.debug("%s", exc)
                backoff = min(backoff * 2, 10.0)
