"""The batch's slot protocol at scale, with in-memory machine activities.

These tests run the real BatchWorkflow and ChunkWorkflow on the real dev server; only the
machine activities are replaced by an in-memory fleet that counts live machines, so hundreds of
jobs run in seconds and the cap, slot reuse and continue-as-new can be checked exactly.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections import Counter
from datetime import UTC, timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from client import batches
from client.batches.report import started_input
from sortie.models import Tuning
from sortie.settings import Settings
from tests.helpers.fleet import Fleet, fleet_spec, fleet_worker, run_fleet_batch
from tests.helpers.history import chunk_end_sizes, every_run
from tests.helpers.waiting import eventually
from workflows.batch import BatchWorkflow
from workflows.batch_models import BatchInput, MaxMachinesRequest
from workflows.chunk_models import ChunkInput, ChunkReport
from workflows.reports import EPOCH


async def test_cap_is_held_and_filled_across_many_chunks(temporal: WorkflowEnvironment) -> None:
    fleet, report, _, _ = await run_fleet_batch(
        temporal, jobs=300, max_machines=7, chunk_size=20, fill_to=7
    )

    assert report.succeeded == 300 and len(report.results) == 300
    assert [r.job_id for r in report.results] == [f"j{i:05d}" for i in range(300)]
    assert fleet.most == 7 and fleet.live == 0
    assert sorted(fleet.runs) == [f"j{i:05d}" for i in range(300)], "every job ran exactly once"
    assert fleet.continued_as_new


async def test_chunks_smaller_than_the_cap_share_it(temporal: WorkflowEnvironment) -> None:
    fleet, report, _, _ = await run_fleet_batch(
        temporal, jobs=60, max_machines=12, chunk_size=5, fill_to=12
    )

    assert report.succeeded == 60
    assert fleet.most == 12 and fleet.live == 0


async def test_chunks_reuse_their_slots_in_place_while_others_wait(
    temporal: WorkflowEnvironment,
) -> None:
    # Twenty slots, chunks of twenty: four chunks of five slots each, not one of twenty, so a
    # freed slot mostly runs its chunk's next job without a round trip through the batch.
    fleet, report, _, _ = await run_fleet_batch(
        temporal, jobs=80, max_machines=20, chunk_size=20, fill_to=20
    )

    assert report.succeeded == 80 and fleet.most == 20 and fleet.live == 0
    first = sorted(fleet.runs[:20])
    assert first == [f"j{c * 20 + i:05d}" for c in range(4) for i in range(5)], first
    assert sorted(fleet.runs) == [f"j{i:05d}" for i in range(80)]


async def test_a_raised_cap_is_used_at_once(temporal: WorkflowEnvironment) -> None:
    fleet = Fleet()
    settings = Settings(task_queue=f"slots-{uuid.uuid4().hex}")
    # Jobs of 1 s: most of the 40 are still to run when the raise lands, even on a loaded
    # machine (at 0.2 s a slow signal once found fewer than eight left).
    spec = fleet_spec([{"id": f"j{i:03d}"} for i in range(40)], 2, 10, seconds="1")
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec)
        handle = batches.batch_handle(temporal.client, submitted.batch_id)
        await eventually(lambda: fleet.live == 2, what="two machines")
        await handle.signal(BatchWorkflow.set_max_machines, MaxMachinesRequest(max_machines=8))
        await eventually(lambda: fleet.most == 8, what="eight machines at once")
        await handle.result()
    assert fleet.most == 8 and fleet.created == 40


async def test_every_chunk_starts_at_once_when_the_cap_gives_each_a_slot(
    temporal: WorkflowEnvironment,
) -> None:
    # Eighty jobs, twenty slots, chunks of at most ten: ten chunks of eight (so that the slots
    # divide evenly), each starting at once with two slots; no chunk waits with all its jobs.
    fleet, report, _, _ = await run_fleet_batch(
        temporal, jobs=80, max_machines=20, chunk_size=10, fill_to=20
    )

    assert report.succeeded == 80 and fleet.most == 20 and fleet.live == 0
    per_chunk = Counter(int(job[1:]) // 8 for job in fleet.runs[:20])
    assert per_chunk == dict.fromkeys(range(10), 2), fleet.runs[:20]


async def test_with_more_chunks_than_slots_each_running_chunk_holds_one(
    temporal: WorkflowEnvironment,
) -> None:
    # Ten chunks of twenty on five slots: five chunks run at once with a slot each, and a chunk
    # starts only when one finishes, so no more chunks run than there are slots.
    fleet, report, _, _ = await run_fleet_batch(
        temporal, jobs=200, max_machines=5, chunk_size=20, fill_to=5
    )

    assert report.succeeded == 200 and fleet.most == 5 and fleet.live == 0
    assert sorted(int(job[1:]) // 20 for job in fleet.runs[:5]) == [0, 1, 2, 3, 4], fleet.runs
    assert sorted(fleet.runs) == [f"j{i:05d}" for i in range(200)], "every job ran exactly once"


async def test_no_batch_run_outgrows_its_bytes_when_its_chunks_finish_together(
    temporal: WorkflowEnvironment,
) -> None:
    # Ten chunks of sixty jobs with a slot per job all finish at once; each chunk's end lands
    # in the batch as the child's result, or through `watch_chunks` in a later run when the run
    # that started it continued-as-new first (a loaded machine can do that). A chunk leaves its
    # rows in the object store and returns its counts and their key, so no end brings rows into
    # the batch's history: the 600 rows (some 380 KB) once had to be held off by a bound of bytes.
    fleet = Fleet()
    settings = Settings(task_queue=f"bytes-{uuid.uuid4().hex}")
    spec = fleet_spec([{"id": f"j{i:04d}"} for i in range(600)], max_machines=600, chunk_size=60)
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec, tuning=Tuning())
        handle = batches.batch_handle(temporal.client, submitted.batch_id)
        output = await handle.result()
    assert output.succeeded == 600 and fleet.live == 0
    runs = await every_run(temporal.client, submitted.batch_id)
    results = [size for run in runs for size in chunk_end_sizes(run.events)]
    # An end may be heard both ways: a run continues-as-new before it applied a child's result.
    assert len(results) >= 10 and max(results) < 1_000, results
    sizes = [sum(event.ByteSize() for event in run.events) for run in runs]
    assert max(sizes) < 200_000, sorted(sizes)
    # The batch is closed and no worker runs: its rows are read from the store alone.
    report = await batches.results(temporal.client, submitted.batch_id)
    assert [r.job_id for r in report.results] == [f"j{i:04d}" for i in range(600)]


async def test_workflows_evicted_at_every_turn_leave_no_warning(
    temporal: WorkflowEnvironment, recwarn: pytest.WarningsRecorder
) -> None:
    # A worker that caches two workflows evicts the batch and its chunks over and over, mid-run:
    # each is torn down with its tasks cancelled, and none may leave a coroutine never awaited.
    fleet = Fleet()
    settings = Settings(task_queue=f"evict-{uuid.uuid4().hex}")
    spec = fleet_spec([{"id": f"j{i:03d}"} for i in range(36)], max_machines=12, chunk_size=6)
    async with fleet_worker(temporal, settings, fleet.activities, cached=2):
        submitted = await batches.submit(temporal.client, settings, spec, tuning=Tuning())
        output = await batches.batch_handle(temporal.client, submitted.batch_id).result()
    gc.collect()
    assert output.succeeded == 36 and fleet.live == 0
    assert [f"{w.message} {w.filename}:{w.lineno}" for w in recwarn] == []


@pytest.mark.parametrize("steer", ["pause", "cancel"])
async def test_pause_and_cancel_reach_started_chunks_while_other_starts_are_in_flight(
    temporal: WorkflowEnvironment, steer: str
) -> None:
    # 150 chunks of one long job each start in passes of 50. Steered as soon as the first
    # start has landed, the batch tells the chunks already started at once, before the rest
    # of the pass has landed: it never waits for a pass of starts to tell anyone anything.
    fleet = Fleet()
    settings = Settings(task_queue=f"steer-{uuid.uuid4().hex}")
    spec = fleet_spec(
        [{"id": f"j{i:03d}"} for i in range(150)], max_machines=150, chunk_size=1, seconds="600"
    )
    started = EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED
    told = EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec, tuning=Tuning())
        handle = batches.batch_handle(temporal.client, submitted.batch_id)

        async def first_start() -> bool:
            history = await handle.fetch_history()
            return any(event.event_type == started for event in history.events)

        await eventually(first_start, every=0.01, what="a chunk started")

        async def told_to(name: str) -> bool:
            # in any run: the batch may have continued-as-new since it told them
            return any(
                e.signal_external_workflow_execution_initiated_event_attributes.signal_name == name
                for run in await every_run(temporal.client, submitted.batch_id)
                for e in run.events
                if e.event_type == told
            )

        await handle.signal(getattr(BatchWorkflow, steer))
        await eventually(lambda: told_to(steer), what=f"chunks told to {steer}")
        if steer == "pause":
            await handle.signal(BatchWorkflow.cancel)
        output = await handle.result()
    assert output.cancelled == 150 and fleet.live == 0
    runs = await every_run(temporal.client, submitted.batch_id)

    signalled = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    task_started = EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED

    def told_while_starts_in_flight(events: list[Any]) -> bool | None:
        """Whether the batch told a chunk before its last start landed; None when every start
        had landed before the batch's first task that saw the signal (nothing was in flight)."""
        heard = [
            i
            for i, e in enumerate(events)
            if e.event_type == signalled
            and e.workflow_execution_signaled_event_attributes.signal_name == steer
        ]
        starts = [i for i, e in enumerate(events) if e.event_type == started]
        if not heard or not starts:
            return None
        seen = next(
            (i for i in range(heard[0], len(events)) if events[i].event_type == task_started), None
        )
        if seen is None or max(starts) < seen:
            return None
        telling = [
            i
            for i, e in enumerate(events)
            if e.event_type == told
            and e.signal_external_workflow_execution_initiated_event_attributes.signal_name == steer
        ]
        return bool(telling) and min(telling) < max(starts)

    verdicts = [told_while_starts_in_flight(list(run.events)) for run in runs]
    assert False not in verdicts, "the chunks were told only once every start had landed"


