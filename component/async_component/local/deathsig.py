"""Child processes that do not outlive whoever started them."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], object] | None:
    """A preexec_fn that has Linux send SIGTERM to the child when the thread that started it ends.

    So a stack or test run that is killed outright leaves no processes behind.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


DIE_WITH_PARENT = _parent_death_signal()
