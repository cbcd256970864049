"""Writing to the dead-letter stream, bounded so that it cannot grow without limit.

Entries are built by :func:`..protocol.dead_letter_entry`; the stream keeps
about ``DEAD_LETTER_MAX_LENGTH`` of the newest. Trimming is approximate
(``XADD MAXLEN ~``): Redis drops whole nodes of its radix tree, so the stream
may hold up to a node's worth (``stream-node-max-entries``, 100 by default)
more, and trimming stays as cheap as the XADD itself.

On a Redis Cluster each Service has its own dead-letter stream,
``<DEAD_LETTER_STREAM>:{<namespace>/<name>}``, in its slot: it is written in the
transaction that records the request's failure, which may touch one slot only.
Each keeps about ``DEAD_LETTER_MAX_LENGTH``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import DEAD_LETTER_SERVICE_FIELD
from ..settings import ReplaySettings


def dead_letter_key(settings: ReplaySettings, service: str | None) -> str:
    """The dead-letter stream of ``service`` (``namespace/name``, or a host): DEAD_LETTER_STREAM, or on a cluster
    the Service's own."""
    return f"{settings.dead_letter_stream}:{{{service}}}" if settings.cluster and service else \
        settings.dead_letter_stream


def add_dead_letter(pipe: Any, settings: ReplaySettings, entry: Mapping[Any, Any]) -> None:
    """Add ``entry`` (naming its Service) to the dead-letter stream within the transaction or pipeline ``pipe``."""
    pipe.xadd(dead_letter_key(settings, entry.get(DEAD_LETTER_SERVICE_FIELD)), dict(entry),
              maxlen=settings.dead_letter_max_length, approximate=True)
