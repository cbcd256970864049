"""Large buffers go back to the system when freed, so a burst of large bodies does not leave a process holding them.

glibc serves a block above its mmap threshold with a mapping of its own, given back when freed; but each such
free raises the threshold to the block's size, so the next bodies of that size come from the heap, which is
given back only from its top. After a burst of 40 bodies of 5.5 MB the producer kept 430 MB of resident
memory (perf/README.md, "Large bodies"). A fixed threshold, glibc's own starting one, keeps every block of
128 KiB or more in its own mapping (a body arrives in reads of up to 256 KiB); smaller allocations are
untouched.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number (glibc's malloc.h)."""
THRESHOLD = 128 * 1024


def release_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; whether it took (False where the C library is not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl (Alpine) has no mallopt, and returns memory on its own
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed large buffers may stay resident")
    return done
