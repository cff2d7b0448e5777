"""Inputs and outputs of the machine activities: references and outcomes, never configs.

Nothing here may hold a secret value: the worker resolves secrets when it builds a config.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from sortie.artifacts import Artifacts
from sortie.models import Changes, Followup, Iteration, MachineRef, Pushed, StrictModel
from sortie.spec import Job, LogTail


class CheckBatchInput(StrictModel):
    """What a batch needs before any machine exists: its Fly apps, the secrets it names, and
    whether it needs a Claude credential."""

    apps: list[str]
    names: list[str]
    needs_claude: bool = False


class CheckBatchOutput(StrictModel):
    """The names the worker can resolve."""

    available: list[str]


class CreateMachineInput(StrictModel):
    """Create the machine for one attempt of one job."""

    batch_id: str
    chunk_index: int
    app: str
    job: Job
    attempt: int
    owner: str
    followup: Followup | None = None
    reuse: bool = False
    """The batch reuses machines: the machine outlives its job, owned by the batch."""


class ReuseMachineInput(CreateMachineInput):
    """Give a stopped machine that ended its last job cleanly this job's whole config, and
    start it: `machine` is where it is and the version its last job ran."""

    machine: MachineRef


class CreateMachineOutput(StrictModel):
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


class WaitMachineInput(StrictModel):
    """Wait for a machine to finish, until the job's deadline."""

    machine: MachineRef
    job_id: str
    deadline: datetime
    boot_deadline: datetime
    heartbeat_every_s: float = 5.0


class WaitMachineOutput(StrictModel):
    """The state a machine settled in."""

    outcome: WaitOutcome
    state: str | None = None


class CollectResultInput(StrictModel):
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
    log_tail: LogTail = LogTail.ALWAYS
    json_schema: dict[str, Any] | None = None
    """The prompt job's schema: an answer that does not match it fails the job."""
    spend_of: int | None = None
    """The job's index when its verify loop's spend is to reach the chunk as it happens (the
    batch has a budget): `finish_job` reads it from the store and signals the chunk."""
    artifacts: bool = False
    """The job names artifacts: read the index its machine uploaded."""


class JobAnswer(StrictModel):
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
    structured: Any = None
    archive_ref: str | None = None
    commits: dict[str, str] = {}
    iterations: list[Iteration] = []
    changes: Changes | None = None
    pushed: Pushed | None = None
    failure: str | None = None
    """The agent's own reason the job failed after Claude answered: verify, push (scrubbed)."""
    resets_at: datetime | None = None
    """When Claude said the refused credential's usage limit resets: it rests until then."""


class CollectResultOutput(StrictModel):
    """A machine's exit details."""

    state: str | None
    exit_code: int | None
    signal: int | None = None
    oom_killed: bool = False
    exited_at: datetime | None = None
    log_tail: list[str] = []
    log_ref: str | None = None
    answer: JobAnswer | None = None


class Spend(StrictModel):
    """What a running job attempt's verify loop has spent so far: the chunk counts it at once."""

    index: int
    attempt: int
    cost_usd: float = Field(ge=0)
    num_turns: int = 0


class FinishJobInput(StrictModel):
    """Wait for a job's machine, collect its result and destroy it, in one activity."""

    wait: WaitMachineInput
    collect: CollectResultInput
    keep: bool = False
    """The batch reuses machines: keep the machine (stopped) when its job ended cleanly."""


class FinishJobOutput(StrictModel):
    """How the machine ended, what it left, and whether it is destroyed, or kept for another
    job."""

    waited: WaitMachineOutput
    collected: CollectResultOutput | None = None
    destroyed: bool = False
    kept: bool = False
    artifacts: Artifacts | None = None
    """What the job's `artifacts` collected, whatever the outcome (a timed-out job's too)."""


CREDENTIALS_RESTING_ERROR = "CredentialsResting"
"""The create's failure type when every Claude credential rests: the job fails with the error
kind `credentials_resting` (sortie.claude.ErrorKind) and the machine is never created."""

CREDENTIAL_FAULTS = {"rate_limit", "auth"}
"""Claude errors that blame the credential, not the job: the job runs again on another."""
STALLED = "stalled"
"""The stall watchdog stopped the agent: the machine failed, not the job (it runs again)."""
SANDBOX_UNAVAILABLE = "sandbox_unavailable"
"""The machine could not start the agent's sandbox: the machine failed, not the job."""


class DestroyMachineInput(StrictModel):
    """Destroy a machine; already gone counts as done."""

    machine: MachineRef


class DestroyMachineOutput(StrictModel):
    """Whether this call destroyed the machine or found it gone."""

    destroyed: bool
    already_gone: bool


class ReleaseSessionsInput(StrictModel):
    """A batch closed: delete its session archives, or keep them `keep_s` longer."""

    batch_id: str
    keep_s: float | None = None


class ReleaseSessionsOutput(StrictModel):
    """Whether archives were deleted, or until when they are kept."""

    deleted: bool
    kept_until: datetime | None = None


class ReadLogsInput(StrictModel):
    """Read a job's machine logs after `next_token`, on the worker that can scrub them."""

    app: str
    machine_id: str
    secrets: list[str] = []
    """The job's secret names: their values are scrubbed from every line."""
    next_token: str = "0"
    max_lines: int = Field(default=500, ge=1, le=5000)


class ReadLogsOutput(StrictModel):
    """Log lines (frames left out, secrets scrubbed) and where the next read starts."""

    lines: list[str]
    next_token: str
