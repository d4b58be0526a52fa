"""The replicas' background loops (log and metrics flushing, image sweeps, node registration)
outlive their failures and stop when cancelled."""

from __future__ import annotations

import asyncio
import logging

import pytest

from serve_app.periodic import every, in_background


def test_a_failed_run_is_logged_and_the_next_one_still_comes(serve_caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    def work() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise OSError("disk full")

    async def main() -> None:
        task = asyncio.create_task(every(0.01, work, "flushing"))
        while len(runs) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with serve_caplog.at_level(logging.ERROR, logger="ray.serve"):
        asyncio.run(asyncio.wait_for(main(), 10))
    [failure] = [record for record in serve_caplog.records if "flushing failed" in record.getMessage()]
    assert failure.exc_info and "disk full" in str(failure.exc_info[1])


def test_async_work_runs_at_start_when_asked() -> None:
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    async def main() -> None:
        task = asyncio.create_task(every(3600, work, "registering", at_start=True))
        await asyncio.wait_for(ran.wait(), 5)  # not an hour later
        task.cancel()

    asyncio.run(main())


def test_outside_an_event_loop_nothing_starts() -> None:
    import gc
    import warnings

    async def never() -> None:
        raise AssertionError("must not run")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert in_background(never(), "nothing") is None
        gc.collect()  # the coroutine is gone: had it not been closed, it would warn now
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
