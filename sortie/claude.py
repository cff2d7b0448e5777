"""What a Claude Code job hands back: the agent's report, parsed and classified on the worker.

The machine's entrypoint (`agent/`) uploads its report to the object store; the worker reads
it there and turns the Claude CLI's JSON result into a `JobAnswer`:
the answer, the session to continue, what it cost, and whether it failed for a reason a retry
with another credential can help (rate limit, authentication).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sortie.models import CREDENTIALS_RESTING as RESTING_KIND
from sortie.models import Changes, Iteration, Pushed
from sortie.spec import Job, branch_name

PREVIEW_CHARS = 2000
"""How much of an answer history keeps; the whole answer goes to the object store."""


class ErrorKind(StrEnum):
    """Why a Claude run failed, as far as its report tells."""

    RATE_LIMIT = "rate_limit"
    AUTH = "auth"
    MAX_TURNS = "max_turns"
    BUDGET = "budget"
    NO_REPORT = "no_report"
    VERIFY_FAILED = "verify_failed"
    """Claude finished, but the job's `verify` check still failed after its last iteration."""
    PUSH_FAILED = "push_failed"
    """Claude finished (and the check passed), but the branch could not be pushed."""
    CREDENTIALS_RESTING = RESTING_KIND
    """Not Claude's answer: every credential was resting, so no machine was created."""
    OTHER = "other"

    @property
    def credential_fault(self) -> bool:
        """Whether the credential, not the job, is to blame: retry with another one."""
        return self in (ErrorKind.RATE_LIMIT, ErrorKind.AUTH)


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

    @classmethod
    def parse(cls, payload: bytes) -> AgentReport:
        """The report from a frame's payload; a garbled one becomes an error report."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError as error:
            return cls(error=f"unreadable agent report ({error.error_count()} problems)")

    def error_kind(self) -> ErrorKind | None:
        """None when Claude answered; else why it did not."""
        cli = self.claude
        if cli is None:
            return ErrorKind.NO_REPORT
        if not cli.is_error and self.verify_failed:
            return ErrorKind.VERIFY_FAILED
        if not cli.is_error and any(push.error for push in self.push):
            return ErrorKind.PUSH_FAILED
        if not cli.is_error and self.exit_code in (0, None):
            return None
        text = (cli.result or "").lower()
        if cli.subtype == "error_max_turns":
            return ErrorKind.MAX_TURNS
        if "rate_limit" in text or "429" in text or "rate limit" in text:
            return ErrorKind.RATE_LIMIT
        if any(
            marker in text
            for marker in ("invalid api key", "/login", "authentication", "oauth token", "401")
        ):
            return ErrorKind.AUTH
        if "budget" in text or cli.subtype == "error_max_budget_usd":
            return ErrorKind.BUDGET
        return ErrorKind.OTHER

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
    }
