"""Starting a batch's chunk workflows from an activity rather than as child workflows.

A child's completion lands in its parent's history with the child's whole result; a chunk's
result is every job's result, so a batch of thousands of jobs would carry all their output in
its own history. Started by this activity, a chunk reports to its batch by signal only, and the
batch's history holds counts, never job results.
"""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from sortie.labels import BATCH_ID
from sortie.models import StartChunkInput, StartChunkOutput, StartChunksInput, StartChunksOutput

CHUNK_WORKFLOW = "ChunkWorkflow"


@activity.defn(name="start_chunk")
async def start_chunk(input: StartChunkInput) -> StartChunkOutput:
    """Start the chunk workflow; one already started (a retried start) counts as started."""
    info = activity.info()
    try:
        handle = await activity.client().start_workflow(
            CHUNK_WORKFLOW,
            input.chunk,
            id=input.workflow_id,
            task_queue=info.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(BATCH_ID, input.chunk.batch_id)]
            ),
            static_summary=input.summary,
            static_details=input.details,
        )
    except WorkflowAlreadyStartedError:
        return StartChunkOutput(workflow_id=input.workflow_id, already_started=True)
    return StartChunkOutput(workflow_id=input.workflow_id, run_id=handle.result_run_id)


@activity.defn(name="start_chunks")
async def start_chunks(input: StartChunksInput) -> StartChunksOutput:
    """Start several chunk workflows concurrently; a retry finds those already started."""
    started = await asyncio.gather(*(start_chunk(chunk) for chunk in input.chunks))
    return StartChunksOutput(started=list(started))
