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


class LargeGarbage:
    """A full collection each time ``every`` bytes of large objects were let go of.

    With the thresholds above, a cycle that holds a large body (an exception's traceback, which
    holds the frames that held the body: redis-py makes one for each error reply in a pipeline)
    lives until a full collection, which comes after 4 million allocations, and never while a
    process is idle. After a burst of 5.5 MB requests the source kept ~75 MB of such garbage (a
    dozen bodies) for as long as it was idle. Bounded by bytes rather than by time, so a process
    that handles small requests collects no more often than before: once per ``every`` bytes.
    """

    __slots__ = ("every", "freed")

    def __init__(self, every: int) -> None:
        self.every = every
        self.freed = 0

    def let_go(self, size: int) -> None:
        self.freed += size
        if self.freed >= self.every:
            self.freed = 0
            gc.collect()
