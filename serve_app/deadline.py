"""Awaiting with a deadline of the server's own, told apart from the awaited's own timeouts.

A model's failure may itself be a `TimeoutError` (Ray's `GetTimeoutError` is one), and it
must be answered as that failure, not as the server's deadline passing. `asyncio.timeout`
raises the same `TimeoutError` for both, so each caller would check `expired()`: `within`
does it once and raises `DeadlinePassed` for the server's own.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


class DeadlinePassed(Exception):
    """The server's deadline passed before the awaited finished (which is cancelled)."""


async def within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """`await awaitable`, for at most `seconds` (None: no limit). Raises `DeadlinePassed` when
    that passes; any exception of the awaited, a `TimeoutError` too, passes as it is."""
    deadline = asyncio.timeout(seconds)  # no extra task, unlike wait_for
    try:
        async with deadline:
            return await awaitable
    except TimeoutError:
        if deadline.expired():
            raise DeadlinePassed from None
        raise
