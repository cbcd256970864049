"""Several forked worker processes serving one port (SO_REUSEPORT), under one parent.

The parent only forwards SIGTERM and SIGINT to its workers and waits: when one
worker dies on its own, the others are stopped too, so the process manager
(a kubelet, the local stack) sees the failure and restarts the whole.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


def run_workers(serve: Callable[[], int], count: int, name: str) -> int:
    """Run ``serve`` in ``count`` forked processes; end when they end, with the first failure's status."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_exit_with, args=(serve,), name=f"{name}-{n}") for n in range(count)]
    for worker in workers:
        worker.start()
    signalled = False

    def forward(signum: int, frame: object) -> None:
        nonlocal signalled
        signalled = True
        _signal_all(workers, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ready = multiprocessing.connection.wait([w.sentinel for w in workers])
    if signalled:
        for worker in workers:
            worker.join()
        return 0
    first = next(w for w in workers if w.sentinel in ready)
    first.join()
    log.error("worker %s exited with status %s; stopping the others", first.name, first.exitcode)
    _signal_all(workers, signal.SIGTERM)
    for worker in workers:
        worker.join()
    return first.exitcode or 1


def _exit_with(serve: Callable[[], int]) -> None:
    sys.exit(serve())


def _signal_all(workers: list[multiprocessing.process.BaseProcess], signum: int) -> None:
    for worker in workers:
        if worker.is_alive():
            os.kill(worker.pid, signum)
