"""The end of chunks a batch run inherited: it hears the chunks it started by their child
results, and a run that continued-as-new cannot, so it watches the ones it was handed here."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from activities.chunk_models import ChunkEnd, ChunkOutput, WatchChunksInput

GATHER_S = 1.0
"""After the first watched chunk ends, how long to wait for others: chunks that end together
come back in one answer, so the batch takes one event for them instead of one each."""


class ChunkActivities:
    """Owns the Temporal client it reads chunk results with."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @activity.defn(name="watch_chunks")
    async def watch_chunks(self, input: WatchChunksInput) -> list[ChunkEnd]:
        """Wait until some of the chunks have closed (at most `wait_s`), and say how each
        ended; none when none ended in time. Reads only: a retry asks again."""
        watches = {
            asyncio.create_task(self._end(workflow_id)) for workflow_id in input.workflow_ids
        }
        beating = asyncio.create_task(_beat(input.heartbeat_every_s))
        try:
            done, pending = await asyncio.wait(
                watches, timeout=input.wait_s, return_when=asyncio.FIRST_COMPLETED
            )
            if done and pending:
                more, _ = await asyncio.wait(pending, timeout=GATHER_S)
                done |= more
            return sorted((task.result() for task in done), key=lambda end: end.workflow_id)
        finally:
            for task in [*watches, beating]:
                task.cancel()
            await asyncio.gather(*watches, beating, return_exceptions=True)

    async def _end(self, workflow_id: str) -> ChunkEnd:
        """How the chunk ended: its output, or why it has none."""
        handle = self._client.get_workflow_handle(workflow_id, result_type=ChunkOutput)
        try:
            output = await handle.result()
        except WorkflowFailureError as error:
            return ChunkEnd(workflow_id=workflow_id, error=f"{error.cause or error}")
        except RPCError as error:
            if error.status is not RPCStatusCode.NOT_FOUND:
                raise
            return ChunkEnd(workflow_id=workflow_id, error="the chunk's workflow is gone")
        return ChunkEnd(workflow_id=workflow_id, output=output)


async def _beat(every_s: float) -> None:
    while True:
        activity.heartbeat()
        await asyncio.sleep(every_s)
