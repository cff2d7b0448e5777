"""Waiting on conditions with a deadline: the only way tests synchronise."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = ...,
    every: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T | None],
    *,
    timeout: float = ...,
    every: float = ...,
    what: str = ...,
) -> T: ...


async def eventually(
    probe: Callable[[], object],
    *,
    timeout: float = 30.0,
    every: float = 0.1,
    what: str = "condition",
) -> object:
    """Poll `probe` until it returns something truthy; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(every)
