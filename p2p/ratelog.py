"""A log that says a repeated warning once per interval (a flood must not become a flood of lines)."""

from __future__ import annotations

import logging
import time
from typing import Any


class RateLimitedLog:
    """At most one WARNING per ``interval`` seconds per key (the rest go to DEBUG): a flood must not
    turn into a flood of log lines."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            if len(self._last) > 1000:
                self._last.clear()
            self._last[key] = now
            self.logger.warning(msg, *args)
        else:
            self.suppressed += 1
            self.logger.debug(msg, *args)
