"""Inputs and outputs of Sortie's workflows, signals, queries and activities.

Everything here travels through Temporal and lands in workflow history, so nothing here may
hold a secret value: secrets travel by name and are resolved on the worker.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from sortie.spec import Defaults, Job, JobSpec, LogTail


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobState(StrEnum):
    """Where a job is; the last four are final."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Whether the job will not change state again."""
        return self in FINAL_STATES


FINAL_STATES = {JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED}


class Tuning(_Model):
    """Timeouts that shape how fast failures are noticed; tests shorten them."""

    heartbeat_timeout_s: float = 20.0
    heartbeat_every_s: float = 5.0
    create_timeout_s: float = 60.0
    call_timeout_s: float = 60.0
    log_tail_lines: int = 20
    log_tail_bytes: int = 2048
    log_grace_s: float = 30.0
    run_events: int = Field(default=2_000, ge=100)
    """A batch run continues-as-new past this many events, well below Temporal's suggestion
    (4,096 events or 4 MB), so a worker that lost its cache replays a short history quickly."""


# ---------------------------------------------------------------- workflows


class ChunkPlan(_Model):
    """A chunk the batch has not started yet: its position and its jobs."""

    index: int
    first_job: int
    jobs: list[JobSpec]


class Counts(_Model):
    """Job counts by state."""

    total: int = 0
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    live_machines: int = 0
    cost_usd: float = 0.0
    num_turns: int = 0

    @property
    def done(self) -> int:
        """Jobs in a final state."""
        return self.succeeded + self.failed + self.timed_out + self.cancelled

    def add(self, other: Counts) -> Counts:
        """Sum two counts."""
        return Counts(
            **{f: getattr(self, f) + getattr(other, f) for f in Counts.model_fields},
        )

    @classmethod
    def total_of(cls, many: list[Counts]) -> Counts:
        """Sum many counts (one model built, not one per addition)."""
        total = dict.fromkeys(cls.model_fields, 0)
        for counts in many:
            for name in cls.model_fields:
                total[name] += getattr(counts, name)
        return cls(**total)

    @classmethod
    def of(cls, results: list[JobResult], live_machines: int = 0) -> Counts:
        """Count job results by state, with what they spent."""
        counts = cls(total=len(results), live_machines=live_machines)
        for result in results:
            counts.cost_usd += result.cost_usd or 0.0
            counts.num_turns += result.num_turns or 0
            match result.state:
                case JobState.PENDING:
                    counts.pending += 1
                case JobState.STARTING | JobState.RUNNING:
                    counts.running += 1
                case JobState.SUCCEEDED:
                    counts.succeeded += 1
                case JobState.FAILED:
                    counts.failed += 1
                case JobState.TIMED_OUT:
                    counts.timed_out += 1
                case JobState.CANCELLED:
                    counts.cancelled += 1
        return counts


class ChunkStatus(StrEnum):
    """Lifecycle of a chunk as the batch sees it."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"


class ChunkProgress(_Model):
    """One chunk as the batch's `progress` query and its result show it."""

    index: int
    workflow_id: str
    first_job: int
    size: int
    status: ChunkStatus = ChunkStatus.PENDING
    slots: int = 0
    counts: Counts = Counts()
    skipped_job_ids: list[str] = []


class ChunkState(ChunkProgress):
    """What the batch keeps of one chunk: its progress and the slots it lent it."""

    owed: int = 0
    """Slots asked back from the chunk (after the cap was lowered) and not given back yet."""
    wants_more: bool = True
    """The chunk's last report said it has more jobs waiting than free slots."""
    report_seq: int = 0
    """The newest report's number: an older report that arrives late changes no counts."""

    def progress(self) -> ChunkProgress:
        """The public part."""
        return ChunkProgress(**self.model_dump(include=set(ChunkProgress.model_fields)))


class BatchState(_Model):
    """The batch's state carried across continue-as-new."""

    max_machines: int
    max_cost_usd: float | None = None
    over_budget: bool = False
    prompt_jobs: bool = False
    paused: bool = False
    pause_reason: str | None = None
    told_paused: bool = False
    cancelled: bool = False
    cancel_reason: str | None = None
    told_cancelled: bool = False
    chunks: list[ChunkState] = []
    pending: list[ChunkPlan] = []


