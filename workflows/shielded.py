"""Run workflow steps that must finish even when the workflow is being cancelled.

Python has no detached cancellation scope: a cancel delivered while a plain `finally:` cleanup
activity runs would cancel the cleanup too. These helpers let the step complete through any
number of cancellations and only then tell the caller it was cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import workflow

T = TypeVar("T")


def evicting() -> bool:
    """Whether the workflow's main task was cancelled because the worker drops the workflow
    from its cache, not because anyone cancelled the workflow: then nothing more may be started
    (a new command ends the teardown, leaving other tasks never run), and replay redoes it all."""
    return workflow.cancellation_reason() is None


async def settle(step: Awaitable[T]) -> tuple[asyncio.Future[T], bool]:
    """Await `step` to completion; return it and whether the caller was cancelled meanwhile."""
    future = asyncio.ensure_future(step)
    interrupted = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            interrupted = True
    return future, interrupted


async def complete(step: Awaitable[T]) -> T:
    """Await `step` to completion even if the caller is cancelled meanwhile, then re-raise."""
    future, interrupted = await settle(step)
    result = future.result()
    if interrupted:
        raise asyncio.CancelledError
    return result
