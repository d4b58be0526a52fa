"""The model's worker thread tells a task that hangs from one that works (no torch, no Ray)."""

from __future__ import annotations

import threading
import time

from serve_app.model_worker import ModelWorker


def test_a_task_without_progress_counts_as_stalled_and_its_steps_reset_the_count():
    worker = ModelWorker("t")
    started, step, stepped, release = (threading.Event() for _ in range(4))

    def long_task() -> str:
        started.set()
        step.wait(timeout=30)
        worker.progressed()  # the model says a step is done
        stepped.set()
        release.wait(timeout=30)
        return "done"

    try:
        assert worker.stalled_for() == 0.0  # idle
        task = worker.submit(long_task)
        assert started.wait(timeout=30)
        time.sleep(0.3)
        assert worker.stalled_for() >= 0.3
        step.set()
        assert stepped.wait(timeout=30)
        assert worker.stalled_for() < 0.25  # the step reset it
        release.set()
        assert task.result(timeout=30) == "done"
        assert worker.stalled_for() == 0.0
    finally:
        release.set()
        worker.shutdown()
