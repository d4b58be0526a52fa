"""Serve's "Replica at capacity" warnings, one per window (serve_app/serve_logs.py): no Ray needed."""

from __future__ import annotations

import logging

from serve_app.serve_logs import RejectionSummary, flush_serve_log, summarize_rejections


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("ray.serve", logging.WARNING, __file__, 1, message, None, None)


def test_one_rejection_warning_per_window_says_how_many_it_stands_for():
    clock = [0.0]
    summary = RejectionSummary(window_s=10.0, clock=lambda: clock[0])
    rejection = "Replica at capacity of max_ongoing_requests=16, rejecting request {}."
    passed = []
    for second in (0.0, 0.1, 0.2, 5.0, 12.0, 13.0, 30.0):
        clock[0] = second
        entry = record(rejection.format(second))
        if summary.filter(entry):
            passed.append(entry.getMessage())
    assert passed == [rejection.format(0.0),
                      rejection.format(12.0) + " (3 more in the 12 s before, not logged one by one)",
                      rejection.format(30.0) + " (1 more in the 18 s before, not logged one by one)"]
    other = record("Replica is shutting down, rejecting request x.")
    assert summary.filter(other) and other.getMessage() == "Replica is shutting down, rejecting request x."


def test_installed_once_on_serves_logger():
    serve_logger = logging.getLogger("ray.serve")
    before = list(serve_logger.filters)
    try:
        summarize_rejections()
        summarize_rejections()
        assert sum(isinstance(f, RejectionSummary) for f in serve_logger.filters) == 1
    finally:
        serve_logger.filters[:] = before


def test_a_burst_shorter_than_the_window_gets_its_count_once_the_window_ends():
    """The held-back count does not wait for a next rejection that may never come: the replica's
    log flush (every second) says it once the window has ended."""
    clock = [0.0]
    summary = RejectionSummary(window_s=10.0, clock=lambda: clock[0])
    for second in (0.0, 1.0, 2.0, 3.0):
        clock[0] = second
        summary.filter(record("Replica at capacity of max_ongoing_requests=16, rejecting request x."))
    clock[0] = 9.0
    assert summary.expired_note() is None  # the window is still open

    said: list[str] = []

    class Said(logging.Handler):  # on Serve's logger itself: what else listens (pytest, Serve) varies
        def emit(self, entry: logging.LogRecord) -> None:
            said.append(entry.getMessage())

    serve_logger, listener = logging.getLogger("ray.serve"), Said(logging.WARNING)
    before, level = list(serve_logger.filters), serve_logger.level
    serve_logger.addFilter(summary)
    serve_logger.addHandler(listener)
    serve_logger.setLevel(logging.WARNING)
    try:
        clock[0] = 10.5
        flush_serve_log()
        flush_serve_log()  # said once
    finally:
        serve_logger.filters[:] = before
        serve_logger.removeHandler(listener)
        serve_logger.setLevel(level)
    assert said == ["3 more requests turned away at max_ongoing_requests in the 10 s after the "
                    "'Replica at capacity' warning above, not logged one by one"]