async def test_a_chunks_end_is_its_result_never_a_signal(temporal: WorkflowEnvironment) -> None:
    # Ten chunks with a slot per job finish together: they do not tell the batch so by
    # signal, it hears each end as the child's result (or, after continue-as-new, watches).
    fleet = Fleet()
    settings = Settings(task_queue=f"ends-{uuid.uuid4().hex}")
    spec = fleet_spec([{"id": f"j{i:04d}"} for i in range(200)], max_machines=200, chunk_size=20)
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec, tuning=Tuning())
        output = await batches.batch_handle(temporal.client, submitted.batch_id).result()
    assert output.succeeded == 200 and fleet.live == 0
    events = [e for run in await every_run(temporal.client, submitted.batch_id) for e in run.events]
    ends = Counter(e.event_type for e in events)
    assert ends[EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED], ends
    reports = [
        ChunkReport.model_validate_json(
            e.workflow_execution_signaled_event_attributes.input.payloads[0].data
        )
        for e in events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]
    # A progress report may happen to come once every job is final; no chunk sends its end.
    assert len([r for r in reports if r.counts.done == r.counts.total]) < 10, reports


async def test_a_run_hears_the_end_of_the_chunks_it_inherited(
    temporal: WorkflowEnvironment,
) -> None:
    # Runs of 100 events continue-as-new while chunks run: each later run watches the chunks
    # it inherited and hears their ends, so the batch closes with every job counted. Chunks of
    # 5 on 7 machines run two at a time, so a run mostly continues-as-new with one still running.
    fleet = Fleet(fill_to=7)
    settings = Settings(task_queue=f"inherit-{uuid.uuid4().hex}")
    spec = fleet_spec([{"id": f"j{i:05d}"} for i in range(150)], max_machines=7, chunk_size=5)
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(
            temporal.client, settings, spec, tuning=Tuning(run_events=100)
        )
        handle = batches.batch_handle(temporal.client, submitted.batch_id)
        output = await asyncio.wait_for(handle.result(), timeout=180)
    assert output.succeeded == 150 and fleet.live == 0
    runs = await every_run(temporal.client, submitted.batch_id)
    inheriting = 0
    for run in runs[1:]:
        started = run.events[0].workflow_execution_started_event_attributes.input.payloads
        [batch] = await temporal.client.data_converter.decode(started, [BatchInput])
        if batch.state is None or not batch.state.running():
            continue  # the run before ended with no chunk running: nothing to watch
        inheriting += 1
        assert any(
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == "watch_chunks"
            for e in run.events
        )
    assert len(runs) > 2 and inheriting
    assert len([size for run in runs for size in chunk_end_sizes(run.events)]) >= 30  # each heard


