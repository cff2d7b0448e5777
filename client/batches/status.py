"""A batch's status and progress, read from its workflow and its chunks."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from activities.chunk_models import ChunkOutput
from sortie.models import Counts
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    BatchOutput,
    ChunkProgress,
    ChunkStatus,
    Progress,
)
from workflows.chunk import ChunkWorkflow
from workflows.guards import limit_text


async def _status(client: Client, workflow_id: str) -> str | None:
    """The workflow's status in lower case, or None when there is no such workflow."""
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as error:
        if error.status is RPCStatusCode.NOT_FOUND:
            return None
        raise
    return description.status.name.lower() if description.status else "unknown"


def batch_handle(client: Client, batch_id: str) -> WorkflowHandle[BatchWorkflow, BatchOutput]:
    """A typed handle on a batch workflow."""
    return client.get_workflow_handle_for(BatchWorkflow.run, batch_id)


def chunk_handle(client: Client, workflow_id: str) -> WorkflowHandle[ChunkWorkflow, ChunkOutput]:
    """A typed handle on a chunk workflow (a follow-up turn is one too)."""
    return client.get_workflow_handle_for(ChunkWorkflow.run, workflow_id)


async def is_closed(client: Client, batch_id: str) -> tuple[bool, WorkflowExecutionStatus | None]:
    """Whether the batch's latest run has closed, and its status."""
    description = await client.get_workflow_handle(batch_id).describe()
    status = description.status
    return status not in (None, WorkflowExecutionStatus.RUNNING), status


async def progress(client: Client, batch_id: str) -> Progress:
    """The batch's progress: from its query while running, from its result once closed."""
    closed, status = await is_closed(client, batch_id)
    if not closed:
        return await _live(
            client, await batch_handle(client, batch_id).query(BatchWorkflow.progress)
        )
    output = await _closed_output(client, batch_id, status)
    counts = Counts.total_of([chunk.counts for chunk in output.chunks])
    return Progress(
        batch_id=batch_id,
        status=output.status,
        paused=False,
        pause_reason=None,
        cancelled=output.status == "cancelled",
        max_machines=0,
        cancel_reason=output.cancel_reason,
        counts=counts,
        chunks=output.chunks,
    )


async def _live(client: Client, progress: Progress) -> Progress:
    """Running chunks' counts asked of the chunks themselves: the batch hears of them in
    batches (every few seconds, or when a slot changes hands), the chunks know them now."""

    async def ask(chunk: ChunkProgress) -> None:
        if chunk.status is not ChunkStatus.RUNNING:
            return
        with contextlib.suppress(RPCError):  # unanswered: the counts it last reported stand
            chunk.counts = await chunk_handle(client, chunk.workflow_id).query(
                ChunkWorkflow.progress
            )

    await asyncio.gather(*(ask(chunk) for chunk in progress.chunks))
    total = Counts.total_of([chunk.counts for chunk in progress.chunks])
    return progress.model_copy(update={"counts": total})


async def _closed_output(
    client: Client, batch_id: str, status: WorkflowExecutionStatus | None
) -> BatchOutput:
    if status is WorkflowExecutionStatus.FAILED:
        reason = await _failure(client, batch_id)
        if reason is not None and REJECTED in reason:
            raise BatchRejected(f"batch {batch_id} was refused by the worker: {reason}")
    if status is not WorkflowExecutionStatus.COMPLETED:
        name = status.name.lower() if status else "unknown"
        raise BatchNotReadable(f"batch {batch_id} ended {name}: it has no results to read")
    return await batch_handle(client, batch_id).result()


REJECTED = "batch rejected:"
"""How the batch workflow's failure begins when the worker refuses its secrets or apps."""


async def _failure(client: Client, batch_id: str) -> str | None:
    """The failed batch's failure message, its causes joined, or None if it did not fail."""
    try:
        await batch_handle(client, batch_id).result()
    except WorkflowFailureError as error:
        messages: list[str] = []
        cause: BaseException | None = error.cause
        while cause is not None:
            messages.append(str(cause))
            cause = cause.__cause__
        return ": ".join(messages)
    return None


class BatchNotReadable(RuntimeError):
    """The batch failed or was terminated, so it has no result document."""


class BatchRejected(BatchNotReadable):
    """The worker refused the batch before any machine (an unknown secret, no credential)."""


@dataclass(frozen=True)
class ChunkView:
    """One chunk's progress in plain values, for the terminal."""

    index: int
    total: int
    done: int
    failed: int
    running: int
    slots: int
    active: bool


@dataclass(frozen=True)
class ProgressView:
    """A batch's progress in plain values, for the terminal: the renderer's whole input."""

    batch_id: str
    status: str
    paused: bool
    pause_reason: str | None
    cancel_reason: str | None
    failure_limit: str | None
    max_machines: int
    max_cost_usd: float | None
    total: int
    done: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int
    running: int
    pending: int
    live_machines: int
    cost_usd: float
    chunks: tuple[ChunkView, ...]
    apps: tuple[str, ...] = ()
    machines_created: int = 0
    """Machines created so far: one per job attempt, fewer with `reuse_machines`."""


def view(p: Progress) -> ProgressView:
    """The `progress` query's answer as plain values (the one place that reads its model)."""
    c = p.counts
    return ProgressView(
        batch_id=p.batch_id,
        status=p.status,
        paused=p.paused,
        pause_reason=p.pause_reason,
        cancel_reason=p.cancel_reason,
        failure_limit=limit_text(p.failure_limit),
        max_machines=p.max_machines,
        max_cost_usd=p.max_cost_usd,
        total=c.total,
        done=c.done,
        succeeded=c.succeeded,
        failed=c.failed,
        timed_out=c.timed_out,
        cancelled=c.cancelled,
        running=c.running,
        pending=c.pending,
        live_machines=c.live_machines,
        machines_created=c.machines_created,
        cost_usd=c.cost_usd,
        chunks=tuple(
            ChunkView(
                index=chunk.index,
                total=chunk.size,
                done=chunk.counts.done,
                failed=chunk.counts.failed + chunk.counts.timed_out,
                running=chunk.counts.running,
                slots=chunk.slots,
                active=chunk.status is ChunkStatus.RUNNING,
            )
            for chunk in p.chunks
        ),
        apps=tuple(p.apps),
    )


async def progress_view(client: Client, batch_id: str) -> ProgressView:
    """The batch's progress now, as plain values."""
    return view(await progress(client, batch_id))


async def list_batches(client: Client, limit: int = 50) -> list[tuple[str, str, datetime | None]]:
    """Recent batches: id, status and start time."""
    found: list[tuple[str, str, datetime | None]] = []
    async for execution in client.list_workflows('WorkflowType="BatchWorkflow"', limit=limit):
        status = execution.status.name.lower() if execution.status else "unknown"
        found.append((execution.id, status, execution.start_time))
    return found
