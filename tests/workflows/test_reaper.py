"""The orphan reaper: what a terminated batch and a dead worker leave, it destroys."""

from __future__ import annotations

import contextlib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import ScheduleActionExecutionStartWorkflow, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from client import batches
from fly import FlyClient, InitConfig, MachineConfig
from sortie import reaping
from sortie.codec import new_key
from sortie.labels import chunk_workflow_id, machine_metadata
from sortie.reaper_models import ReapInput, ReapOutput
from sortie.temporal import connect
from tests.helpers.batches import TUNING, settings_for, spec_for
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import running_worker
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.slow


def live(localfly: Any, app: str) -> list[str]:
    return [m["id"] for m in localfly.machines(app) if m["state"] != "destroyed"]


async def test_reaper_destroys_what_a_terminated_batch_left(
    temporal: WorkflowEnvironment,
    localfly: Any,
    fly_client: FlyClient,
    app_name: str,
    tmp_path: Path,
) -> None:
    batch_settings = settings_for(temporal.client.service_client.config.target_host)
    # The reaper runs on a worker of its own queue: the batch's worker is dead for good.
    reaper_settings = settings_for(temporal.client.service_client.config.target_host)
    doomed = WorkerProcess(batch_settings, localfly.url, tmp_path / "worker.log").start()
    try:
        submitted = await batches.submit(
            temporal.client, batch_settings, spec_for(app_name, seconds=300), tuning=TUNING
        )
        await eventually(lambda: len(live(localfly, app_name)) == 4, what="four live machines")
        async with running_worker(temporal.client, reaper_settings, fly_client):
            owned = await reaping.reap_once(
                temporal.client, reaper_settings, ReapInput(app=app_name, dry_run=True)
            )
            assert (owned.checked, owned.orphans) == (4, [])

            doomed.kill()
            await batches.batch_handle(temporal.client, submitted.batch_id).terminate("gave up")
            listed = await reaping.reap_once(
                temporal.client, reaper_settings, ReapInput(app=app_name, dry_run=True)
            )
            assert len(listed.orphans) == 4 and listed.destroyed == 0
            assert "terminated" in listed.orphans[0].reason
            assert len(live(localfly, app_name)) == 4, "a dry run destroys nothing"

            swept = await reaping.reap_once(
                temporal.client, reaper_settings, ReapInput(app=app_name)
            )
    finally:
        doomed.stop()
    assert swept.destroyed == 4
    assert live(localfly, app_name) == []
    # Both started chunks (one slot for the first while the second waited, three for the
    # second) are cancelled, so no worker that comes back later creates machines for a batch
    # that no longer exists.
    stray = chunk_workflow_id(submitted.batch_id, 0)
    assert swept.cancelled_chunks == [stray, chunk_workflow_id(submitted.batch_id, 1)]
    chunk = await temporal.client.get_workflow_handle(stray).describe()
    assert chunk.status is WorkflowExecutionStatus.RUNNING  # until a worker runs its cancel
    history = await temporal.client.get_workflow_handle(stray).fetch_history()
    assert any(
        e.workflow_execution_cancel_requested_event_attributes.ByteSize() for e in history.events
    )


