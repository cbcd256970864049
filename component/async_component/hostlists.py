"""Lists of allowed hosts (``ALLOWED_HOSTS``, ``NOTIFICATION_ALLOWED_HOSTS``): what an entry may be and what it matches.

The data plane applies them to every request and completion event; the
controller applies ``NOTIFICATION_ALLOWED_HOSTS`` to a Service's sink
annotations, so that the Service's owner reads the refusal in its status.
Both must read an entry the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST = re.compile(rf"{LABEL}(?:\.{LABEL})*")
_ENTRY = re.compile(rf"\.?{HOST.pattern}")


def entry_error(name: str, entry: str) -> str | None:
    """Why ``entry`` of the list ``name`` is unusable, or None."""
    if not _ENTRY.fullmatch(entry) or len(entry) > 254:
        return f"{name} entry {entry!r} is not a host name or a '.'-prefixed host suffix (wildcards are not supported)"
    return None


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Exact entries match one host, entries starting with '.' match every host ending with it."""
    name = host.partition(":")[0]
    exact, suffixes = _split_entries(allowed)
    return name in exact or name.endswith(suffixes)


_SPLIT: dict[int, tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]] = {}


def _split_entries(allowed: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """The exact names (a set) and the suffixes of ``allowed``; worked out once for a tuple (the settings'):
    every request is checked, and a local stack lists each of its Services (a thousand in a benchmark)."""
    if not isinstance(allowed, tuple):  # a list may change: no cache
        return _split(list(allowed))
    known = _SPLIT.get(id(allowed))
    if known is None or known[0] is not allowed:
        if len(_SPLIT) >= 16:
            _SPLIT.clear()
        known = _SPLIT[id(allowed)] = (allowed, *_split(allowed))
    return known[1], known[2]


def _split(entries: list[str] | tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    return frozenset(e for e in entries if not e.startswith(".")), tuple(e for e in entries if e.startswith("."))
