"""The chunk workflow's input and output, and what it and its batch tell each other."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import Field

from activities.job_models import JobSlice
from activities.machine_models import (
    CollectResultInput,
    CreateMachineInput,
    FinishJobInput,
    WaitMachineInput,
)
from sortie.models import Counts, Followup, JobResult, JobState, MachineRef, StrictModel, Tuning
from sortie.spec import Job, app_for


class ChunkInput(StrictModel):
    """Start a chunk: where its jobs are (a claim on the object store) and its machine slots.

    A chunk is a child of its batch and reports to it; a follow-up turn runs as a chunk of one
    job with no parent, and reports to nobody: its one job travels in `jobs` itself.
    """

    batch_id: str
    index: int
    app: str
    apps: list[str] = []
    """Every Fly app of the batch; empty: `app` alone."""
    claim: JobSlice | None = None
    jobs: list[Job] = []
    slots: int
    paused: bool = False
    budgeted: bool = False
    guarded: bool = False
    """The batch has a failure limit: a failed job's slot goes back to it to be judged."""
    report_every_s: float = Field(default=5.0, gt=0)
    """Progress reaches the batch at most this late (the batch sets it: see its REPORTS_PER_S)."""
    report_phase_s: float = Field(default=0.0, ge=0)
    """When in each `report_every_s` this chunk reports: the batch staggers its chunks."""
    tuning: Tuning = Tuning()
    followup: Followup | None = None
    """Jobs of a retry batch that continue their session instead of starting over, by id."""
    reuse_idle_s: float | None = None
    """The batch reuses machines (workflows/pool.py): a machine waits this long at most."""
    machines: list[MachineRef] = []
    """Stopped machines the batch hands the chunk with its window, for its first jobs."""

    @property
    def reuse(self) -> bool:
        """Whether a machine that ended its job cleanly takes another."""
        return self.reuse_idle_s is not None

    def app_of(self, job: Job) -> str:
        """The Fly app the job's machines are created in."""
        return app_for(self.apps, job.index) if self.apps else self.app


class ChunkReport(StrictModel):
    """A chunk tells the batch what it has released, how far it is, and what errors it met.

    Signals between workflows may arrive out of order: `seq` lets the batch keep only the newest
    counts, while `released` and `errors` (deltas) count whatever order they arrive in.
    """

    index: int
    seq: int = 0
    released: int = 0
    wants_more: bool = True
    counts: Counts
    errors: dict[str, int] = {}
    """Attempts that ended with a storm error since the last report, by kind (a delta)."""
    machines: list[MachineRef] = []
    """Stopped machines given back with the slots they held (`reuse_machines`)."""
    resting_until: datetime | None = None
    """Every Claude credential rests until then, as a job of the chunk found (the earliest)."""


class SlotGrant(StrictModel):
    """The batch gives a chunk more machine slots, or asks for some back as jobs finish."""

    grant: int = Field(default=0, ge=0)
    give_back: int = Field(default=0, ge=0)
    heard: int = Field(default=0, ge=0)
    """The newest report with storm errors the batch has judged (and paused for, if it must)."""
    machines: list[MachineRef] = []
    """Stopped machines that come with the granted slots (`reuse_machines`)."""


def launch_input(
    chunk: ChunkInput, job: Job, attempt: int, owner: str, followup: Followup | None
) -> CreateMachineInput:
    """What a machine for this job attempt is given, created or reused; `owner` destroys it."""
    return CreateMachineInput(
        batch_id=chunk.batch_id,
        chunk_index=chunk.index,
        app=chunk.app_of(job),
        job=job,
        attempt=attempt,
        owner=owner,
        followup=followup,
        reuse=chunk.reuse,
    )


def finish_input(
    chunk: ChunkInput, job: Job, machine: MachineRef, attempt: int, result: JobResult, now: datetime
) -> FinishJobInput:
    """What `finish_job` needs: the job's deadlines from `now`, and what to collect."""
    tuning = chunk.tuning
    return FinishJobInput(
        wait=WaitMachineInput(
            machine=machine,
            job_id=job.id,
            deadline=now + timedelta(seconds=job.timeout_s),
            boot_deadline=now + timedelta(seconds=job.boot_timeout_s),
            heartbeat_every_s=tuning.heartbeat_every_s,
        ),
        collect=CollectResultInput(
            machine=machine,
            job_id=job.id,
            secrets=job.secrets,
            tail_lines=tuning.log_tail_lines,
            tail_bytes=tuning.log_tail_bytes,
            batch_id=chunk.batch_id,
            prompt_job=job.prompt is not None,
            turn=result.turn,
            attempt=attempt,
            credential=result.credential,
            log_tail=job.log_tail,
            json_schema=job.json_schema if result.turn == 1 else None,  # a follow-up is free
            spend_of=job.index if job.verify is not None and chunk.budgeted else None,
            artifacts=bool(job.artifacts),
        ),
        keep=chunk.reuse,
    )


def unread(claim: JobSlice, turn: int, why: str) -> list[JobResult]:
    """The rows of a chunk whose jobs could not be read from the store: every job failed."""
    failed = f"the chunk's jobs could not be read: {why}"
    return [
        JobResult(job_id=f"#{i}", index=i, turn=turn, state=JobState.FAILED, error=failed)
        for i in range(claim.first_job, claim.first_job + claim.size)
    ]


UNDER_WAY = (JobState.PENDING, JobState.STARTING, JobState.RUNNING)


def details(counts: Counts, state: str, slots: int, results: list[JobResult]) -> str:
    """A chunk's current details in the Web UI: its counts, and the jobs that did not succeed
    (its rows themselves are in the object store once it closed)."""
    c = counts
    missed = [r for r in results if r.state not in (*UNDER_WAY, JobState.SUCCEEDED)]
    return (
        f"**{c.done}/{c.total} jobs done** ({state})\n\n"
        f"- running: {c.running}, live machines: {c.live_machines}, slots: {slots}\n"
        f"- succeeded: {c.succeeded}, failed: {c.failed}, timed out: {c.timed_out}, "
        f"cancelled: {c.cancelled}\n"
        + "".join(f"- {r.job_id}: {r.state.value}, {(r.error or '')[:200]}\n" for r in missed[:20])
    )
