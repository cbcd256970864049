"""A process supervisor, as a Deployment would be one: start, wait for ready, restart what dies, stop in order.

Each process runs in its own process group (so workers it forks are signalled
with it, and a terminal's Ctrl-C reaches only whoever supervises), dies with
the thread that started it (:mod:`.deathsig`), and has its output copied line
by line to a tail buffer and, prefixed with its name, to an optional stream.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from . import StackError
from .deathsig import DIE_WITH_PARENT

log = logging.getLogger(__name__)

LOG_TAIL = 200
STOP_GRACE_SECONDS = 5.0


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Signal the child's process group, so workers it forked go too."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass(eq=False)
class Process:
    """One supervised process: how to start it and how to tell it is ready; then its current state."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    any_status: bool = False
    """Ready as soon as it answers HTTP at all (for a process without a health route)."""
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_due: float | None = None
    lines: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL))
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        return answers(self.ready_url, self.any_status)

    def tail(self, count: int = 15) -> str:
        lines = list(self.lines)[-count:]
        return "\n".join("    " + line for line in lines) if lines else "    (no output)"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers(url: str, any_status: bool = False) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=1.0) as response:
            return 200 <= response.status < 300 or any_status
    except urllib.error.HTTPError as exc:
        exc.close()
        return any_status
    except (OSError, ValueError):
        return False


class Supervisor:
    """Runs ``processes``; :meth:`start` returns once each is ready, :meth:`stop` ends them stage by stage."""

    def __init__(self, processes: Iterable[Process], *, output: TextIO | None = None) -> None:
        self.processes = {p.name: p for p in processes}
        self.output = output
        self._output_lock = threading.Lock()
        self._stopping = threading.Event()
        self._spawner: ThreadPoolExecutor | None = None
        self._watcher: threading.Thread | None = None

    def __getitem__(self, name: str) -> Process:
        try:
            return self.processes[name]
        except KeyError:
            raise StackError(f"no component {name!r}: one of {', '.join(self.processes)}") from None

    # --- starting

    def start(self, timeout: float) -> None:
        """Start every process, then wait for each in turn to be ready; raises :class:`StackError` naming the first that is not."""
        self._stopping.clear()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-spawner")
        for process in self.processes.values():
            self._spawn(process)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            self._await_first_start(process, deadline, timeout)
        self._watcher = threading.Thread(target=self._watch, name="local-supervisor", daemon=True)
        self._watcher.start()

    def _spawn(self, process: Process) -> None:
        # One long-lived thread starts every child, so Linux's parent-death signal
        # (tied to the starting thread) fires only when the supervisor itself goes away.
        self._spawner.submit(self._popen, process).result()

    def _popen(self, entry: Process) -> None:
        process = subprocess.Popen(
            entry.argv, env=entry.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, process_group=0, preexec_fn=DIE_WITH_PARENT,
        )
        entry.process = process
        entry.started_at = time.monotonic()
        threading.Thread(target=self._pump, args=(entry, process), name=f"local-log-{entry.name}",
                         daemon=True).start()

    def _pump(self, entry: Process, process: subprocess.Popen) -> None:
        """Copy the child's output, line by line, to the tail buffer and ``output``."""
        with process.stdout:
            for raw in process.stdout:
                self._line(entry, raw.decode("utf-8", "replace").rstrip("\n"))

    def _line(self, entry: Process, line: str) -> None:
        entry.lines.append(line)
        if self.output is not None:
            with self._output_lock:
                try:
                    self.output.write(f"{entry.name:<8} | {line}\n")
                    self.output.flush()
                except (OSError, ValueError):
                    pass

    def _await_first_start(self, entry: Process, deadline: float, timeout: float) -> None:
        while not entry.ready():
            code = entry.process.poll()
            if code is not None:
                entry.process.wait()
                time.sleep(0.1)  # let the output pump catch the last lines
                raise StackError(f"{entry.name} exited while starting ({describe_exit(code)}); "
                                 f"last log lines:\n{entry.tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"{entry.name} did not become ready within {timeout:g}s "
                                 f"({entry.ready_url}); last log lines:\n{entry.tail()}")
            time.sleep(0.05)

    # --- while running

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process and wait until it has exited; it is then restarted."""
        process = self[name].process
        if process is None or process.poll() is not None:
            raise StackError(f"{name} is not running")
        signal_group(process, sig)
        try:
            process.wait(STOP_GRACE_SECONDS * 2)
        except subprocess.TimeoutExpired:
            raise StackError(f"{name} (pid {process.pid}) is still running after signal {sig}") from None

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        """Return once the process runs and answers its readiness check."""
        entry = self[name]
        deadline = time.monotonic() + timeout
        while not (entry.alive() and entry.ready()):
            if time.monotonic() > deadline:
                raise StackError(f"{name} is not ready after {timeout:g}s ({entry.ready_url}); last log lines:\n{entry.tail()}")
            time.sleep(0.05)

    def _watch(self) -> None:
        """Restart processes that die, like a Deployment: quickly, backing off if they keep dying."""
        while not self._stopping.wait(0.1):
            for entry in self.processes.values():
                try:
                    self._check(entry)
                except Exception:  # the supervisor must outlive any one failure
                    log.exception("supervising %s failed", entry.name)

    def _check(self, entry: Process) -> None:
        with entry.lock:
            if self._stopping.is_set() or entry.process is None:
                return
            code = entry.process.poll()
            if code is None:
                return
            now = time.monotonic()
            if entry.restart_due is None:
                signal_group(entry.process, signal.SIGKILL)  # workers it may have left behind
                entry.restarts += 1
                lived = now - entry.started_at
                entry.backoff = 0.1 if lived > 10 else min(max(entry.backoff * 2, 0.1), 5.0)
                entry.restart_due = now + entry.backoff
                message = (f"{entry.name} (pid {entry.process.pid}) exited: {describe_exit(code)}; "
                           f"restarting in {entry.backoff:.1f}s (restart {entry.restarts})")
                if self.output is None:  # its lines are shown nowhere else: say why it exited, if it said
                    time.sleep(0.1)  # let the output pump catch the last lines
                    log.warning("%s; last log lines:\n%s", message, entry.tail())
                else:
                    log.warning("%s", message)
                entry.lines.append(f"local: {message}")
            elif now >= entry.restart_due:
                entry.restart_due = None
                self._spawn(entry)
                log.info("%s restarted (pid %d)", entry.name, entry.process.pid)

    # --- stopping

    def stop(self, stages: Sequence[tuple[Sequence[str], float]]) -> None:
        """Stop the processes stage by stage: SIGTERM to each of a stage, and the next stage only once
        they exited (SIGKILL after the stage's grace seconds). Processes no stage names go last."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        named = {name for names, _ in stages for name in names}
        rest = [name for name in self.processes if name not in named]
        for names, grace in [*stages, (rest, STOP_GRACE_SECONDS)]:
            self._stop_stage([self.processes[n] for n in names if n in self.processes], grace)
        if self._spawner is not None:
            self._spawner.shutdown(wait=True)
            self._spawner = None

    def _stop_stage(self, entries: list[Process], grace: float) -> None:
        running = [entry for entry in entries if entry.alive()]
        for entry in running:
            signal_group(entry.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for entry in running:
            try:
                entry.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", entry.name, grace)
        for entry in entries:
            if entry.process is not None:
                signal_group(entry.process, signal.SIGKILL)  # stragglers and any workers left behind
                entry.process.wait()
