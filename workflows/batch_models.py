"""The batch workflow's input, output, carried state, signals and query answer."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from activities.job_models import JobsClaim
from sortie.labels import chunk_workflow_id
from sortie.models import Counts, StrictModel, Tuning
from sortie.notify import Notify
from sortie.spec import OnTooManyFailures, StormGuard
from workflows.pool import Pool


class ChunkPlan(StrictModel):
    """A chunk the batch has not started yet: its position and how many jobs it has."""

    index: int
    first_job: int
    size: int


class ChunkStatus(StrEnum):
    """Lifecycle of a chunk as the batch sees it."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"


class ChunkProgress(StrictModel):
    """One chunk as the batch's `progress` query and its result show it."""

    index: int
    workflow_id: str
    first_job: int
    size: int
    status: ChunkStatus = ChunkStatus.PENDING
    slots: int = 0
    counts: Counts = Counts()


class Steering(StrEnum):
    """What a batch tells its chunks: run, pause, or cancel."""

    RUN = "run"
    PAUSE = "pause"
    CANCEL = "cancel"


class ChunkState(ChunkProgress):
    """What the batch keeps of one chunk: its progress and the slots it lent it."""

    told: Steering = Steering.RUN
    """What the batch last told the chunk (it starts running)."""
    owed: int = 0
    """Slots asked back from the chunk (after the cap was lowered) and not given back yet."""
    wants_more: bool = True
    """The chunk's last report said it has more jobs waiting than free slots."""
    report_seq: int = 0
    """The newest report's number: an older report that arrives late changes no counts."""
    errors_seq: int = 0
    """The newest report that brought storm errors: the chunk waits until it is judged."""
    heard_seq: int = 0
    """The newest such report the batch told the chunk it has judged."""

    def progress(self) -> ChunkProgress:
        """The public part."""
        return ChunkProgress(**self.model_dump(include=set(ChunkProgress.model_fields)))


class FailureLimit(StrictModel):
    """When the batch stops itself for failed jobs: a count, a percentage, or both."""

    max_failures: int | None = None
    max_failure_rate: float | None = None
    """In percent of the finished jobs, counted once `FAILURE_RATE_AFTER` have finished."""
    on_too_many: OnTooManyFailures = OnTooManyFailures.PAUSE

    @property
    def is_set(self) -> bool:
        """Whether failures can stop the batch at all."""
        return self.max_failures is not None or self.max_failure_rate is not None


class PausedBy(StrEnum):
    """Which of the batch's own guards paused it (an operator's or the budget's pause is not)."""

    FAILURES = "failures"
    STORM = "storm"


class StormMark(StrictModel):
    """Errors of one kind that blame the platform, as one chunk report brought them."""

    at: datetime
    kind: str
    count: int


class BatchState(StrictModel):
    """The batch's state carried across continue-as-new."""

    max_machines: int
    max_cost_usd: float | None = None
    over_budget: bool = False
    prompt_jobs: bool = False
    paused: bool = False
    pause_reason: str | None = None
    paused_by: PausedBy | None = None
    failure_limit: FailureLimit = FailureLimit()
    storm_marks: list[StormMark] = []
    """Storm errors heard within the storm window, oldest first."""
    auto_resume_at: datetime | None = None
    cancelled: bool = False
    cancel_reason: str | None = None
    pauses: int = 0
    """Times the batch paused; the webhook has been told of the first `pauses_told`."""
    pauses_told: int = 0
    chunks: list[ChunkState] = []
    pending: list[ChunkPlan] = []
    pool: Pool = Pool()
    """Stopped machines no chunk holds, waiting for a job (`reuse_machines`)."""

    @property
    def steering(self) -> Steering:
        """What every running chunk should have been told."""
        if self.cancelled:
            return Steering.CANCEL
        return Steering.PAUSE if self.paused else Steering.RUN

    def counts(self) -> Counts:
        """The batch's job counts: its chunks' together."""
        return Counts.total_of([chunk.counts for chunk in self.chunks])

    def running(self) -> list[ChunkState]:
        """The chunks started and not done."""
        return [c for c in self.chunks if c.status is ChunkStatus.RUNNING]

    def unfinished(self) -> int:
        """Chunks not started or not done."""
        return len(self.pending) + len(self.running())

    def all_done(self) -> bool:
        """Every chunk done or skipped."""
        return not self.pending and not self.running()

    def status(self) -> str:
        """completed, cancelled, cancelling, paused or running."""
        if self.all_done():
            return "cancelled" if self.cancelled else "completed"
        if self.cancelled:
            return "cancelling"
        return "paused" if self.paused else "running"


