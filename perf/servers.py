"""Processes a benchmark starts on 127.0.0.1 and stops again: the producer and the bare handler."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from async_component.local.ports import free_port

PERF = Path(__file__).resolve().parent


class ServerError(RuntimeError):
    pass


class Server:
    """A process listening on a free loopback port, in its own process group so it stops whole."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.argv = argv
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()
        """stderr goes to a file: a pipe nobody reads would block a chatty server."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> Server:
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(self.argv, env=env, stdout=subprocess.DEVNULL, stderr=self.log,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ServerError(f"{self.name} did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-size:].strip()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def producer(redis_url: str, workers: int, stream: str = "async-requests") -> Server:
    """``async-component producer`` as the Deployment runs it, with ``WORKERS`` processes.

    Its Service's queue is uncapped here: wrk queues far more than the default 100,000 with no source
    draining, and a 503 for a full queue would be counted as an error.
    """
    port = free_port()
    env = {"REDIS_URL": redis_url, "PORT": str(port), "HOST": "127.0.0.1", "WORKERS": str(workers),
           "STREAM_NAME": stream, "LOG_LEVEL": "WARNING", "MAX_QUEUED_PER_SERVICE": str(10**9)}
    return Server(f"producer ({workers} worker{'s' if workers > 1 else ''})",
                  [sys.executable, "-m", "async_component", "producer"], env, port)


def bare(workers: int) -> Server:
    port = free_port()
    return Server(f"bare aiohttp ({workers} worker{'s' if workers > 1 else ''})",
                  [sys.executable, str(PERF / "bare.py"), "--port", str(port), "--workers", str(workers)], port=port)
