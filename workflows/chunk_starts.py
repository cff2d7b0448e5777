"""How a batch starts its chunks: how many in one pass, what each starts with (where its jobs
are, its window, when it reports), and the child workflow's start itself. Which chunk starts
with which window is the story's (workflows/batch.py), by the rules of workflows/slots.py."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes

with workflow.unsafe.imports_passed_through():
    from sortie.labels import BATCH_ID
    from sortie.pacing import batch_priority
    from workflows.batch_models import BatchInput, BatchState, ChunkPlan, ChunkState
    from workflows.chunk import ChunkWorkflow
    from workflows.chunk_models import ChunkInput
    from workflows.reports import report_every, report_phase

EVENTS_PER_CHUNK = 8
"""A chunk's events in the run that starts it at most: start initiated, started (in a workflow
task of its own when starts land one by one), completed, its last report (in another)."""
PASS_BYTES = 1_000_000
"""Chunk input started in one workflow task at most: the task's commands stay far below the
server's 4 MB message limit (one chunk's input is at most 1 MB, see
client/batches/submission.py)."""
STARTS_AT_ONCE = 50
"""Chunks started in one pass at most, so a run checks its length between passes."""


def pass_size(room: int) -> int:
    """Chunks one pass may start with `room` events left in the run (one at least)."""
    return max(1, min(STARTS_AT_ONCE, room // EVENTS_PER_CHUNK))


def chunk_input(input: BatchInput, state: BatchState, chunk: ChunkState) -> ChunkInput:
    """What a chunk starts with: where its jobs are in the store, and its window."""
    return ChunkInput(
        batch_id=input.batch_id,
        index=chunk.index,
        app=input.app,
        apps=input.apps,
        claim=input.jobs.slice(chunk.index),
        slots=chunk.slots,
        budgeted=state.max_cost_usd is not None,
        guarded=state.failure_limit.is_set,
        report_every_s=report_every(state.max_machines, len(state.chunks)),
        report_phase_s=report_phase(chunk.index, state.max_machines, len(state.chunks)),
        tuning=input.tuning,
        reuse_idle_s=input.reuse_idle_s,
        machines=state.pool.take_many(chunk.slots),
    )


async def start(
    input: BatchInput, plan: ChunkPlan, chunk: ChunkInput, workflow_id: str
) -> workflow.ChildWorkflowHandle[Any, Any]:
    """Start the chunk as an abandoned child (continue-as-new closes the batch's run), with the
    batch's priority and fairness key; WorkflowAlreadyStartedError if a run before did."""
    last = plan.first_job + plan.size - 1
    return await workflow.start_child_workflow(
        ChunkWorkflow.run,
        chunk,
        id=workflow_id,
        parent_close_policy=workflow.ParentClosePolicy.ABANDON,
        priority=batch_priority(input.priority, input.batch_id),
        search_attributes=TypedSearchAttributes([SearchAttributePair(BATCH_ID, input.batch_id)]),
        static_summary=f"chunk {plan.index} of batch {input.name}: jobs {plan.first_job}-{last}",
    )