class BatchInput(StrictModel):
    """Start a batch: the validated batch file's settings, and a claim check for its jobs.

    The jobs themselves (defaults applied) wait in the object store, one object per chunk, so
    the input stays small whatever the batch's size; `secrets` and `prompt_jobs` are what the
    batch checks before any machine exists.
    """

    batch_id: str
    name: str
    app: str
    apps: list[str] = []
    """Every Fly app of the batch (the jobs take them in turn); empty: `app` alone."""
    priority: int = 3
    max_machines: int
    max_cost_usd: float | None = None
    keep_sessions_s: float | None = None
    reuse_idle_s: float | None = None
    """`reuse_machines`: a machine that ended its job cleanly takes another, and waits this
    long at most (None: one machine per job)."""
    failure_limit: FailureLimit = FailureLimit()
    storm: StormGuard | None = StormGuard()
    notify: Notify | None = None
    jobs: JobsClaim
    secrets: list[str] = []
    prompt_jobs: bool = False
    tuning: Tuning = Tuning()
    """A retry's jobs that continue their Claude session (ran out of turns or budget), by id."""
    state: BatchState | None = None

    def every_app(self) -> list[str]:
        """The Fly apps the batch's machines are created in."""
        return self.apps or [self.app]


class BatchOutput(StrictModel):
    """A closed batch: totals, and per chunk where to find the per-job results."""

    batch_id: str
    name: str
    status: str
    total: int
    succeeded: int
    failed: int
    cancelled: int
    timed_out: int
    cost_usd: float = 0.0
    num_turns: int = 0
    chunks: list[ChunkProgress]
    cancel_reason: str | None = None


class Progress(StrictModel):
    """What the `progress` query answers."""

    batch_id: str
    status: str
    paused: bool
    pause_reason: str | None
    cancelled: bool
    max_machines: int
    max_cost_usd: float | None = None
    failure_limit: FailureLimit = FailureLimit()
    cancel_reason: str | None = None
    counts: Counts
    chunks: list[ChunkProgress]
    apps: list[str] = []
    """The Fly apps the batch's machines are created in."""


class PauseRequest(StrictModel):
    """Why a batch pauses."""

    reason: str = Field(default="paused by operator", max_length=200)


class CancelRequest(StrictModel):
    """Why a batch is cancelled."""

    reason: str = Field(default="cancelled by operator", max_length=200)


class MaxCostRequest(StrictModel):
    """A new budget for a running batch, in US dollars."""

    max_cost_usd: float = Field(gt=0)


class MaxMachinesRequest(StrictModel):
    """A new concurrency cap for a running batch."""

    max_machines: int = Field(ge=1, le=2000)


class FailureLimitRequest(StrictModel):
    """New failure thresholds for a running batch: a field left out stays, 0 removes the limit."""

    max_failures: int | None = Field(default=None, ge=0)
    max_failure_rate: float | None = Field(default=None, ge=0, le=100)
    on_too_many_failures: OnTooManyFailures | None = None


def plan(input: BatchInput) -> BatchState:
    """A new batch's state: its jobs split into chunks of `chunk_size`, as the starter stored
    them, none started."""
    claim = input.jobs
    firsts = range(0, claim.total, claim.chunk_size)
    sizes = [min(claim.chunk_size, claim.total - first) for first in firsts]
    return BatchState(
        max_machines=input.max_machines,
        max_cost_usd=input.max_cost_usd,
        failure_limit=input.failure_limit,
        prompt_jobs=input.prompt_jobs,
        chunks=[
            ChunkState(
                index=index,
                workflow_id=chunk_workflow_id(input.batch_id, index),
                first_job=first,
                size=size,
                counts=Counts(total=size, pending=size),
            )
            for index, (first, size) in enumerate(zip(firsts, sizes, strict=True))
        ],
        pending=[
            ChunkPlan(index=index, first_job=first, size=size)
            for index, (first, size) in enumerate(zip(firsts, sizes, strict=True))
        ],
    )


def output(input: BatchInput, state: BatchState) -> BatchOutput:
    """A closed batch's result: its totals and chunks."""
    counts = state.counts()
    return BatchOutput(
        batch_id=input.batch_id,
        name=input.name,
        status=state.status(),
        total=counts.total,
        succeeded=counts.succeeded,
        failed=counts.failed + counts.timed_out,
        timed_out=counts.timed_out,
        cancelled=counts.cancelled,
        cost_usd=round(counts.cost_usd, 6),
        num_turns=counts.num_turns,
        chunks=[chunk.progress() for chunk in state.chunks],
        cancel_reason=state.cancel_reason,
    )


def progress(input: BatchInput, state: BatchState) -> Progress:
    """What the batch's `progress` query answers."""
    return Progress(
        batch_id=input.batch_id,
        status=state.status(),
        paused=state.paused,
        pause_reason=state.pause_reason,
        cancelled=state.cancelled,
        max_machines=state.max_machines,
        max_cost_usd=state.max_cost_usd,
        failure_limit=state.failure_limit,
        cancel_reason=state.cancel_reason,
        counts=state.counts(),
        chunks=[chunk.progress() for chunk in state.chunks],
        apps=input.every_app(),
    )