async def test_each_chunk_reports_progress_once_a_turn_at_most(
    temporal: WorkflowEnvironment,
) -> None:
    # Four chunks of 30 short jobs on 3 slots each: every job that ends is news, but a chunk tells
    # the batch only at its own turns (one a period, the chunks' turns staggered), so the signals
    # the batch takes are at most one per chunk per period, however fast its jobs end.
    fleet = Fleet()
    settings = Settings(task_queue=f"turns-{uuid.uuid4().hex}")
    spec = fleet_spec([{"id": f"j{i:03d}"} for i in range(120)], 12, 30, seconds="0.3")
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec, tuning=Tuning())
        output = await batches.batch_handle(temporal.client, submitted.batch_id).result()
    assert output.succeeded == 120 and fleet.live == 0

    sent: dict[tuple[int, int], int] = {}  # (chunk, report) -> the period it was sent in
    async for execution in temporal.client.list_workflows(f'BatchId="{submitted.batch_id}"'):
        if execution.workflow_type != "ChunkWorkflow":
            continue
        history = await temporal.client.get_workflow_handle(execution.id).fetch_history()
        chunk = await started_input(
            temporal.client, temporal.client.get_workflow_handle(execution.id), ChunkInput
        )
        every = timedelta(seconds=chunk.report_every_s)
        phase = timedelta(seconds=chunk.report_phase_s % chunk.report_every_s)
        now = None  # the chunk's time in the task that sent: its workflow task's start
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                now = event.event_time.ToDatetime(tzinfo=UTC)
            told = event.signal_external_workflow_execution_initiated_event_attributes
            if told.signal_name == "chunk_report":
                report = ChunkReport.model_validate_json(told.input.payloads[0].data)
                assert now is not None
                sent[(report.index, report.seq)] = (now - EPOCH - phase) // every
    heard = [
        ChunkReport.model_validate_json(
            e.workflow_execution_signaled_event_attributes.input.payloads[0].data
        )
        for run in await every_run(temporal.client, submitted.batch_id)
        for e in run.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]
    assert heard and {(r.index, r.seq) for r in heard} <= set(sent)
    periods = Counter((r.index, sent[(r.index, r.seq)]) for r in heard)
    assert max(periods.values()) == 1, periods
