"""Lua scripts called by their SHA in one pipeline, loaded again where Redis lost them.

redis-py's ``Script`` in a pipeline first asks ``SCRIPT EXISTS`` on every
``execute()``: one more round trip and command per batch, on the source's
hottest path. Here each call is a bare ``EVALSHA``; a call Redis answers with
``NOSCRIPT`` (it restarted, or its scripts were flushed) did not run, and is
made again on its own, which loads the script.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Call = tuple[AsyncScript, Sequence[Any], Sequence[Any]]
"""A script, its keys and its arguments."""


async def run_scripts(redis: aioredis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Each call's reply, or the exception it raised, in order; all in one round trip unless a script was lost."""
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies = await pipe.execute(raise_on_error=False)
    for i, reply in enumerate(replies):
        if isinstance(reply, NoScriptError):
            script, keys, args = calls[i]
            try:
                replies[i] = await script(keys=keys, args=args)
            except Exception as exc:
                replies[i] = exc
    return replies


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: between the first ``{`` and the next ``}``, when not empty."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def by_hash_tag(keys: Iterable[str]) -> dict[str, list[int]]:
    """The positions of ``keys`` grouped by hash tag: the keys one script may touch together on Redis Cluster."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(hash_tag(key), []).append(i)
    return groups