class BatchInput(_Model):
    """Start a batch: the validated batch file plus the batch id."""

    batch_id: str
    name: str
    app: str
    max_machines: int
    chunk_size: int
    max_cost_usd: float | None = None
    keep_sessions_s: float | None = None
    defaults: Defaults
    jobs: list[JobSpec] = []
    tuning: Tuning = Tuning()
    state: BatchState | None = None


class BatchOutput(_Model):
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


class Progress(_Model):
    """What the `progress` query answers."""

    batch_id: str
    status: str
    paused: bool
    pause_reason: str | None
    cancelled: bool
    max_machines: int
    max_cost_usd: float | None = None
    counts: Counts
    chunks: list[ChunkProgress]


class Followup(_Model):
    """A further turn of a finished prompt job: continue its session in its workspace."""

    turn: int = Field(ge=2)
    prompt: str = Field(min_length=1)
    session_id: str
    archive_ref: str | None = None
    commits: dict[str, str] = {}


class ChunkInput(_Model):
    """Start a chunk: its jobs (defaults applied) and the machine slots it may use.

    A chunk is a child of its batch and reports to it; a follow-up turn runs as a chunk of one
    job with no parent, and reports to nobody.
    """

    batch_id: str
    index: int
    app: str
    jobs: list[Job]
    slots: int
    paused: bool = False
    budgeted: bool = False
    tuning: Tuning = Tuning()
    followup: Followup | None = None


class JobResult(_Model):
    """The outcome of one job: small enough to keep a chunk's results in its history."""

    job_id: str
    index: int
    state: JobState = JobState.PENDING
    exit_code: int | None = None
    machine_id: str | None = None
    machine_state: str | None = None
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    error: str | None = None
    log_tail: list[str] = []
    log_ref: str | None = None
    turn: int = 1
    credential: str | None = None
    session_id: str | None = None
    result: str | None = None
    result_ref: str | None = None
    result_chars: int | None = None
    cost_usd: float | None = None
    num_turns: int | None = None
    duration_ms: int | None = None
    is_error: bool | None = None
    error_kind: str | None = None
    archive_ref: str | None = None
    commits: dict[str, str] = {}
    followups: list[JobResult] = []

    def compact(self) -> JobResult:
        """The row a chunk returns: what the blob store keeps (log tail, answer) left out.

        A chunk's result lands in its batch's history too, so it carries references, not text.
        """
        update: dict[str, object] = {"followups": []}
        if self.log_ref:
            update["log_tail"] = []
        if self.result_ref:
            update["result"] = None
        return self.model_copy(update=update)


class ChunkOutput(_Model):
    """A finished chunk: every job's result in input order."""

    index: int
    counts: Counts
    results: list[JobResult]


class ChunkReport(_Model):
    """A chunk tells the batch what it has released and how far it is.

    Signals between workflows may arrive out of order: `seq` lets the batch keep only the newest
    counts, while `released` (a delta) counts whatever order it arrives in.
    """

    index: int
    seq: int = 0
    released: int = 0
    wants_more: bool = True
    counts: Counts
    done: bool = False


class SlotGrant(_Model):
    """The batch gives a chunk more machine slots, or asks for some back as jobs finish."""

    grant: int = Field(default=0, ge=0)
    give_back: int = Field(default=0, ge=0)


class PauseRequest(_Model):
    """Why a batch pauses."""

    reason: str = Field(default="paused by operator", max_length=200)


class CancelRequest(_Model):
    """Why a batch is cancelled."""

    reason: str = Field(default="cancelled by operator", max_length=200)


class MaxCostRequest(_Model):
    """A new budget for a running batch, in US dollars."""

    max_cost_usd: float = Field(gt=0)


class MaxMachinesRequest(_Model):
    """A new concurrency cap for a running batch."""

    max_machines: int = Field(ge=1, le=2000)


# ---------------------------------------------------------------- activities


class CheckSecretsInput(_Model):
    """Secret names a batch needs on the worker, and whether it needs a Claude credential."""

    names: list[str]
    needs_claude: bool = False


class CheckSecretsOutput(_Model):
    """The names the worker can resolve."""

    available: list[str]


class MachineRef(_Model):
    """Where a job's machine is: never its config, which holds secrets."""

    app: str
    machine_id: str
    name: str
    version: str | None = None
    region: str | None = None


class CreateMachineInput(_Model):
    """Create the machine for one attempt of one job."""

    batch_id: str
    chunk_index: int
    app: str
    job: Job
    attempt: int
    owner: str
    followup: Followup | None = None


