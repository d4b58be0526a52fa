"""The one thread a replica runs torch on, which knows whether its work is moving.

A hung GPU (a driver fault, a collective waiting forever) does not raise: the
call on the worker thread simply never returns, while the replica's event loop
keeps answering Serve's health checks and taking requests that will never be
answered. The worker records when the work it runs last made progress (a task
started or finished, or the model said so between steps: a diffusers step
callback), so the replica can tell Serve it is stuck and be replaced.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ModelWorker(ThreadPoolExecutor):
    """A single worker thread whose tasks count as progress when they start and end."""

    def __init__(self, name: str) -> None:
        super().__init__(max_workers=1, thread_name_prefix=f"torch-{name}")
        self._working = False
        self._progress_at = time.monotonic()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """As ThreadPoolExecutor's (`run_in_executor` comes here too), the task tracked. The
        pool's work item holds its task until its thread moves on, after the caller has the
        result: the task is handed over in a list the thread empties as it takes it, so that
        what the task refers to (a failed batch, its KV cache) is gone once the caller has let
        go of it and cleared the failure's frames (`ModelReplica.released`)."""
        return super().submit(self._tracked, [fn, args, kwargs])

    def _tracked(self, task: list[Any]) -> Any:
        fn, args, kwargs = task
        task.clear()
        self._progress_at = time.monotonic()
        self._working = True
        try:
            return fn(*args, **kwargs)
        finally:
            self._working = False
            self._progress_at = time.monotonic()

    def progressed(self) -> None:
        """Called by a long task between its steps (each denoising step of a pipeline call)."""
        self._progress_at = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds the running task has gone without progress; 0 while the worker is idle."""
        return time.monotonic() - self._progress_at if self._working else 0.0
