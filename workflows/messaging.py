"""Signals between a batch and its chunks, where the other side may be gone or full."""

from __future__ import annotations

from collections.abc import Awaitable
from enum import Enum

from temporalio import workflow
from temporalio.exceptions import ApplicationError, FailureError


class Delivery(Enum):
    """What became of a signal to another workflow."""

    DELIVERED = "delivered"
    GONE = "gone"
    """The workflow is closed, or was never there: it cannot be told, and need not be."""
    REFUSED = "refused"
    """The workflow runs but its run took all the signals the server allows one run
    (`history.maximumSignalsPerExecution`): its next run can be told."""


async def deliver(send: Awaitable[None]) -> Delivery:
    """Await a signal to another workflow, and say what became of it."""
    try:
        await send
    except FailureError as error:
        workflow.logger.info("signal not delivered: %s", error)
        return Delivery.REFUSED if _signal_limit(error) else Delivery.GONE
    return Delivery.DELIVERED


def _signal_limit(error: FailureError) -> bool:
    """Whether the server refused the signal for its run's signal limit (the SDK names the
    cause SignalCountLimitExceeded and says "the per-workflow signal limit was exceeded")."""
    kind = error.type if isinstance(error, ApplicationError) else None
    return "limit" in f"{kind} {error.message}".lower()