class CreateMachineOutput(_Model):
    """The created (or found again) machine, and which Claude credential (by name) it got."""

    machine: MachineRef
    found_existing: bool = False
    credential: str | None = None


class WaitOutcome(StrEnum):
    """How a wait on a machine ended."""

    EXITED = "exited"
    TIMED_OUT = "timed_out"
    BOOT_TIMEOUT = "boot_timeout"
    FAILED = "failed"
    GONE = "gone"


class WaitMachineInput(_Model):
    """Wait for a machine to finish, until the job's deadline."""

    machine: MachineRef
    job_id: str
    deadline: datetime
    boot_deadline: datetime
    heartbeat_every_s: float = 5.0


class WaitMachineOutput(_Model):
    """The state a machine settled in."""

    outcome: WaitOutcome
    state: str | None = None


class CollectResultInput(_Model):
    """Read a finished machine's exit details, log tail and, for prompt jobs, the answer."""

    machine: MachineRef
    job_id: str
    secrets: list[str] = []
    tail_lines: int = 20
    tail_bytes: int = 2048
    batch_id: str = ""
    prompt_job: bool = False
    turn: int = 1
    attempt: int = 1
    credential: str | None = None
    log_grace_s: float = 30.0
    log_tail: LogTail = LogTail.ALWAYS


class JobAnswer(_Model):
    """What a Claude Code job answered; the full answer and the session stay off history."""

    session_id: str | None = None
    result: str | None = None
    result_ref: str | None = None
    result_chars: int = 0
    cost_usd: float = 0.0
    num_turns: int = 0
    duration_ms: int | None = None
    is_error: bool = False
    error_kind: str | None = None
    archive_ref: str | None = None
    commits: dict[str, str] = {}


class CollectResultOutput(_Model):
    """A machine's exit details."""

    state: str | None
    exit_code: int | None
    signal: int | None = None
    oom_killed: bool = False
    exited_at: datetime | None = None
    log_tail: list[str] = []
    log_ref: str | None = None
    answer: JobAnswer | None = None


MAY_START_MEMO = "may_start"
"""The chunk's memo: whether a finishing job may hand its slot to the next job now."""


class FinishJobInput(_Model):
    """Wait for a job's machine, collect its result and destroy it, in one activity.

    With `next`, the activity hands the slot straight to the chunk's next job: once this job
    ended for good and its machine is gone, it reads the chunk's MAY_START_MEMO (closed while
    paused, cancelled or owing slots to a lowered cap) and creates that job's machine.
    """

    wait: WaitMachineInput
    collect: CollectResultInput
    next: CreateMachineInput | None = None


class FinishJobOutput(_Model):
    """How the machine ended, what it left, whether it is destroyed yet, and the next machine."""

    waited: WaitMachineOutput
    collected: CollectResultOutput | None = None
    destroyed: bool = False
    next: CreateMachineOutput | None = None


CREDENTIAL_FAULTS = {"rate_limit", "auth"}
"""Claude errors that blame the credential, not the job: the job runs again on another."""


class DestroyNamedMachineInput(_Model):
    """Destroy the machine of a job attempt, known by name only: its create's answer was lost."""

    app: str
    batch_id: str
    job_id: str
    attempt: int
    turn: int = 1


class DestroyMachineInput(_Model):
    """Destroy a machine; already gone counts as done."""

    machine: MachineRef


class DestroyMachineOutput(_Model):
    """Whether this call destroyed the machine or found it gone."""

    destroyed: bool
    already_gone: bool


class ReleaseSessionsInput(_Model):
    """A batch closed: delete its session archives, or keep them `keep_s` longer."""

    batch_id: str
    keep_s: float | None = None


class ReleaseSessionsOutput(_Model):
    """Whether archives were deleted, or until when they are kept."""

    deleted: bool
    kept_until: datetime | None = None


# ---------------------------------------------------------------- the orphan reaper


class ReapInput(_Model):
    """Find, and unless dry_run destroy, Sortie machines no running workflow owns."""

    app: str
    dry_run: bool = False


class Orphan(_Model):
    """A machine with Sortie's metadata whose batch or chunk is closed or unknown."""

    machine_id: str
    name: str | None
    state: str | None
    batch_id: str | None
    job_id: str | None
    chunk: int | None = None
    reason: str


class ReapOutput(_Model):
    """What the reaper found and did."""

    app: str
    checked: int
    orphans: list[Orphan]
    destroyed: int
    cancelled_chunks: list[str] = []
    expired_sessions: list[str] = []
    dry_run: bool = False
