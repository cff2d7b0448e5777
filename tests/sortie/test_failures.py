"""The failure summary: failed jobs grouped by error kind and first error line, in
`results --format md` and `status`."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

from client import batches, export
from sortie.failures import Summary, cause_lines
from sortie.models import JobResult, JobState


def failing(job_id: str, kind: str | None, error: str) -> JobResult:
    return JobResult(
        job_id=job_id, index=0, state=JobState.FAILED, error_kind=kind, error=error, attempts=1
    )


async def test_the_failure_summary_groups_failures_by_kind_and_first_line() -> None:
    rows = [
        failing("a", "verify_failed", "verify failed: `make test` exited 2 after 2 iterations\nE1"),
        failing("b", "verify_failed", "verify failed: `make test` exited 2 after 2 iterations\nE2"),
        failing("c", None, "exited with code 3 (attempt 1 of 1)"),
        failing("d", None, "exited with code 3 (attempt 3 of 3)"),
        failing("e", "max_turns", "Claude failed (max_turns): Reached the maximum"),
        failing("f", "verify_failed", "verify failed: `make test` exited 2 after 2 iterations"),
        JobResult(job_id="ok", index=1, state=JobState.SUCCEEDED),
    ]
    causes = Summary.of(rows).causes()
    assert [(c.kind, c.count, c.jobs) for c in causes] == [
        ("verify_failed", 3, ["a", "b", "f"]),
        ("failed", 2, ["c", "d"]),
        ("max_turns", 1, ["e"]),
    ]
    assert causes[0].example.endswith("\nE1"), "one example, whole"
    assert cause_lines(causes, 2)[-1] == "… and 1 other causes (results ID --format md)"

    head = batches.BatchReport(
        batch_id="b-1",
        name=None,
        status="completed",
        total=7,
        succeeded=1,
        failed=6,
        timed_out=0,
        cancelled=0,
        pending=0,
        running=0,
        live_machines=0,
        results=[],
    )

    async def stream() -> AsyncIterator[tuple[str, JobResult]]:
        for row in rows:
            yield "b-1-chunk-0001", row

    out = io.StringIO()
    await export.export(export.Format.MD, head, stream, out, lambda w: f"http://ui/{w}")
    text = out.getvalue()
    summary = text.split("## Causes of failure (3)\n\n")[1].split("## Failures (6)")[0]
    assert summary.index("| 3 | verify_failed |") < summary.index("| 2 | failed |")
    assert "| 1 | max_turns | Claude failed (max_turns): Reached the maximum | e |" in summary
    assert text.index("## Causes of failure") < text.index("## Failures")
