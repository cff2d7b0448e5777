"""How a batch run hears that a chunk closed: as the chunk's child result when this run
started it, else (a run before it did, and continued-as-new) from `watch_chunks`, which waits
for such chunks' results. A chunk's end is never a signal: the chunks of a large batch finish
together, and their ends would crowd into the batch's busiest seconds."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.chunk_models import ChunkEnd, WatchChunksInput
    from activities.chunks import ChunkActivities
    from sortie.models import Tuning
    from workflows import policies
    from workflows.batch_models import BatchState, ChunkStatus

WATCH_S = 300.0
"""How long one watch waits before it answers, maybe with no chunk ended: asked again."""


async def result_of(chunk: workflow.ChildWorkflowHandle[Any, Any]) -> ChunkEnd:
    """A child chunk's end: its result, or why it has none (failed, terminated)."""
    try:
        return ChunkEnd(workflow_id=chunk.id, output=await chunk)
    except ChildWorkflowError as error:
        return ChunkEnd(workflow_id=chunk.id, error=f"{error.cause or error}")


async def watch(workflow_ids: list[str], tuning: Tuning) -> list[ChunkEnd]:
    """The ends of those chunks that close next (a few together), or none within WATCH_S."""
    ends: list[ChunkEnd] = await workflow.execute_activity_method(
        ChunkActivities.watch_chunks,
        WatchChunksInput(
            workflow_ids=workflow_ids, wait_s=WATCH_S, heartbeat_every_s=tuning.heartbeat_every_s
        ),
        start_to_close_timeout=timedelta(seconds=WATCH_S + 60),
        heartbeat_timeout=timedelta(seconds=tuning.heartbeat_timeout_s),
        retry_policy=policies.FLY_RETRY,
        summary=f"wait for {len(workflow_ids)} chunks started by an earlier run",
    )
    return ends


def record(state: BatchState, index: int, end: ChunkEnd) -> bool:
    """A chunk closed: its counts are final (with no result, its last report's, every job not
    final counted as cancelled); whether this was news (a chunk's end is heard once)."""
    chunk = state.chunks[index]
    if chunk.status is not ChunkStatus.RUNNING:
        return False
    if end.output is None:
        workflow.logger.warning("chunk %s ended without a result: %s", index, end.error)
    chunk.counts = end.output.counts if end.output else chunk.counts.cut_short()
    if end.output is not None:  # the waiting machines it held, with its slots
        state.pool.put(end.output.machines, workflow.now())
    chunk.status, chunk.wants_more = ChunkStatus.DONE, False
    return True
