"""The data plane's collector policy: large garbage in cycles does not wait for a rare full collection."""

from __future__ import annotations

import gc
import tracemalloc

from async_component.dataplane.gcpolicy import LargeGarbage


def _cycle_holding(size: int) -> None:
    """A body held by a frame that its own exception's traceback holds: the shape redis-py leaves behind."""
    body = b"x" * size  # noqa: F841 (held by the frame)
    try:
        raise ValueError("an error reply")
    except ValueError as exc:
        kept = exc  # noqa: F841 (the frame holds its exception, whose traceback holds the frame)


def test_a_cycle_holding_large_bodies_is_freed_once_the_bytes_let_go_pass_the_bound():
    full = []

    def on_collect(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(info["collected"])

    garbage = LargeGarbage(every=2_000_000)
    was_enabled = gc.isenabled()
    gc.disable()  # as in a process whose full collections are far apart (gcpolicy.tune)
    gc.collect()
    gc.callbacks.append(on_collect)
    tracemalloc.start()
    try:
        _cycle_holding(1_000_000)
        garbage.let_go(1_000_000)
        held, _ = tracemalloc.get_traced_memory()
        assert held >= 1_000_000 and full == []  # under the bound: still there, nothing collected
        _cycle_holding(1_000_000)
        garbage.let_go(1_000_000)
        held, _ = tracemalloc.get_traced_memory()
        assert held < 100_000
        assert len(full) == 1 and full[0] > 0
        garbage.let_go(1_999_999)
        assert len(full) == 1  # the count starts again after each collection
    finally:
        tracemalloc.stop()
        gc.callbacks.remove(on_collect)
        if was_enabled:
            gc.enable()
