"""An in-memory fleet standing in for the machine activities, for fast workflow-logic tests.

Only the machine activities are replaced (same names, same models); the workflows, the
dev server and the worker are real. Job behaviour is read from the job's env: SECONDS (run
time), EXIT (exit code), COST (what a prompt job spent), FAIL_ATTEMPTS (how many first attempts
end in the `failed` state), ERROR_KIND (the Claude error a prompt job's first ERROR_ATTEMPTS
attempts end with, every one when unset), CREATE_ERROR (the ApplicationError type its creates
fail with for good, e.g. FlyRateLimited). With `reuse_machines` a machine whose job ended
cleanly is kept, and `reuse_machine` gives it the next job.
With `fill_to`, no job finishes before that many machines exist at once: a test of the cap then
proves it is reached without depending on timing. Like the real activities, a wait ends as
soon as its machine is destroyed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.chunks import ChunkActivities
from activities.endings import reusable
from activities.jobs import JobActivities
from activities.machine_models import (
    CheckBatchInput,
    CheckBatchOutput,
    CollectResultInput,
    CollectResultOutput,
    CreateMachineInput,
    CreateMachineOutput,
    DestroyMachineInput,
    DestroyMachineOutput,
    FinishJobInput,
    FinishJobOutput,
    JobAnswer,
    ReleaseSessionsInput,
    ReleaseSessionsOutput,
    ReuseMachineInput,
    WaitMachineInput,
    WaitMachineOutput,
    WaitOutcome,
)
from activities.pacing import CreateQueues
from client import batches
from sortie.models import MachineRef, Tuning
from sortie.settings import Settings
from sortie.spec import BatchSpec, parse_batch
from worker import SortieWorker
from workflows.batch import BatchWorkflow
from workflows.chunk import ChunkWorkflow
from workflows.pacer import CreatePacerWorkflow


@dataclass
class Fleet:
    """In-memory machines: how many exist now, the most at once, and every job run."""

    live: int = 0
    most: int = 0
    created: int = 0
    refused: int = 0
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    durations: dict[str, float] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)
    failing: dict[str, bool] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str | None] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    continued_as_new: bool = False
    fill_to: int = 0
    filled: asyncio.Event = field(default_factory=asyncio.Event)
    destroyed: set[str] = field(default_factory=set)
    machines: set[str] = field(default_factory=set)
    gone: dict[str, asyncio.Event] = field(default_factory=dict)
    serving: dict[str, str] = field(default_factory=dict)
    """Machine id to the job attempt it runs (`job-a1`)."""
    reused: int = 0

    @activity.defn(name="check_batch")
    async def check_batch(self, input: CheckBatchInput) -> CheckBatchOutput:
        return CheckBatchOutput(available=input.names)

    @activity.defn(name="create_machine")
    async def create_machine(self, input: CreateMachineInput) -> CreateMachineOutput:
        if refused := input.job.env.get("CREATE_ERROR"):
            self.refused += 1
            raise ApplicationError(f"create refused ({refused})", type=refused, non_retryable=True)
        self.live += 1
        self.created += 1
        self.most = max(self.most, self.live)
        if self.most >= self.fill_to:
            self.filled.set()
        machine_id = f"m-{input.job.id}-a{input.attempt}"
        self.machines.add(machine_id)
        self._take_job(input, machine_id)
        return CreateMachineOutput(
            machine=MachineRef(app=input.app, machine_id=machine_id, name=machine_id)
        )

    @activity.defn(name="reuse_machine")
    async def reuse_machine(self, input: ReuseMachineInput) -> CreateMachineOutput:
        self.reused += 1
        self._take_job(input, input.machine.machine_id)
        return CreateMachineOutput(machine=input.machine)

    def _take_job(self, input: CreateMachineInput, machine_id: str) -> None:
        """The machine runs this job attempt now."""
        self.serving[machine_id] = f"{input.job.id}-a{input.attempt}"
        self.runs.append(input.job.id)
        self.durations[input.job.id] = float(input.job.env.get("SECONDS", "0.02"))
        self.exits[input.job.id] = int(input.job.env.get("EXIT", "0"))
        self.costs[input.job.id] = float(input.job.env.get("COST", "0"))
        self.failing[f"{input.job.id}-a{input.attempt}"] = (
            int(input.job.env.get("FAIL_ATTEMPTS", "0")) >= input.attempt
        )
        erring = int(input.job.env.get("ERROR_ATTEMPTS", "1000")) >= input.attempt
        self.errors[f"{input.job.id}-a{input.attempt}"] = (
            input.job.env.get("ERROR_KIND") if erring else None
        )

    async def _wait(self, input: WaitMachineInput) -> WaitMachineOutput:
        if self.failing[self.serving[input.machine.machine_id]]:
            return WaitMachineOutput(outcome=WaitOutcome.FAILED, state="failed")
        await self.filled.wait()  # with fill_to, the first jobs run until that many machines exist
        gone = self._gone(input.machine.machine_id)
        try:
            await asyncio.wait_for(gone.wait(), timeout=self.durations[input.job_id])
        except TimeoutError:
            return WaitMachineOutput(outcome=WaitOutcome.EXITED, state="stopped")
        return WaitMachineOutput(outcome=WaitOutcome.GONE, state="destroyed")

    async def _collect(self, input: CollectResultInput) -> CollectResultOutput:
        answer = None
        exit_code = self.exits[input.job_id]
        if input.prompt_job:
            cost = self.costs[input.job_id]
            answer = JobAnswer(session_id=f"s-{input.job_id}", result="ok", cost_usd=cost)
            if kind := self.errors[f"{input.job_id}-a{input.attempt}"]:
                answer = JobAnswer(is_error=True, error_kind=kind, result=f"API Error: {kind}")
                exit_code = 1
        return CollectResultOutput(state="stopped", exit_code=exit_code, answer=answer)

    @activity.defn(name="finish_job")
    async def finish_job(self, input: FinishJobInput) -> FinishJobOutput:
        waited = await self._wait(input.wait)
        collected = None
        if waited.outcome in (WaitOutcome.EXITED, WaitOutcome.FAILED):
            collected = await self._collect(input.collect)
        if input.keep and reusable(waited, collected):
            return FinishJobOutput(waited=waited, collected=collected, kept=True)
        self._destroy(input.wait.machine)
        return FinishJobOutput(waited=waited, collected=collected, destroyed=True)

    @activity.defn(name="release_sessions")
    async def release_sessions(self, input: ReleaseSessionsInput) -> ReleaseSessionsOutput:
        return ReleaseSessionsOutput(deleted=True)

    @activity.defn(name="destroy_machine")
    async def destroy_machine(self, input: DestroyMachineInput) -> DestroyMachineOutput:
        gone = self._destroy(input.machine)
        return DestroyMachineOutput(destroyed=not gone, already_gone=gone)

    def _destroy(self, machine: MachineRef) -> bool:
        """Destroy a machine once; return whether it was already gone."""
        if machine.machine_id in self.destroyed:
            return True
        self.destroyed.add(machine.machine_id)
        self._gone(machine.machine_id).set()
        self.live -= 1
        return False

    def _gone(self, machine_id: str) -> asyncio.Event:
        """Set once the machine is destroyed: a wait on it ends, as Fly's does."""
        return self.gone.setdefault(machine_id, asyncio.Event())

    @property
    def activities(self) -> list[Callable[..., Any]]:
        """The activity callables to register on a worker."""
        return [
            self.check_batch,
            self.create_machine,
            self.reuse_machine,
            self.finish_job,
            self.destroy_machine,
            self.release_sessions,
        ]


