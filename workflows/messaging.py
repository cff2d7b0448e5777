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
    """Not delivered for any other reason: typically the workflow's run took all the signals
    the server allows one run (`history.maximumSignalsPerExecution`); its next run can be told,
    so the sender tells it again later."""


async def deliver(send: Awaitable[None]) -> Delivery:
    """Await a signal to another workflow, and say what became of it."""
    try:
        await send
    except FailureError as error:
        workflow.logger.info("signal not delivered: %s", error)
        return Delivery.GONE if _not_found(error) else Delivery.REFUSED
    return Delivery.DELIVERED


def _not_found(error: FailureError) -> bool:
    """Whether Temporal said the workflow is not there (the SDK names the cause
    ExternalWorkflowExecutionNotFound and says "because it was not found"): the only failure
    taken for a workflow that is gone."""
    kind = error.type if isinstance(error, ApplicationError) else None
    return "notfound" in f"{kind}".lower() or "not found" in error.message.lower()