async def test_reaper_schedule_is_created_once_and_updated_in_place(
    temporal: WorkflowEnvironment,
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    app = f"sched-{uuid.uuid4().hex[:6]}"
    request = ReapInput(app=app)
    first = await reaping.schedule_reaper(temporal.client, settings, request, timedelta(hours=1))
    again = await reaping.schedule_reaper(temporal.client, settings, request, timedelta(minutes=10))
    handle = temporal.client.get_schedule_handle(first)
    try:
        description = await handle.describe()
        assert first == again == f"sortie-reaper-{app}"
        assert description.schedule.spec.intervals[0].every == timedelta(minutes=10)
    finally:
        await handle.delete()


async def test_every_worker_start_ensures_one_schedule_per_queue(
    temporal: WorkflowEnvironment,
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    app = f"queue-{uuid.uuid4().hex[:6]}"
    client = temporal.client
    first = await reaping.ensure_reaper_schedule(client, settings, app)
    handle = client.get_schedule_handle(reaping.queue_schedule_id(settings.task_queue))
    try:
        created = (await handle.describe()).info.last_updated_at
        again = await reaping.ensure_reaper_schedule(client, settings, app)
        assert first == again == f"sortie-reaper-queue-{settings.task_queue}"
        assert (await handle.describe()).info.last_updated_at == created, "unchanged: no update"

        faster = settings.model_copy(update={"reaper_interval_s": 30.0})
        await reaping.ensure_reaper_schedule(client, faster, app)
        description = await handle.describe()
        assert description.schedule.spec.intervals[0].every == timedelta(seconds=30)
        assert description.info.last_updated_at != created

        off = settings.model_copy(update={"reaper": False})
        assert await reaping.ensure_reaper_schedule(client, off, app) is None
        assert await reaping.ensure_reaper_schedule(client, settings, None) is None
        ids = [s.id async for s in await client.list_schedules()]
        assert ids.count(first) == 1
    finally:
        await handle.delete()


async def test_a_scheduled_sweep_nobody_typed_destroys_a_terminated_batchs_machines(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    address = temporal.client.service_client.config.target_host
    batch_settings, reaper_settings = settings_for(address), settings_for(address)
    doomed = WorkerProcess(batch_settings, localfly.url, tmp_path / "batch-worker.log").start()
    reaper = WorkerProcess(
        reaper_settings,
        localfly.url,
        tmp_path / "reaper-worker.log",
        env={"FLY_APP": app_name, "SORTIE_REAPER_INTERVAL": "2s"},
    )
    handle = temporal.client.get_schedule_handle(
        reaping.queue_schedule_id(reaper_settings.task_queue)
    )
    try:
        submitted = await batches.submit(
            temporal.client, batch_settings, spec_for(app_name, seconds=300), tuning=TUNING
        )
        await eventually(lambda: len(live(localfly, app_name)) == 4, what="four live machines")
        doomed.kill()
        await batches.batch_handle(temporal.client, submitted.batch_id).terminate("gave up")
        reaper.start()  # a worker started as in production: nothing else is asked of it
        await eventually(
            lambda: live(localfly, app_name) == [], timeout=60, what="the orphans destroyed"
        )
        description = await handle.describe()
        assert description.schedule.spec.intervals[0].every == timedelta(seconds=2)
        runs = [a.action for a in description.info.recent_actions]
        outputs = [
            await temporal.client.get_workflow_handle(
                run.workflow_id, result_type=ReapOutput
            ).result()
            for run in runs
            if isinstance(run, ScheduleActionExecutionStartWorkflow)
        ]
        assert sum(o.destroyed for o in outputs) == 4, "scheduled runs did the sweep"
    finally:
        doomed.stop()
        reaper.stop()
        with contextlib.suppress(Exception):
            await handle.delete()


async def test_a_paused_schedule_stays_paused_when_a_worker_updates_it(
    temporal: WorkflowEnvironment,
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    app = f"paused-{uuid.uuid4().hex[:6]}"
    sid = await reaping.ensure_reaper_schedule(temporal.client, settings, app)
    assert sid is not None
    handle = temporal.client.get_schedule_handle(sid)
    try:
        await handle.pause(note="maintenance")
        faster = settings.model_copy(update={"reaper_interval_s": 60.0})
        await reaping.ensure_reaper_schedule(temporal.client, faster, app)
        description = await handle.describe()
        assert description.schedule.spec.intervals[0].every == timedelta(seconds=60)
        assert description.schedule.state.paused
        assert description.schedule.state.note == "maintenance"
    finally:
        await handle.delete()


async def test_an_encrypted_schedule_is_recognised_as_unchanged(
    temporal: WorkflowEnvironment,
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    client = await connect(settings, {"SORTIE_ENCRYPTION_KEYS": new_key("k1")})
    first, second = f"enc-{uuid.uuid4().hex[:6]}", f"enc-{uuid.uuid4().hex[:6]}"
    sid = await reaping.ensure_reaper_schedule(client, settings, first)
    assert sid is not None
    handle = client.get_schedule_handle(sid)
    try:
        created = (await handle.describe()).info.last_updated_at
        await reaping.ensure_reaper_schedule(client, settings, second)
        updated = (await handle.describe()).info.last_updated_at
        assert updated != created, "another app: updated"
        await reaping.ensure_reaper_schedule(client, settings, second)
        assert (await handle.describe()).info.last_updated_at == updated, "same app: left alone"
    finally:
        await handle.delete()


async def test_a_waiting_reusable_machine_is_owned_by_its_batch_alone(
    temporal: WorkflowEnvironment, localfly: Any, fly_client: FlyClient, app_name: str
) -> None:
    """`reuse_machines`: a stopped machine outlives the chunk of its last job; the reaper keeps
    it while its batch runs, and destroys it once the batch is gone."""
    settings = settings_for(temporal.client.service_client.config.target_host)
    batch_id = f"batch-reaped-{uuid.uuid4().hex[:8]}"
    # A batch that runs (no worker ever takes it); its chunk 3 never existed or closed.
    batch = await temporal.client.start_workflow(
        "BatchWorkflow", id=batch_id, task_queue=f"nobody-{uuid.uuid4().hex}"
    )
    kept = machine_metadata(batch_id, 3, "job-1", 1, "chunk-owner", reuse=True)
    plain = machine_metadata(batch_id, 3, "job-2", 1, chunk_workflow_id(batch_id, 3))
    for metadata in (kept, plain):
        config = MachineConfig(image="alpine", init=InitConfig(exec=["true"]), metadata=metadata)
        await fly_client.create_machine(app_name, config)
    async with running_worker(temporal.client, settings, fly_client):
        swept = await reaping.reap_once(temporal.client, settings, ReapInput(app=app_name))
        assert [o.job_id for o in swept.orphans] == ["job-2"]  # its chunk owned it
        await batch.terminate("gave up")
        swept = await reaping.reap_once(temporal.client, settings, ReapInput(app=app_name))
    assert [o.job_id for o in swept.orphans] == ["job-1"] and swept.destroyed == 1
    assert live(localfly, app_name) == []