def fleet_spec(
    jobs: list[dict[str, Any]],
    max_machines: int,
    chunk_size: int,
    seconds: str = "0.02",
    **fields: Any,
) -> BatchSpec:
    """A batch of command jobs for the in-memory fleet, under a fresh name."""
    return parse_batch(
        {
            "name": f"s{uuid.uuid4().hex[:8]}",
            "app": "fleet",
            "max_machines": max_machines,
            "chunk_size": chunk_size,
            "defaults": {"command": "true", "env": {"SECONDS": seconds}},
            "jobs": jobs,
            **fields,
        }
    )


def fleet_worker(
    temporal: WorkflowEnvironment,
    settings: Settings,
    activities: list[Callable[..., Any]],
    apps: tuple[str, ...] = ("fleet",),
    rate: float | None = None,
    workflows: tuple[type, ...] = (),
    cached: int = 1000,
) -> SortieWorker:
    """The real batch and chunk workflows (and `workflows`), with the fleet's activities (and
    the real reading of a chunk's jobs from the object store); its creates on the apps' create
    queues, as a real worker polls them; `cached`: workflows kept in its cache, the rest evicted."""
    [create] = [a for a in activities if getattr(a, "__name__", "") == "create_machine"]
    jobs = JobActivities(settings.blob_store())
    main = Worker(
        temporal.client,
        task_queue=settings.task_queue,
        workflows=[BatchWorkflow, ChunkWorkflow, CreatePacerWorkflow, *workflows],
        activities=[
            *(a for a in activities if a is not create),
            jobs.load_jobs,
            jobs.store_rows,
            ChunkActivities(temporal.client).watch_chunks,
        ],
        max_concurrent_activities=1000,
        max_cached_workflows=cached,
    )
    creates = CreateQueues(temporal.client, settings.task_queue, create, rate=rate, apps=apps)
    return SortieWorker(main, creates)


async def run_fleet_batch(
    temporal: WorkflowEnvironment,
    jobs: int,
    max_machines: int,
    chunk_size: int,
    seconds: str = "0.02",
    fill_to: int = 0,
    **fields: Any,
) -> tuple[Fleet, batches.BatchReport, str, Settings]:
    fleet = Fleet(fill_to=fill_to)
    settings = Settings(task_queue=f"slots-{uuid.uuid4().hex}")
    spec = fleet_spec(
        [{"id": f"j{i:05d}"} for i in range(jobs)], max_machines, chunk_size, seconds, **fields
    )
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec, tuning=Tuning())
        handle = batches.batch_handle(temporal.client, submitted.batch_id)
        first_run = (await handle.describe()).run_id
        await handle.result()
        report = await batches.results(temporal.client, submitted.batch_id)
        fleet.continued_as_new = (await handle.describe()).run_id != first_run
    return fleet, report, submitted.batch_id, settings
