"""Reports between a chunk and its batch when the server refuses signals to the batch's run.

Temporal takes at most `history.maximumSignalsPerExecution` signals (10,000 by default) into
one run. A batch continues-as-new long before that; if it ever does not in time, its chunks'
reports are refused, and a chunk must not take that for a batch that is gone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.chunk_models import ChunkEnd, WatchChunksInput
from client import batches
from client.stack import MATCHING_CONFIG
from sortie.codec import data_converter
from sortie.models import JobState, Tuning
from sortie.settings import Settings
from sortie.spec import Job
from tests.helpers.fleet import Fleet, fleet_worker
from tests.helpers.stack import TEMPORAL_CLI
from tests.helpers.waiting import eventually
from workflows.chunk import ChunkWorkflow
from workflows.chunk_models import ChunkInput, ChunkReport

SIGNALS_PER_RUN = 3


class ListenerInput(BaseModel):
    chunk: ChunkInput
    first_run: bool = True
    heard: list[ChunkReport] = []


@workflow.defn(sandboxed=False)  # a stand-in defined in a test module
class ReportListener:
    """Stands in for a batch: starts one chunk and hears its reports. Its first run waits to be
    told to continue-as-new; every later run does so once it is full. As a batch's later run,
    it hears the chunk's end by watching it (`watch_chunks`), and returns every report its runs
    heard and the chunk's end."""

    def __init__(self) -> None:
        self.reports: list[ChunkReport] = []
        self.roll_over = False
        self.end: ChunkEnd | None = None

    @workflow.signal
    def chunk_report(self, report: ChunkReport) -> None:
        self.reports.append(report)

    @workflow.update
    def continue_as_new(self) -> None:
        self.roll_over = True

    @workflow.run
    async def run(self, input: ListenerInput) -> tuple[list[ChunkReport], ChunkEnd]:
        if input.first_run:
            await workflow.start_child_workflow(
                ChunkWorkflow.run,
                input.chunk,
                id=f"{workflow.info().workflow_id}-chunk",
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            )
            await workflow.wait_condition(lambda: self.roll_over)
        else:
            watching = asyncio.create_task(self._watch(f"{workflow.info().workflow_id}-chunk"))
            await workflow.wait_condition(
                lambda: self.end is not None or len(self.reports) >= SIGNALS_PER_RUN
            )
            watching.cancel()
        heard = [*input.heard, *self.reports]
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self.end is not None:
            return heard, self.end
        workflow.continue_as_new(input.model_copy(update={"first_run": False, "heard": heard}))

    async def _watch(self, chunk_id: str) -> None:
        while self.end is None:
            ends = await workflow.execute_activity(
                "watch_chunks",
                WatchChunksInput(workflow_ids=[chunk_id], wait_s=5, heartbeat_every_s=1),
                result_type=list[ChunkEnd],
                start_to_close_timeout=timedelta(seconds=30),
            )
            self.end = ends[0] if ends else None


@pytest.fixture(scope="module")
async def limited() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server that takes only SIGNALS_PER_RUN signals into one run."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_CLI),
        data_converter=data_converter({}),
        dev_server_extra_args=[
            "--dynamic-config-value",
            f"history.maximumSignalsPerExecution={SIGNALS_PER_RUN}",
            *MATCHING_CONFIG,
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()


async def refused_reports(client: Client, chunk_id: str) -> int:
    """Reports the server refused the chunk for the signal limit of the batch's run."""
    try:
        history = await client.get_workflow_handle(chunk_id).fetch_history()
    except RPCError as error:
        if error.status is RPCStatusCode.NOT_FOUND:
            return 0  # the chunk is not started yet
        raise
    failed = EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED
    return sum(1 for event in history.events if event.event_type == failed)


async def test_a_report_the_batch_run_refused_reaches_its_next_run(
    limited: WorkflowEnvironment,
) -> None:
    fleet = Fleet()
    settings = Settings(task_queue=f"refused-{uuid.uuid4().hex}")
    jobs = [Job(id=f"j{i}", index=i, command=["true"], env={"SECONDS": "0.3"}) for i in range(8)]
    chunk = ChunkInput(
        batch_id="refused",
        index=0,
        app="fleet",
        jobs=jobs,
        slots=1,
        report_every_s=0.2,
        tuning=Tuning(heartbeat_timeout_s=5, heartbeat_every_s=1),
    )
    listener_id = f"listener-{uuid.uuid4().hex[:8]}"
    async with fleet_worker(limited, settings, fleet.activities, workflows=(ReportListener,)):
        handle = await limited.client.start_workflow(
            ReportListener.run,
            ListenerInput(chunk=chunk),
            id=listener_id,
            task_queue=settings.task_queue,
            run_timeout=timedelta(minutes=2),
        )
        chunk_id = f"{listener_id}-chunk"
        await eventually(lambda: refused_reports(limited.client, chunk_id), what="a report refused")
        await handle.execute_update(ReportListener.continue_as_new)
        heard, end = await handle.result()
        rows = await batches.turn_rows(limited.client, chunk_id, settings.blob_store())

    # The chunk went on with every job after the refusal, and a later run heard its end.
    assert [r.state for r in rows] == [JobState.SUCCEEDED] * len(jobs)
    assert heard and end.output is not None and end.output.counts.succeeded == len(jobs)
    assert fleet.live == 0
