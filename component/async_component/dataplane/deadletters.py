"""Writing to the dead-letter stream, bounded so that it cannot grow without limit.

Entries are built by :func:`..protocol.dead_letter_entry`; the stream keeps
about ``DEAD_LETTER_MAX_LENGTH`` of the newest. Trimming is approximate
(``XADD MAXLEN ~``): Redis drops whole nodes of its radix tree, so the stream
may hold up to a node's worth (``stream-node-max-entries``, 100 by default)
more, and trimming stays as cheap as the XADD itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..settings import ReplaySettings


def add_dead_letter(pipe: Any, settings: ReplaySettings, entry: Mapping[Any, Any]) -> None:
    """Add ``entry`` to the dead-letter stream within the transaction or pipeline ``pipe``."""
    pipe.xadd(settings.dead_letter_stream, dict(entry), maxlen=settings.dead_letter_max_length, approximate=True)
