"""Redis commands packed by hiredis (C) instead of redis-py's Python packer.

redis-py's asyncio connections pack every command in Python, argument by argument, re-joining
a growing buffer for each: for the producer's batch script (one argument of ~1.3 KB per request,
two with an idempotency key) about 0.7 µs per request, 1.4 with a key; hiredis packs the same
bytes for 0.2-0.3 (perf/profiling.md). hiredis is already a dependency (it parses the replies).
"""

from __future__ import annotations

import functools

import hiredis
from redis.asyncio.connection import AbstractConnection


def packing(client) -> None:
    """Make ``client``'s pool (a ``redis.asyncio.Redis``) open connections that pack with hiredis."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None and not issubclass(pool.connection_class, _Packed):
        pool.connection_class = _packed(pool.connection_class)


class _Packed(AbstractConnection):
    def pack_command(self, *args):
        if isinstance(args[0], str):  # a command name such as 'CONFIG GET' is sent as two arguments
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a bytearray (redis-py sends its bytes), or a type it refuses too (None, bool)
            return super().pack_command(*args)


@functools.cache
def _packed(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    return type(f"Packed{connection_class.__name__}", (_Packed, connection_class), {})
