"""A throwaway ``redis-server`` on loopback, for the local stack and the tests.

It runs from PATH in its own temp dir and is gone (process and dir) after
:meth:`RedisServer.stop`. It runs as the project asks every Redis to run
(component/config/README.md): ``appendonly yes`` with ``appendfsync
everysec`` and ``maxmemory-policy noeviction``, so even a killed server comes
back from its dir with every write it acknowledged (short of a machine crash);
:meth:`RedisServer.kill` shuts it down cleanly and :meth:`RedisServer.start`
brings it back with its data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .deathsig import DIE_WITH_PARENT
from .ports import free_port


class RedisServerError(RuntimeError):
    pass


class RedisServer:
    def __init__(self, port: int | None = None, *, executable: str = "redis-server",
                 extra_args: tuple[str, ...] = ()) -> None:
        self.executable = executable
        self.extra_args = extra_args
        self.port = port or free_port()
        self.dir: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        path = shutil.which(self.executable)
        if path is None:
            raise RedisServerError(
                f"{self.executable} not found on PATH: install it (Debian: apt-get install -y redis-server) or pass --redis-url"
            )
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="async-component-redis-"))
        self.process = subprocess.Popen(
            [path, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
             "--save", "", "--protected-mode", "yes", "--loglevel", "warning", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=DIE_WITH_PARENT,
            process_group=0,  # a terminal's Ctrl-C goes to whoever started it, which stops it last
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {err.strip()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self, *, hard: bool = False) -> None:
        """Stop the server but keep the port and dir, so :meth:`start` brings it back.

        ``hard`` is ``kill -9``: no shutdown, so only what AOF's fsync already wrote survives.
        """
        if self.process is not None and self.process.poll() is None:
            if hard:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def stop(self) -> None:
        self.kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
