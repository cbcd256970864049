"""The garbage collector's settings for the data plane's busy processes (producer workers, source)."""

from __future__ import annotations

import gc


def tune() -> None:
    """Fewer, larger young collections, and the startup objects frozen out of full ones.

    Call once startup is done. Each request allocates many short-lived objects (futures, tasks,
    headers, JSON). With the default thresholds the objects in flight at each young collection are
    promoted, so a full collection of every module, class and client object came every second or
    two: in the producer 15-35 ms with the event loop stopped (most of its p99), in the source ~8 %
    of its CPU during a drain (perf/profiling.md).
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
