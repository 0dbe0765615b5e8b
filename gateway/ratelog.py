"""Rate-limited logging: what a peer on the network can make the gateway log is bounded.

Rule: every log line a peer can trigger (a connection refused, closed for a timeout or a
flood, a Hello refused, an accept() error) goes through one `RateLimit`: at most `burst`
lines per cause per `interval_s`; the lines over that are counted, and one summary line per
cause ("… N more suppressed") is written when its interval ends. asyncio's own lines (the
loop's exception handler, "socket.send() raised exception.") go through the same limit by
`AsyncioFilter`, keyed by their first line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

LOG_BURST = 10
"""Lines per cause per interval."""
LOG_INTERVAL_S = 60.0
MAX_CAUSES = 256
"""Causes tracked at once; the lines of further causes share one ("other")."""


class RateLimit:
    """At most `burst` lines per cause per `interval_s`, then a summary of the suppressed ones."""

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = LOG_BURST,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[str, list[float]] = {}
        """cause → [start of its interval, lines written in it, lines suppressed in it]."""
        self.suppressed: dict[str, int] = {}
        """cause → lines suppressed since the start (for /metrics)."""

    def allow(self, cause: str) -> bool:
        """Whether a line of `cause` may be written now (counts it either way)."""
        now = self.clock()
        w = self._windows.get(cause)
        if w is None and len(self._windows) >= MAX_CAUSES:
            cause = "other"
            w = self._windows.get(cause)
        if w is None or now - w[0] >= self.interval_s:
            if w is not None:
                self._summary(cause, w, now)
            self._windows[cause] = [now, 1, 0]
            return True
        if w[1] < self.burst:
            w[1] += 1
            return True
        w[2] += 1
        self.suppressed[cause] = self.suppressed.get(cause, 0) + 1
        return False

    def log(self, cause: str, level: int, msg: str, *args: object) -> None:
        if self.allow(cause):
            self.logger.log(level, msg, *args)

    def flush(self) -> None:
        """Writes the summaries of the intervals that ended (call it now and then: a cause
        that stops recurring would otherwise never get its summary)."""
        now = self.clock()
        for cause, w in list(self._windows.items()):
            if now - w[0] >= self.interval_s:
                self._summary(cause, w, now)
                del self._windows[cause]

    def _summary(self, cause: str, w: list[float], now: float) -> None:
        if w[2]:
            self.logger.warning(
                "%s: %d more lines suppressed in the last %.0f s (at most %d per %.0f s)",
                cause, int(w[2]), now - w[0], self.burst, self.interval_s,
            )  # fmt: skip


class AsyncioFilter(logging.Filter):
    """asyncio's lines through a `RateLimit`, keyed by their first line (the context's
    message: 'socket.accept() out of system resource', 'Fatal error on transport', …), so
    that a storm of them writes `burst` lines and a summary."""

    def __init__(self, limit: RateLimit) -> None:
        super().__init__("asyncio")
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        head = msg.split("\n", 1)[0]
        for stop in "<(:":  # object reprs and arguments vary: the cause is what precedes them
            head = head.split(stop, 1)[0]
        return self.limit.allow("asyncio: " + head[:80].strip())


__all__ = ["LOG_BURST", "LOG_INTERVAL_S", "MAX_CAUSES", "AsyncioFilter", "RateLimit"]
