"""A finishing job hands its slot to the chunk's next job inside `finish_job`.

The activity tests run `finish_job` against localfly with a stand-in chunk whose memo is the
gate; the batch tests run the real workflows over the in-memory fleet.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHandle
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.machine_models import (
    MAY_START_MEMO,
    CollectResultInput,
    CreateMachineInput,
    DestroyNamedMachineInput,
    FinishJobInput,
    WaitMachineInput,
)
from activities.machines import MachineActivities
from fly import FlyClient, InitConfig, MachineConfig, RestartConfig
from sortie import batches
from sortie.labels import machine_name
from sortie.models import MachineRef
from sortie.secrets import SecretStore
from sortie.settings import Settings
from sortie.spec import Job
from tests.helpers.fleet import Fleet, fleet_spec, fleet_worker


@workflow.defn(sandboxed=False)
class StandInChunk:
    """A running workflow whose memo plays the chunk's gate."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)


StartChunk = Callable[[bool | None], Awaitable[str]]


@pytest.fixture
async def chunk(temporal: WorkflowEnvironment) -> AsyncIterator[StartChunk]:
    """Start stand-in chunks with the gate open (True), closed (False) or never written."""
    queue = f"stand-in-{uuid.uuid4().hex}"
    handles: list[WorkflowHandle[StandInChunk, None]] = []

    async def start(gate: bool | None) -> str:
        memo = {} if gate is None else {MAY_START_MEMO: gate}
        handle = await temporal.client.start_workflow(
            StandInChunk.run, id=f"chunk-{uuid.uuid4().hex}", task_queue=queue, memo=memo
        )
        handles.append(handle)
        return handle.id

    async with Worker(temporal.client, task_queue=queue, workflows=[StandInChunk]):
        yield start
        for handle in handles:
            await handle.terminate()


def _job(job_id: str, index: int) -> Job:
    return Job(id=job_id, index=index, command=["true"], image="alpine")


def _finish_input(app: str, ref: MachineRef, owner: str, next_job: str) -> FinishJobInput:
    later = datetime.now(UTC) + timedelta(seconds=30)
    return FinishJobInput(
        wait=WaitMachineInput(machine=ref, job_id="this-job", deadline=later, boot_deadline=later),
        collect=CollectResultInput(machine=ref, job_id="this-job", batch_id="b-hand-over"),
        next=CreateMachineInput(
            batch_id="b-hand-over",
            chunk_index=0,
            app=app,
            job=_job(next_job, 1),
            attempt=1,
            owner=owner,
        ),
    )


async def _this_job(fly: FlyClient, app: str, exit_code: int) -> MachineRef:
    config = MachineConfig(
        image="alpine",
        init=InitConfig(exec=["sh", "-c", f"exit {exit_code}"]),
        restart=RestartConfig(policy="no"),
    )
    machine = await fly.create_machine(app, config, name=f"this-{uuid.uuid4().hex[:6]}")
    return MachineRef(
        app=app, machine_id=machine.id, name=machine.name or "", version=machine.current_version
    )


async def _named(fly: FlyClient, app: str, job_id: str) -> list[str]:
    """The states of every machine ever made for the job's first attempt."""
    name = machine_name("b-hand-over", job_id, 1)
    return [
        m.state or "" for m in await fly.list_machines(app, include_deleted=True) if m.name == name
    ]


@pytest.mark.parametrize("exit_code", [0, 3])
async def test_a_job_that_ended_hands_its_slot_to_the_next_job_once(
    temporal: WorkflowEnvironment,
    fly_client: FlyClient,
    app_name: str,
    tmp_path: Path,
    chunk: StartChunk,
    exit_code: int,
) -> None:
    owner = await chunk(None)
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    ref = await _this_job(fly_client, app_name, exit_code)
    env = ActivityEnvironment(client=temporal.client)

    finished = await env.run(activities.finish_job, _finish_input(app_name, ref, owner, "next-job"))
    # The answer was lost; Temporal runs the activity again.
    env.info = dataclasses.replace(env.info, attempt=2)
    again = await env.run(activities.finish_job, _finish_input(app_name, ref, owner, "next-job"))

    assert finished.collected is not None and finished.collected.exit_code == exit_code
    assert finished.destroyed and finished.next is not None
    assert again.next is not None and again.next.found_existing
    assert again.next.machine.machine_id == finished.next.machine.machine_id
    assert (await fly_client.get_machine(app_name, ref.machine_id)).state == "destroyed"
    assert len(await _named(fly_client, app_name, "next-job")) == 1

    destroy = DestroyNamedMachineInput(
        app=app_name, batch_id="b-hand-over", job_id="next-job", attempt=1
    )
    first = await env.run(activities.destroy_named_machine, destroy)
    second = await env.run(activities.destroy_named_machine, destroy)
    assert (first.destroyed, second.already_gone) == (True, True)
    assert await _named(fly_client, app_name, "next-job") == ["destroyed"]


async def test_no_machine_for_a_job_the_chunk_does_not_let_start(
    temporal: WorkflowEnvironment,
    fly_client: FlyClient,
    app_name: str,
    tmp_path: Path,
    chunk: StartChunk,
) -> None:
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    ref = await _this_job(fly_client, app_name, 0)
    env = ActivityEnvironment(client=temporal.client)
    closed = _finish_input(app_name, ref, await chunk(False), "paused-job")
    missing = _finish_input(app_name, ref, f"no-such-chunk-{uuid.uuid4().hex}", "lost-job")

    refused = await env.run(activities.finish_job, closed)
    unanswered = await env.run(activities.finish_job, missing)
    opened = await env.run(
        activities.finish_job, _finish_input(app_name, ref, await chunk(True), "next-job")
    )

    assert refused.destroyed and refused.next is None
    assert unanswered.next is None
    assert await _named(fly_client, app_name, "paused-job") == []
    assert await _named(fly_client, app_name, "lost-job") == []
    assert opened.next is not None  # the same machine, already destroyed, with the gate open


async def test_slots_pass_from_job_to_job_and_no_job_runs_twice(
    temporal: WorkflowEnvironment,
) -> None:
    fleet = Fleet()
    settings = Settings(task_queue=f"hand-over-{uuid.uuid4().hex}")
    jobs = [{"id": f"j{i:03d}"} for i in range(40)]
    spec = fleet_spec(jobs, max_machines=4, chunk_size=10)
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec)
        output = await batches.batch_handle(temporal.client, submitted.batch_id).result()

    assert output.succeeded == 40
    assert sorted(Counter(fleet.runs).values()) == [1] * 40
    assert fleet.most <= 4 and fleet.live == 0
    # Each of the 4 slots starts its first job by a create of its own; after that, a finishing
    # job hands its slot over unless the batch moved the slot to another chunk meanwhile.
    assert fleet.handed_over >= 40 - 4 * 4
