"""A batch's failures by cause: grouped by error kind and first error line, so 40 failures of a
batch of 1,000 read as the three causes they are, not forty rows.

Rows are counted as they stream past (`results --format md`, `status`), so a batch of any size
is summarised in the memory of its causes, with a few job ids and one example each.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable

from pydantic import BaseModel

from sortie.models import JobResult, JobState

JOBS_SHOWN = 5
"""Job ids a cause lists; the count says how many there are."""
LINE_CHARS = 160
_ATTEMPT = re.compile(r"\s*\(attempt \d+ of \d+\)$")


class Cause(BaseModel):
    """One cause of failure: its kind and first error line, how many jobs, which, an example."""

    kind: str
    line: str
    count: int = 0
    jobs: list[str] = []
    example: str = ""

    def add(self, job_id: str, error: str) -> None:
        """Count one more job failing of this cause."""
        self.count += 1
        if len(self.jobs) < JOBS_SHOWN:
            self.jobs.append(job_id)
        if not self.example:
            self.example = error


def latest(row: JobResult) -> JobResult:
    """A job's last turn: the one its outcome is."""
    return row.followups[-1] if row.followups else row


def failed(row: JobResult) -> bool:
    """Whether the job ended without success (failed, timed out or cancelled)."""
    turn = latest(row)
    return turn.state.final and turn.state is not JobState.SUCCEEDED


def cause_of(row: JobResult) -> tuple[str, str]:
    """A failed job's cause: its error kind (else its state) and its error's first line, the
    attempt count left out so retried and first-time failures group together."""
    turn = latest(row)
    error = (turn.error or "").strip()
    first = error.splitlines()[0] if error else "(no error message)"
    first = _ATTEMPT.sub("", first)[:LINE_CHARS]
    return turn.error_kind or turn.state.value, first


class Summary:
    """Causes of failure, counted as rows go by, most frequent first."""

    def __init__(self) -> None:
        self._causes: dict[tuple[str, str], Cause] = {}

    def add(self, row: JobResult) -> None:
        """Count the row if it failed."""
        if not failed(row):
            return
        kind, line = cause_of(row)
        cause = self._causes.setdefault((kind, line), Cause(kind=kind, line=line))
        cause.add(row.job_id, (latest(row).error or "").strip())

    def causes(self) -> list[Cause]:
        """Every cause, the most jobs first."""
        return sorted(self._causes.values(), key=lambda c: (-c.count, c.kind, c.line))

    @classmethod
    def of(cls, rows: Iterable[JobResult]) -> Summary:
        """The summary of rows already in memory."""
        summary = cls()
        for row in rows:
            summary.add(row)
        return summary

    @classmethod
    async def read(cls, rows: AsyncIterator[tuple[str, JobResult]]) -> Summary:
        """The summary of rows as they stream."""
        summary = cls()
        async for _, row in rows:
            summary.add(row)
        return summary


def cause_lines(causes: list[Cause], most: int | None = None) -> list[str]:
    """Plain lines: `3 jobs, verify_failed: verify failed: … (jobs a, b, c)`."""
    shown = causes if most is None else causes[:most]
    lines = []
    for cause in shown:
        more = f", +{cause.count - len(cause.jobs)} more" if cause.count > len(cause.jobs) else ""
        jobs = f"{cause.count} job{'' if cause.count == 1 else 's'}"
        lines.append(f"{jobs}, {cause.kind}: {cause.line} ({', '.join(cause.jobs)}{more})")
    if most is not None and len(causes) > most:
        lines.append(f"… and {len(causes) - most} other causes (results ID --format md)")
    return lines
