"""What a perf or bench run records about where it ran, and memory readings from /proc."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return float("nan")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def facts(started: datetime.datetime) -> dict[str, str]:
    return {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores ({cpu_model()}), {memory_gib():.0f} GiB, "
                   f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "commit": commit(),
        "load before the run": load(),
    }


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (a producer's workers are its children)."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:  # exited meanwhile
            continue
    return total


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def wait_for_quiet(threshold: float, timeout: float) -> bool:
    """Wait until the 1-minute load average is below ``threshold``; False if it never got there."""
    import sys
    import time

    deadline = time.monotonic() + timeout
    while (current := os.getloadavg()[0]) >= threshold:
        if time.monotonic() > deadline:
            print(f"load still {current:.2f} after {timeout:.0f} s; running anyway", file=sys.stderr, flush=True)
            return False
        print(f"waiting for the load ({current:.2f}) to drop below {threshold:g}", file=sys.stderr, flush=True)
        time.sleep(10)
    return True


def cpu_seconds(pid: int, with_descendants: bool = True) -> float:
    """User plus system CPU time of ``pid`` (and, by default, of its descendants) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in [pid, *(descendants(pid) if with_descendants else [])]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks
