"""Signals between a batch and its chunks, where the other side may already be gone."""

from __future__ import annotations

from collections.abc import Awaitable

from temporalio import workflow
from temporalio.exceptions import FailureError


async def deliver(send: Awaitable[None]) -> bool:
    """Await a signal to another workflow; whether it arrived (a closed one cannot be told)."""
    try:
        await send
    except FailureError as error:
        workflow.logger.info("signal not delivered: %s", error)
        return False
    return True
