"""Keeping Ray Serve's replica log timely under its throughput-optimized mode.

`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (the default launch) buffers a replica's log
records in a `MemoryHandler` of 1000 and writes them only when it fills or an
ERROR arrives; nothing flushes it on a timer or at exit. A quiet replica's
lines (the access log, "loaded model ...") would then reach the file late, or
never. Each replica flushes it every `FLUSH_INTERVAL_S` instead: the writes
stay batched, and a line is in the file within about a second.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers

from serve_app.periodic import every, in_background

FLUSH_INTERVAL_S = 1.0


def flush_serve_log() -> None:
    """Write out what Serve's logger has buffered in this process (a no-op when unbuffered)."""
    for handler in logging.getLogger("ray.serve").handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.flush()


def start_flushing() -> asyncio.Task | None:
    """Flush every `FLUSH_INTERVAL_S` on the replica's event loop (None outside one, as in-process tests)."""
    return in_background(every(FLUSH_INTERVAL_S, flush_serve_log, "flushing the replica log"), "serve log flush")
