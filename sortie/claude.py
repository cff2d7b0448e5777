"""What a Claude Code job hands back: the agent's report, parsed and classified on the worker.

The machine's entrypoint (`agent/`) uploads its report to the object store; the worker reads
it there and turns the Claude CLI's JSON result into a `JobAnswer`:
the answer (and its structured object), the session to continue, what it cost, and why it
failed, by one table from what the CLI reports to an error kind (ERRORS).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from sortie.fields import branch_name
from sortie.models import CREDENTIALS_RESTING as RESTING_KIND
from sortie.models import Changes, Iteration, Pushed
from sortie.spec import Job, Network

PREVIEW_CHARS = 2000
"""How much of an answer history keeps; the whole answer goes to the object store."""


class ErrorKind(StrEnum):
    """Why a Claude run failed, as far as its report tells (ERRORS has the rule)."""

    RATE_LIMIT = "rate_limit"
    OVERLOADED = "overloaded"
    AUTH = "auth"
    INVALID_REQUEST = "invalid_request"
    MAX_TURNS = "max_turns"
    BUDGET = "budget"
    STALLED = "stalled"
    INVALID_OUTPUT = "invalid_output"
    NO_REPORT = "no_report"
    VERIFY_FAILED = "verify_failed"
    """Claude finished, but the job's `verify` check still failed after its last iteration."""
    PUSH_FAILED = "push_failed"
    """Claude finished (and the check passed), but the branch could not be pushed."""
    SANDBOX_UNAVAILABLE = "sandbox_unavailable"
    """The machine could not start Claude Code's sandbox: the agent never ran (a machine
    failure: the job runs again on a new machine)."""
    CREDENTIALS_RESTING = RESTING_KIND
    """Not Claude's answer: every credential was resting, so no machine was created."""
    OTHER = "other"

    @property
    def credential_fault(self) -> bool:
        """Whether the credential, not the job, is to blame: retry with another one."""
        return self in (ErrorKind.RATE_LIMIT, ErrorKind.AUTH)


@dataclass(frozen=True)
class ErrorRule:
    """One row of the error table: a kind, and what of the CLI's result object says it."""

    kind: ErrorKind
    subtypes: tuple[str, ...] = ()
    """The result's `subtype` (the CLI's own stops)."""
    statuses: tuple[int, ...] = ()
    """The result's `api_error_status`: the HTTP status of the API call that failed for good."""
    markers: tuple[str, ...] = ()
    """Lower-case text of the result, for CLIs or failures that give no status."""


ERRORS = (
    ErrorRule(ErrorKind.MAX_TURNS, subtypes=("error_max_turns",)),
    ErrorRule(ErrorKind.BUDGET, subtypes=("error_max_budget_usd",)),
    ErrorRule(
        ErrorKind.RATE_LIMIT,
        statuses=(429,),
        markers=(
            "rate_limit",
            "rate limit",
            "request rejected (429)",
            "api error: 429",
            "usage limit reached",
            "you've hit your",
        ),
    ),
    ErrorRule(
        ErrorKind.OVERLOADED,
        statuses=(529, 503),
        markers=("overloaded", "api error: 529", "api error: 503"),
    ),
    ErrorRule(
        ErrorKind.AUTH,
        statuses=(401, 403),
        markers=(
            "invalid api key",
            "/login",
            "authentication_error",
            "oauth token",
            "credit balance is too low",
            "api error: 401",
            "api error: 403",
        ),
    ),
    ErrorRule(
        ErrorKind.INVALID_REQUEST,
        statuses=(400,),
        markers=("invalid_request_error", "api error: 400"),
    ),
    ErrorRule(ErrorKind.BUDGET, markers=("budget",)),
)
"""From what the CLI reports to an error kind, first match wins: its stop (subtype), then the
HTTP status of the failed API call, then its words. From CLI 2.1.110 an API error ends with
`is_error: true` and `subtype: "success"`, so the subtype alone never says an API call failed."""


def classify(subtype: str | None, status: int | None, text: str) -> ErrorKind:
    """The error kind of a failed run, by ERRORS."""
    lowered = text.lower()
    for rule in ERRORS:
        if subtype in rule.subtypes or status in rule.statuses:
            return rule.kind
    for rule in ERRORS:
        if any(marker in lowered for marker in rule.markers):
            return rule.kind
    return ErrorKind.OTHER


CLI_ENV = {
    "CLAUDE_CODE_MAX_RETRIES": "3",
    "API_TIMEOUT_MS": "600000",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
}
"""What a prompt job's machine gets by default for the CLI's own retries and traffic (a job's or
the batch's `env` overrides each): 3 retries ride out a short burst of 429 or 529, yet a refused
credential comes back within seconds rather than after the CLI's default ~10 retries (about
3 minutes), so the pool can rest it and the next attempt take another. A request that hangs is
the stall watchdog's (`stall_timeout`); API_TIMEOUT_MS stays the CLI's own 10 minutes so a long
streamed answer is never cut."""


class CliResult(BaseModel):
    """The Claude CLI's `--output-format json` result message (unknown fields tolerated)."""

    model_config = ConfigDict(extra="ignore")

    type: str | None = None
    subtype: str | None = None
    is_error: bool = False
    duration_ms: int | None = None
    num_turns: int | None = None
    result: str | None = None
    session_id: str | None = None
    total_cost_usd: float | None = None
    api_error_status: int | None = None
    structured_output: Any = None


class RepoCheckout(BaseModel):
    """A repository as the machine cloned it."""

    model_config = ConfigDict(extra="ignore")

    url: str
    path: str | None = None
    commit: str | None = None


