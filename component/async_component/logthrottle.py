"""Rate-limited warnings, so an outage logs a line every few seconds instead of one per event."""

from __future__ import annotations

import logging
import time

WARNING_INTERVAL = 10.0


class LogThrottle:
    """At most one warning per interval; the ones held back are counted in the next."""

    def __init__(self, logger: logging.Logger, interval: float = WARNING_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self.last = float("-inf")
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> bool:
        """Log unless one was logged within the interval; whether it was logged."""
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            message += f" ({self.suppressed} similar failures not logged)"
        self.logger.warning(message, *args)
        self.last, self.suppressed = now, 0
        return True
