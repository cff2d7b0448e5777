"""The steps of a job's attempt that its chunk awaits, each an activity or a timer: create the
machine (through the app's create queue), or with `reuse_machines` give a waiting machine of
the job's app the job (`reuse_machine`: Fly's update call, a start on a fresh root filesystem);
finish the job on it (`finish_job`: wait, collect, destroy or keep), destroy it when
`finish_job` did not; and the two ways an attempt ends short of a verdict: its machine failed
(another attempt, on a new machine), or every Claude credential rests (the same attempt, once
the rest is over)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NamedTuple

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.machine_models import (
        CreateMachineOutput,
        DestroyMachineInput,
        FinishJobOutput,
        ReuseMachineInput,
    )
    from activities.machines import MachineActivities
    from sortie.models import Followup, JobResult, MachineRef, Tuning
    from sortie.pacing import create_queue
    from sortie.spec import Job
    from workflows import policies
    from workflows.chunk_models import ChunkInput, finish_input, launch_input
    from workflows.outcomes import why
    from workflows.pool import Pool
    from workflows.shielded import complete, settle

REST_UNKNOWN_S = 60.0
"""How long a job waits for a credential when the pool named no end to its rest."""


class InfrastructureFailure(Exception):
    """The machine, not the job, failed: worth another attempt on a new machine."""

    def __init__(self, why: str, *, oom: bool = False) -> None:
        super().__init__(why)
        self.oom = oom
        """The kernel killed it for memory: the next attempt may get more (`on_oom`)."""


class Claim(NamedTuple):
    """What a job took from its chunk's waiting machines for its attempt."""

    waiting: MachineRef | None
    doomed: list[MachineRef]

    def machines(self) -> list[MachineRef]:
        return [*self.doomed, *([self.waiting] if self.waiting else [])]


class CredentialsRest(Exception):
    """Every Claude credential rests: no machine was made, the attempt waits for `until`."""

    def __init__(self, until: datetime | None) -> None:
        super().__init__(f"every Claude credential rests until {until}")
        self.until = until


async def create(
    chunk: ChunkInput, job: Job, attempt: int, followup: Followup | None
) -> CreateMachineOutput:
    """Create the machine; if cancelled meanwhile, let the create land and destroy it."""
    app = chunk.app_of(job)
    creating = workflow.execute_activity_method(
        MachineActivities.create_machine,
        launch_input(chunk, job, attempt, workflow.info().workflow_id, followup),
        # The app's create queue: its pacer paces it for every worker together.
        task_queue=create_queue(workflow.info().task_queue, app),
        start_to_close_timeout=timedelta(seconds=chunk.tuning.create_timeout_s),
        schedule_to_close_timeout=policies.CREATE_DEADLINE,
        retry_policy=policies.FLY_RETRY,
        summary=f"create machine in {app} for job {job.id} (attempt {attempt})",
    )
    settled, interrupted = await settle(creating)
    if interrupted:
        if settled.exception() is None:
            await complete(destroy(settled.result().machine, chunk.tuning))
        raise asyncio.CancelledError
    return settled.result()


def claim(pool: Pool, app: str, room: int) -> Claim:
    """Take from the pool, as the job takes its slot, a waiting machine of its app, or else,
    with no `room` for another machine in the chunk's window, one of another app to destroy
    first: a job that holds a slot holds its machine too, so no waiting machine leaves the
    chunk with a slot that a job still counts on."""
    waiting = pool.take(app)
    return Claim(waiting=waiting, doomed=pool.oldest(1) if waiting is None and room < 0 else [])


async def machine_for(
    chunk: ChunkInput, job: Job, attempt: int, followup: Followup | None, claimed: Claim
) -> tuple[CreateMachineOutput, bool]:
    """The claimed waiting machine given the job, else a new one (once the machine that held
    its slot is destroyed), and whether it was reused."""
    await complete(asyncio.gather(*(destroy(m, chunk.tuning) for m in claimed.doomed)))
    if (waiting := claimed.waiting) is not None:
        try:
            return await reuse(chunk, job, attempt, followup, waiting), True
        except ActivityError as error:  # gone, or refused: a new machine instead
            workflow.logger.info("machine %s not reused: %s", waiting.machine_id, why(error))
            await complete(destroy(waiting, chunk.tuning))
    return await create(chunk, job, attempt, followup), False


async def reuse(
    chunk: ChunkInput, job: Job, attempt: int, followup: Followup | None, machine: MachineRef
) -> CreateMachineOutput:
    """Give the waiting machine the job and start it; if cancelled meanwhile, destroy it."""
    launch = launch_input(chunk, job, attempt, workflow.info().workflow_id, followup)
    reusing = workflow.execute_activity_method(
        MachineActivities.reuse_machine,
        ReuseMachineInput(**launch.model_dump(), machine=machine),
        start_to_close_timeout=timedelta(seconds=chunk.tuning.call_timeout_s),
        schedule_to_close_timeout=policies.CREATE_DEADLINE,
        retry_policy=policies.FLY_RETRY,
        summary=f"reuse machine {machine.machine_id} for job {job.id} (attempt {attempt})",
    )
    settled, interrupted = await settle(reusing)
    if interrupted:
        await complete(destroy(machine, chunk.tuning))
        raise asyncio.CancelledError
    return settled.result()


async def finish_job(
    chunk: ChunkInput, job: Job, machine: MachineRef, attempt: int, result: JobResult
) -> FinishJobOutput:
    """Wait until the machine settles or the job's deadline passes, read it, destroy it."""
    return await workflow.execute_activity_method(
        MachineActivities.finish_job,
        finish_input(chunk, job, machine, attempt, result, workflow.now()),
        start_to_close_timeout=timedelta(seconds=job.timeout_s + job.boot_timeout_s)
        + policies.WAIT_MARGIN,
        heartbeat_timeout=timedelta(seconds=chunk.tuning.heartbeat_timeout_s),
        retry_policy=policies.FLY_RETRY,
        summary=f"run job {job.id} on machine {machine.machine_id} in {machine.app}, "
        "collect, destroy",
    )


async def destroy(machine: MachineRef, tuning: Tuning) -> None:
    """Destroy the machine; retried until it is gone."""
    await workflow.execute_activity_method(
        MachineActivities.destroy_machine,
        DestroyMachineInput(machine=machine),
        start_to_close_timeout=timedelta(seconds=tuning.call_timeout_s),
        retry_policy=policies.DESTROY_RETRY,
        summary=f"destroy machine {machine.machine_id}",
    )


async def wait_for_credential(until: datetime | None, cancelled: Callable[[], bool]) -> None:
    """Wait, with no machine, until the earliest credential rest is over (a durable timer), or
    until the chunk is cancelled."""
    now = workflow.now()
    if until is None:
        until = now + timedelta(seconds=REST_UNKNOWN_S)
    until = max(until, now + timedelta(seconds=1))
    with contextlib.suppress(TimeoutError):
        await workflow.wait_condition(
            cancelled,
            timeout=until - now,
            timeout_summary="wait until a Claude credential's rest is over",
        )
