"""Docker, kind and kubectl on this machine: which to use, and refusing at once without Docker."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from .versions import Versions, parse_tool_version


class DockerUnavailable(RuntimeError):
    """No Docker engine answers; the kind run cannot start."""


def require_docker(timeout: float = 5.0, path: str | None = None) -> str:
    """The engine's version, or DockerUnavailable with a one-line reason.

    ``docker info`` talks to the engine; its timeout keeps a dead socket from
    hanging the run. ``path`` replaces PATH (tests use it to hide docker).
    """
    docker = shutil.which("docker", path=path)
    if docker is None:
        raise DockerUnavailable("no Docker engine: `docker` is not on PATH (the kind e2e run needs Docker)")
    env = dict(os.environ) if path is None else {**os.environ, "PATH": path}
    try:
        done = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DockerUnavailable(f"no Docker engine: `docker info` did not answer within {timeout:g}s") from None
    version = done.stdout.strip()
    if done.returncode != 0 or not version:
        reason = next((line.strip() for line in done.stderr.splitlines() if line.strip()), "no server version")
        raise DockerUnavailable(f"no Docker engine: `docker info` failed: {reason}")
    return version


def machine() -> tuple[str, str]:
    """(os, arch) as kind's and Kubernetes' download URLs spell them."""
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower())
    return platform.system().lower(), arch


def tool_version(binary: str, *args: str) -> tuple[int, int, int] | None:
    try:
        done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_tool_version(done.stdout + done.stderr)


def on_path(name: str, version_args: tuple[str, ...], minimum: tuple[int, int, int],
            path: str | None = None) -> Path | None:
    """``name`` from PATH when it is at least ``minimum``; otherwise None (the pinned one is downloaded)."""
    found = shutil.which(name, path=path)
    if found is None:
        return None
    version = tool_version(found, *version_args)
    return Path(found) if version is not None and version >= minimum else None


def choose_tools(versions: Versions, cache: Path, path: str | None = None) -> tuple[Path, Path]:
    """(kind, kubectl): PATH's when recent enough, else where pytest-kind downloads the pinned ones."""
    kind_minimum = parse_tool_version(versions.kind) or (0, 0, 0)
    kind = on_path("kind", ("version",), kind_minimum, path) or cache / f"kind-{versions.kind}"
    # kubectl supports servers one minor version older or newer than itself.
    minor = versions.kubernetes_minor or 0
    kubectl = on_path("kubectl", ("version", "--client"), (1, max(minor - 1, 0), 0), path) \
        or cache / f"kubectl-{versions.kubectl}"
    return kind, kubectl