class IterationReport(Iteration):
    """An iteration as the agent reported it (fields it may add later ignored)."""

    model_config = ConfigDict(extra="ignore")


class RepoChanges(BaseModel):
    """A repository's change as the agent counted it."""

    model_config = ConfigDict(extra="ignore")

    path: str | None = None
    files: int = 0
    insertions: int = 0
    deletions: int = 0


class RepoPush(BaseModel):
    """What the agent pushed from one repository, or why not."""

    model_config = ConfigDict(extra="ignore")

    path: str
    branch: str | None = None
    commit: str | None = None
    error: str | None = None


def _a_time_or_none(value: object, handler: ValidatorFunctionWrapHandler) -> datetime | None:
    """A time the report names (epoch seconds or ISO 8601, in UTC), or None for anything else."""
    try:
        moment = handler(value)
    except ValidationError:
        return None
    if not isinstance(moment, datetime):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class AgentReport(BaseModel):
    """The entrypoint's report, as it uploaded it."""

    model_config = ConfigDict(extra="ignore")

    exit_code: int | None = None
    claude: CliResult | None = None
    error: str | None = None
    repos: list[RepoCheckout] = Field(default_factory=list)
    session_archive: bool = False
    iterations: list[IterationReport] = Field(default_factory=list)
    verify_failed: bool = False
    changes: list[RepoChanges] = Field(default_factory=list)
    changes_uploaded: bool = False
    push: list[RepoPush] = Field(default_factory=list)

    resets_at: Annotated[datetime | None, WrapValidator(_a_time_or_none)] = None
    """When the refused credential's usage limit resets, as the agent read it from the CLI:
    a time or nothing (anything else is dropped, never kept as text)."""
    stalled: bool = False
    """The stall watchdog stopped the CLI: no event for the job's `stall_timeout`."""
    session_id: str | None = None
    """A stalled run's session (from the CLI's first event): it has no result to name it."""
    sandbox_unavailable: bool = False
    """The sandbox could not start on the machine: the agent never ran."""

    @classmethod
    def parse(cls, payload: bytes) -> AgentReport:
        """The report from a frame's payload; a garbled one becomes an error report."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError as error:
            return cls(error=f"unreadable agent report ({error.error_count()} problems)")

    def error_kind(self) -> ErrorKind | None:
        """None when Claude answered; else why it did not."""
        if self.stalled:
            return ErrorKind.STALLED
        if self.sandbox_unavailable:
            return ErrorKind.SANDBOX_UNAVAILABLE
        cli = self.claude
        if cli is None:
            return ErrorKind.NO_REPORT
        if not cli.is_error and self.verify_failed:
            return ErrorKind.VERIFY_FAILED
        if not cli.is_error and any(push.error for push in self.push):
            return ErrorKind.PUSH_FAILED
        if not cli.is_error and self.exit_code in (0, None):
            return None
        return classify(cli.subtype, cli.api_error_status, cli.result or "")

    def structured_problem(self, schema: dict[str, Any]) -> str | None:
        """Why the answer is not an object matching the job's `json_schema`, or None."""
        value = self.claude.structured_output if self.claude else None
        if value is None:
            return "Claude gave no structured output for the job's json_schema"
        error = best_match(Draft202012Validator(schema).iter_errors(value))
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "the answer"
            return f"the structured output does not match json_schema at {where}: {error.message}"
        return None

    def cost(self) -> tuple[float, int]:
        """What every Claude turn of the job cost, and its turns: the verify loop's all of them."""
        if self.iterations:
            cost = sum(i.cost_usd for i in self.iterations)
            return round(cost, 6), sum(i.num_turns for i in self.iterations)
        cli = self.claude
        return ((cli.total_cost_usd or 0.0), (cli.num_turns or 0)) if cli else (0.0, 0)

    def total_changes(self, ref: str | None) -> Changes | None:
        """The changes of every repository together, kept at `ref`; None without repositories."""
        if not self.changes:
            return None
        return Changes(
            ref=ref,
            files=sum(c.files for c in self.changes),
            insertions=sum(c.insertions for c in self.changes),
            deletions=sum(c.deletions for c in self.changes),
        )

    def pushed(self) -> Pushed | None:
        """The branch pushed and its commit per repository, when one was."""
        done = [p for p in self.push if p.branch and p.commit]
        if not done:
            return None
        return Pushed(branch=done[0].branch or "", commits={p.path: p.commit or "" for p in done})


def job_document(
    job: Job,
    *,
    batch_id: str = "",
    prompt: str | None = None,
    resume_session_id: str | None = None,
    restore_file: str | None = None,
    commits: dict[str, str] | None = None,
) -> dict[str, object]:
    """The `SORTIE_JOB` document the machine's entrypoint reads (no secret in it)."""
    return {
        "id": job.id,
        "prompt": prompt or job.prompt,
        "repos": [
            {
                "url": repo.url,
                "branch": repo.branch,
                "path": repo.path,
                "commit": (commits or {}).get(repo.url) or repo.ref,
            }
            for repo in job.repos
        ],
        "model": job.model,
        "max_turns": job.max_turns,
        "allowed_tools": job.allowed_tools,
        "max_cost_usd": job.max_cost_usd,
        "resume_session_id": resume_session_id,
        "restore_file": restore_file,
        "verify": job.verify,
        "max_iterations": job.max_iterations,
        "push_branch": branch_name(job.push_branch, batch_id, job.id) if job.push_branch else None,
        "json_schema": None if resume_session_id else job.json_schema,
        "stall_timeout_s": job.stall_timeout_s or None,
        "network": job.network.allow if isinstance(job.network, Network) else None,
        "secrets": job.secrets,
    }
