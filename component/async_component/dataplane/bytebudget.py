"""Bytes held at once, admitted in arrival order.

The consumer takes an event's size from the budget before it reads the
event's body: past ``BODY_MEMORY_LIMIT`` the next events wait, their bodies
left in the socket (TCP holds the sender back), rather than a burst of large
events taking the process past its memory limit. An event alone is always
admitted, however large; a large one is never overtaken for ever by small
ones, since admission is first come, first served.
"""

from __future__ import annotations

import asyncio
import collections


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, future in self._waiting if not future.done())

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    def must_wait(self, size: int) -> bool:
        """Whether :meth:`take` of ``size`` would wait: no room, or others waiting before it."""
        return bool(self._waiting) or not self._fits(size)

    async def take(self, size: int) -> bool:
        """Hold ``size`` bytes, once those held before it leave room; whether it had to wait."""
        if not self.must_wait(size):
            self.held += size
            return False
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():  # admitted as it was cancelled
                self.give(size)
            else:
                entry[1].cancel()
                self._admit()
            raise
        return True

    def give(self, size: int) -> None:
        self.held -= size
        self._admit()

    def _admit(self) -> None:
        waiting = self._waiting
        while waiting:
            size, future = waiting[0]
            if future.done():  # its waiter was cancelled
                waiting.popleft()
                continue
            if not self._fits(size):
                return
            waiting.popleft()
            self.held += size
            future.set_result(None)
