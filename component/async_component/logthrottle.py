"""Rate-limited warnings, so an outage logs a line every few seconds instead of one per event."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

WARNING_INTERVAL = 10.0


class LogThrottle:
    """At most one warning per interval for each message (its format string), the ones held back counted in its
    next: during an outage one kind of failure must not hide another (a refused ack behind a refused read)."""

    def __init__(self, logger: logging.Logger, interval: float = WARNING_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, message: str, *args: object) -> bool:
        """Log unless the same message was logged within the interval; whether it was logged."""
        now = self.clock()
        if now - self._last.get(message, float("-inf")) < self.interval:
            self._held[message] = self._held.get(message, 0) + 1
            return False
        self._last[message] = now
        held = self._held.pop(message, 0)
        self.logger.warning(message + (f" ({held} similar failures not logged)" if held else ""), *args)
        return True
