"""Run wrk with perf/post.lua and read the JSON line its ``done`` hook prints."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import uuid
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "post.lua"
MARK = "WRK_JSON "
DEFAULT_TARGET = "helloworld-sleep.default.svc.cluster.local"


class WrkError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int
    """Connection, read, write and timeout errors plus non-2xx/3xx answers."""
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def parse(output: str) -> WrkResult:
    line = next((l for l in output.splitlines() if l.startswith(MARK)), None)
    if line is None:
        raise WrkError(f"wrk printed no summary line: {output.strip()[-500:]}")
    doc = json.loads(line[len(MARK):])
    errors = sum(doc[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return WrkResult(requests=doc["requests"], seconds=doc["duration_us"] / 1e6, errors=errors,
                     p50_ms=doc["p50_us"] / 1000, p99_ms=doc["p99_us"] / 1000, max_ms=doc["max_us"] / 1000)


def combine(rounds: list[WrkResult]) -> WrkResult:
    """Several rounds as one: counts and time added up, the median round's percentiles, the worst max."""
    return WrkResult(
        requests=sum(r.requests for r in rounds), seconds=sum(r.seconds for r in rounds),
        errors=sum(r.errors for r in rounds), p50_ms=statistics.median(r.p50_ms for r in rounds),
        p99_ms=statistics.median(r.p99_ms for r in rounds), max_ms=max(r.max_ms for r in rounds),
    )


def run(url: str, *, seconds: float, connections: int = 64, threads: int = 1, body_bytes: int = 1024,
        target_host: str = DEFAULT_TARGET, max_requests: int = 0, keys: bool | None = None,
        target_hosts: list[str] | None = None) -> WrkResult:
    """POST ``body_bytes`` to ``url`` (127.0.0.1 only) for ``seconds``, or until ``max_requests`` answers.

    ``keys``: True, a new ``Idempotency-Key`` on every request; False, none but each request built the same
    way (the baseline for True); None, one request built once (fastest for wrk). ``target_hosts``: each
    request's target in turn instead of ``target_host`` (every request built, as with ``keys``).
    """
    if not url.startswith("http://127.0.0.1:"):
        raise WrkError(f"refusing to load {url}: benchmarks only target 127.0.0.1")
    executable = shutil.which("wrk")
    if executable is None:
        raise WrkError("wrk not found on PATH (Debian: apt-get install -y wrk)")
    env = {**os.environ, "WRK_BODY_BYTES": str(body_bytes), "WRK_TARGET_HOST": target_host,
           "WRK_MAX_REQUESTS": str(-(-max_requests // threads) if max_requests else 0)}
    if keys is not None:
        env.update(WRK_KEYS="on" if keys else "off", WRK_KEY_PREFIX=uuid.uuid4().hex)
    if target_hosts:
        env["WRK_TARGET_HOSTS"] = ",".join(target_hosts)
    argv = [executable, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(SCRIPT), url]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse(done.stdout)
