"""Background work on a replica's event loop: something done every few seconds, for good.

The replicas keep several such loops (flushing the buffered log and the metrics,
the image-retention sweep, registering with each node). Each must survive its own
failures: one full disk or unreachable node must not end it until the replica
restarts. `every` is that loop, written once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Awaitable, Callable

logger = logging.getLogger("ray.serve")


async def every(interval_s: float, work: Callable[[], Awaitable[object] | object], what: str, *,
                at_start: bool = False) -> None:
    """Run `work` (a function or a coroutine function) every `interval_s` until cancelled,
    first at once when `at_start`. A failure is logged, and the next run still comes."""
    if not at_start:
        await asyncio.sleep(interval_s)
    while True:
        try:
            done = work()
            if inspect.isawaitable(done):
                await done
        except Exception:  # noqa: BLE001 - the next run may succeed; the loop must not end
            logger.exception("%s failed; trying again in %ss", what, interval_s)
        await asyncio.sleep(interval_s)


def in_background(work: Awaitable[None], name: str) -> asyncio.Task | None:
    """`work` as a task on the running event loop; None (and `work` closed) outside one,
    as when a replica class is built in-process by a test."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if inspect.iscoroutine(work):
            work.close()
        return None
    return loop.create_task(work, name=name)  # type: ignore[arg-type]
