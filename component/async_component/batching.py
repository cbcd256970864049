"""Redis writes of many concurrent requests, sent together in one round trip.

A round trip per request caps a producer at what one Redis connection can turn
around; here every request that asks for a write while no batch is being
collected joins the next batch, and all requests that arrive while a batch is in
flight join the one after it. Each batch is one MULTI/EXEC, so every request's
commands are applied together or not at all, and each request awaits only its
own replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

Command = Sequence[Any]
"""One Redis command as its arguments, e.g. ``("SET", key, value)``."""


class BatchWriter:
    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 256) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._pending: list[tuple[Sequence[Command], asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def transaction(self, *commands: Command) -> list[Any]:
        """Run ``commands`` atomically with the rest of the batch; their replies, in order.

        Raises the batch's error (connection refused, timeout, ...) or the first
        error reply among this request's own commands.
        """
        future = asyncio.get_running_loop().create_future()
        self._pending.append((commands, future))
        if self._task is None:
            # starts on the next pass of the loop: requests handled in this pass join it
            self._task = asyncio.create_task(self._drain())
        return await future

    async def close(self) -> None:
        """Let the batches already asked for finish."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._send(batch)
        finally:
            self._task = None

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future]]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for commands, _ in batch:
            for command in commands:
                pipe.execute_command(*command)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for commands, future in batch:
            mine = replies[start : start + len(commands)]
            start += len(commands)
            if future.done():  # its request went away; the write stands
                continue
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(mine)


def _copy(exc: BaseException) -> BaseException:
    """A fresh exception per waiting request, so their tracebacks do not pile up on one object."""
    if isinstance(exc, asyncio.CancelledError):
        return ConnectionError("the Redis write was cancelled (shutting down)")
    try:
        fresh = type(exc)(*exc.args)
    except Exception:
        return exc
    fresh.__cause__ = exc
    return fresh
