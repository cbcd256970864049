"""The go command, for what the kube backend takes from the Go module proxy.

Builds and module downloads share these settings: the machine's own Go
(GOTOOLCHAIN=local, never a downloaded toolchain), a static binary
(CGO_ENABLED=0), and -mod=mod so a wrapper module made at build time may
record its go.sum as it goes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any


class GoError(RuntimeError):
    """The go command is missing or failed; the message carries its output."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def go_binary() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if found is None:
        raise GoError("the go command is not on PATH (nor /usr/local/go/bin/go); the kube backend builds with it")
    return found


def go_env() -> dict[str, str]:
    env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0")
    env["GOFLAGS"] = " ".join(flag for flag in (env.get("GOFLAGS", "").split() + ["-mod=mod", "-buildvcs=false"]) if flag)
    return env


def run_go(*args: str, cwd: Path | None = None, nice: bool = False, timeout: float | None = None) -> str:
    """Run go; its stdout, or :class:`GoError` with the tail of its output."""
    command = [go_binary(), *args]
    if nice and shutil.which("nice"):
        command = ["nice", "-n", "10", *command]
    result = subprocess.run(command, cwd=cwd, env=go_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-30:])
        raise GoError(f"`go {' '.join(args)}` failed (exit {result.returncode}):\n{tail}", result.stdout)
    return result.stdout


def download(module: str, version: str) -> dict[str, Any]:
    """``go mod download -json module@version``: its Dir (sources) and GoMod (go.mod file) among others."""
    try:
        info = json.loads(run_go("mod", "download", "-json", f"{module}@{version}", timeout=600))
    except GoError as exc:  # -json still prints the module with its Error: say just that
        try:
            info = json.loads(exc.output)
        except ValueError:
            raise exc from None
    if info.get("Error"):
        raise GoError(info["Error"])  # it names the module and version
    return info


def requirement(go_mod: Path, module: str) -> str | None:
    """The version ``go_mod`` requires of ``module`` (None when it does not)."""
    for line in go_mod.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["require"]:
            parts = parts[1:]
        if len(parts) >= 2 and parts[0] == module and parts[1].startswith("v"):
            return parts[1]
    return None
