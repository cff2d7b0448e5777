"""What a job is and how it ended: the words every part of Sortie shares.

Everything here travels through Temporal and lands in workflow history, so nothing here may
hold a secret value: secrets travel by name and are resolved on the worker.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sortie.artifacts import Artifacts


class StrictModel(BaseModel):
    """A model that refuses unknown fields: a typo in a payload is an error, not a default."""

    model_config = ConfigDict(extra="forbid")


CREDENTIALS_RESTING = "credentials_resting"
"""The error kind of a job that found every Claude credential resting (sortie.claude.ErrorKind)."""


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


class Tuning(StrictModel):
    """Timeouts that shape how fast failures are noticed; tests shorten them."""

    heartbeat_timeout_s: float = 20.0
    heartbeat_every_s: float = 5.0
    create_timeout_s: float = 60.0
    call_timeout_s: float = 60.0
    log_tail_lines: int = 20
    log_tail_bytes: int = 2048
    run_events: int = Field(default=2_000, ge=100)
    """A batch run continues-as-new past this many events, well below Temporal's suggestion
    (4,096 events or 4 MB), so a worker that lost its cache replays a short history quickly."""


class Counts(StrictModel):
    """Job counts by state."""

    total: int = 0
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    live_machines: int = 0
    machines_created: int = 0
    """Machines created for these jobs: one per attempt, fewer when machines are reused."""
    cost_usd: float = 0.0
    num_turns: int = 0
    credentials_resting: int = 0
    """Jobs waiting (among `pending`) for a Claude credential's rest to end: no machine yet."""

    @property
    def done(self) -> int:
        """Jobs in a final state."""
        return self.succeeded + self.failed + self.timed_out + self.cancelled

    @classmethod
    def total_of(cls, many: list[Counts]) -> Counts:
        """Sum many counts (one model built, not one per addition): a batch does this for its
        Web UI details after every report, over every chunk."""
        return cls(**{name: sum(getattr(c, name) for c in many) for name in cls.model_fields})

    def cut_short(self) -> Counts:
        """The counts of a chunk that ended with no result (failed, terminated): every job
        not final counted as cancelled, no machine alive."""
        unfinished = self.pending + self.running
        cancelled = self.cancelled + unfinished
        return self.model_copy(
            update={"pending": 0, "running": 0, "cancelled": cancelled, "live_machines": 0}
        )

    @classmethod
    def of(
        cls, results: list[JobResult], live_machines: int = 0, machines_created: int = 0
    ) -> Counts:
        """Count job results by state, with what they spent."""
        counts = cls(
            total=len(results), live_machines=live_machines, machines_created=machines_created
        )
        for result in results:
            counts.cost_usd += result.cost_usd or 0.0
            counts.num_turns += result.num_turns or 0
            match result.state:
                case JobState.PENDING:
                    counts.pending += 1
                    if result.error_kind == CREDENTIALS_RESTING:
                        counts.credentials_resting += 1
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


class Iteration(StrictModel):
    """One turn of a prompt job's verify loop: Claude's run, then the check's."""

    claude_exit: int | None = None
    verify_exit: int | None = None
    """None when Claude failed and the check did not run."""
    seconds: float = 0.0
    cost_usd: float = 0.0
    num_turns: int = 0


class Changes(StrictModel):
    """What a prompt job changed in its repositories, all together; the patches are in the
    object store at `ref` (per repository, as `git apply` takes them)."""

    ref: str | None = None
    files: int = 0
    insertions: int = 0
    deletions: int = 0

    def describe(self) -> str:
        """`3 files +10 -2`, as the results table shows it."""
        files = f"{self.files} file{'' if self.files == 1 else 's'}"
        return f"{files} +{self.insertions} -{self.deletions}"


class Pushed(StrictModel):
    """The branch a prompt job's change was pushed to, and the commit per repository path."""

    branch: str
    commits: dict[str, str] = {}


class JobResult(StrictModel):
    """The outcome of one job: small enough to keep a chunk's results in its history."""

    job_id: str
    index: int
    state: JobState = JobState.PENDING
    exit_code: int | None = None
    app: str | None = None
    """The Fly app of the job's (last) machine."""
    machine_id: str | None = None
    machine_reused: bool = False
    """The job's (last) machine had served an earlier job of the batch (`reuse_machines`)."""
    machine_state: str | None = None
    memory_mb: int | None = None
    """The memory of the job's (last) machine: more than it asked after an OOM kill."""
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
    structured: Any = None
    """The object Claude answered a job's `json_schema` with, when its JSON fits the answer's
    preview; the stored answer (`result_ref`) is that JSON whole either way."""
    archive_ref: str | None = None
    commits: dict[str, str] = {}
    iterations: list[Iteration] = []
    changes: Changes | None = None
    pushed: Pushed | None = None
    artifacts: Artifacts | None = None
    """The files the job's `artifacts` globs named, kept in the object store (`starter.py
    artifacts`), collected whatever its outcome."""
    followups: list[JobResult] = []

    def compact(self) -> JobResult:
        """The row a chunk returns: what the object store keeps (log tail, answer) left out.

        A chunk's result lands in its batch's history too, so it carries references, not text.
        """
        update: dict[str, object] = {"followups": []}
        if self.log_ref:
            update["log_tail"] = []
        if self.result_ref:
            update["result"] = None
        return self.model_copy(update=update)


class MachineRef(StrictModel):
    """Where a job's machine is: never its config, which holds secrets."""

    app: str
    machine_id: str
    name: str
    version: str | None = None
    region: str | None = None


class Followup(StrictModel):
    """A further turn of a finished prompt job: continue its session in its workspace."""

    turn: int = Field(ge=2)
    prompt: str = Field(min_length=1)
    session_id: str
    archive_ref: str | None = None
    commits: dict[str, str] = {}
