"""Work of many concurrent requests, sent to Redis together in one round trip.

A round trip per request caps a producer at what one Redis connection can turn
around. Here every item submitted while no batch is being sent joins the next
batch (so all requests handled in the same pass of the event loop go
together), and everything submitted while a batch is in flight joins the one
after it. The batch size thereby follows the load without any timer.

A batch is also bounded in bytes (``max_bytes``, each item's size given with it):
one Redis command carrying hundreds of large bodies kept Redis busy for seconds,
past its clients' socket timeout, so requests Redis had queued were answered 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

Send = Callable[[list[Item]], Awaitable[Sequence["Result | Exception"]]]
"""Sends one batch; returns one result or exception per item, in order, or raises for all."""


class Batcher(Generic[Item, Result]):
    def __init__(self, send: Send, *, max_batch: int = 256, max_bytes: int = 0) -> None:
        """``max_bytes`` (0: no bound): the most a batch's items' sizes (``submit``) add up to, past its first."""
        self._send = send
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._pending: list[tuple[Item, asyncio.Future, int]] = []
        self._pending_bytes = 0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: Item, size: int = 0) -> asyncio.Future[Result]:
        """Send ``item`` with the next batch; the future gets its own result, or its own (or the batch's) error.

        A plain function returning the future: one coroutine less per item on the producer's hot path.
        """
        loop = self._loop
        if loop is None:  # looked up once: on Python 3.11 every lookup costs a getpid() system call
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future, size))
        self._pending_bytes += size
        if self._task is None:
            # starts on the next pass of the loop: requests handled in this pass join it
            self._task = loop.create_task(self._drain())
        return future

    async def close(self) -> None:
        """Let the batches already submitted finish."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        try:
            while self._pending:
                count = self._count()
                batch = self._pending[:count]
                del self._pending[:count]
                await self._deliver(batch)
        finally:
            self._task = None

    def _count(self) -> int:
        """How many of the pending items the next batch takes: at least one, within both bounds."""
        count = min(self._max_batch, len(self._pending))
        if self._max_bytes and self._pending_bytes > self._max_bytes:  # else every pending item fits
            total = 0
            for n in range(count):
                total += self._pending[n][2]
                if total > self._max_bytes and n:
                    count = n
                    break
        if count == len(self._pending):
            self._pending_bytes = 0
        elif self._max_bytes:
            self._pending_bytes -= sum(pending[2] for pending in self._pending[:count])
        return count

    async def _deliver(self, batch: list[tuple[Item, asyncio.Future, int]]) -> None:
        try:
            results = await self._send([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
        except BaseException as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(_copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future, _), result in zip(batch, results):
            if future.done():  # its request went away; what was written stands
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class GroupedBatcher(Generic[Item, Result]):
    """A :class:`Batcher` per group of items (on a Redis Cluster: per master), so a group whose batch is slow (a
    master that hangs until the socket timeout) holds up only its own items, never the next batch of the others.

    ``group_of(item)`` names an item's group; None puts it with the items of no known group (a cluster whose slot
    map is not known yet). Without ``group_of`` (one server) there is one batcher.
    """

    def __init__(self, send: Send, group_of: Callable[[Item], str | None] | None, **options: int) -> None:
        self._send = send
        """Read when a batch goes (not when a group's batcher is made), like :class:`Batcher`'s."""
        self._group_of = group_of
        self._options = options
        self._default = Batcher(self._dispatch, **options)
        self._groups: dict[str, Batcher[Item, Result]] = {}

    def submit(self, item: Item, size: int = 0) -> asyncio.Future[Result]:
        """Send ``item`` with the next batch of its group: see :meth:`Batcher.submit`."""
        group = None if self._group_of is None else self._group_of(item)
        if group is None:
            return self._default.submit(item, size)
        batcher = self._groups.get(group)
        if batcher is None:
            batcher = self._groups[group] = Batcher(self._dispatch, **self._options)
        return batcher.submit(item, size)

    async def close(self) -> None:
        for batcher in (self._default, *self._groups.values()):
            await batcher.close()

    def _dispatch(self, items: list[Item]) -> Awaitable[Sequence[Result | Exception]]:
        return self._send(items)


def _copy(exc: BaseException) -> BaseException:
    """A fresh exception per waiting request, so their tracebacks do not pile up on one object."""
    if isinstance(exc, asyncio.CancelledError):
        return ConnectionError("the batch was cancelled (shutting down)")
    try:
        fresh = type(exc)(*exc.args)
    except Exception:
        return exc
    fresh.__cause__ = exc
    return fresh
