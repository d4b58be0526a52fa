"""Keeping Ray Serve's replica log timely and readable.

`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (the default launch) buffers a replica's log
records in a `MemoryHandler` of 1000 and writes them only when it fills or an
ERROR arrives; nothing flushes it on a timer or at exit. A quiet replica's
lines (the access log, "loaded model ...") would then reach the file late, or
never. Each replica flushes it every `FLUSH_INTERVAL_S` instead: the writes
stay batched, and a line is in the file within about a second.

Serve also logs a WARNING for every request a full replica turns away (at its
`max_ongoing_requests`), and its router retries each one with a back-off: a burst of 40
image requests at a replica that takes 16 wrote hundreds of identical lines, burying
every other warning. One of them is kept every `REJECTIONS_WINDOW_S`, saying how many
more there were.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import time
from typing import Callable

from serve_app.periodic import every, in_background

FLUSH_INTERVAL_S = 1.0
REJECTIONS_WINDOW_S = 10.0


def flush_serve_log() -> None:
    """Write out what Serve's logger has buffered in this process (a no-op when unbuffered),
    with the count of rejection warnings held back in a window that has ended."""
    serve_logger = logging.getLogger("ray.serve")
    for summary in serve_logger.filters:
        if isinstance(summary, RejectionSummary) and (note := summary.expired_note()) is not None:
            serve_logger.warning(note)
    for handler in serve_logger.handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.flush()


def start_flushing() -> asyncio.Task | None:
    """Flush every `FLUSH_INTERVAL_S` on the replica's event loop (None outside one, as in-process tests)."""
    return in_background(every(FLUSH_INTERVAL_S, flush_serve_log, "flushing the replica log"), "serve log flush")


class RejectionSummary(logging.Filter):
    """Passes one of Serve's "Replica at capacity" warnings per window. How many were held back
    is said once the window ends (`expired_note`, from the log flush), or by the next one shown
    if it comes first. Every other record passes untouched."""

    PREFIX = "Replica at capacity of max_ongoing_requests="

    def __init__(self, window_s: float = REJECTIONS_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = window_s, clock
        self.shown_at: float | None = None
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX)):
            return True
        now = self.clock()
        if self.shown_at is not None and now - self.shown_at < self.window_s:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} ({self.held} more in the {now - self.shown_at:.0f} s before, not logged one by one)"
        self.shown_at, self.held = now, 0
        return True

    def expired_note(self) -> str | None:
        """Once the window of the last warning shown has ended with some held back: a line
        saying how many (and the count starts again)."""
        if not self.held or self.shown_at is None or self.clock() - self.shown_at < self.window_s:
            return None
        held, self.held = self.held, 0
        return (f"{held} more requests turned away at max_ongoing_requests in the {self.window_s:.0f} s "
                "after the 'Replica at capacity' warning above, not logged one by one")


def summarize_rejections() -> None:
    """Install `RejectionSummary` on Serve's logger in this process (once)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(existing, RejectionSummary) for existing in serve_logger.filters):
        serve_logger.addFilter(RejectionSummary())
