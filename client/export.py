"""A batch's results written out as JSON, JSON lines, CSV or a markdown report, streaming.

Rows are written as `client.batches.iter_results` reads them, a few chunks at a time, so a batch
of 100,000 jobs is exported in the memory of a few chunks. The markdown report lists failures
first, grouped by cause, then one by one: it reads the rows three times (causes, failures, the
rest) rather than keep them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import TextIO

from client.batches import BatchReport
from sortie.failures import Summary, failed
from sortie.models import JobResult

Rows = Callable[[], AsyncIterator[tuple[str, JobResult]]]
"""Each call reads the rows afresh, in input order, each with the workflow it ran in."""
Link = Callable[[str], str]
"""A workflow id's Web UI page."""


class Format(StrEnum):
    """What `results --format` writes."""

    JSON = "json"
    JSONL = "jsonl"
    CSV = "csv"
    MD = "md"


CSV_COLUMNS = [
    "job_id",
    "index",
    "turn",
    "state",
    "exit_code",
    "attempts",
    "machine_id",
    "memory_mb",
    "started_at",
    "finished_at",
    "duration_s",
    "cost_usd",
    "num_turns",
    "session_id",
    "structured",
    "error_kind",
    "error",
    "artifacts",
    "artifacts_bytes",
    "workflow_id",
]


async def export(kind: Format, head: BatchReport, rows: Rows, out: TextIO, link: Link) -> int:
    """Write the batch in `kind` to `out`; return how many jobs were written."""
    match kind:
        case Format.JSON:
            return await _json(head, rows, out)
        case Format.JSONL:
            return await _jsonl(rows, out)
        case Format.CSV:
            return await _csv(rows, out)
        case Format.MD:
            return await _markdown(head, rows, out, link)


async def _json(head: BatchReport, rows: Rows, out: TextIO) -> int:
    """The `results --json` document, its rows written one by one."""
    top = json.dumps(head.model_dump(mode="json", exclude={"results"}), indent=2)
    out.write(top[:-2] + ',\n  "results": [')
    count = 0
    async for _, row in rows():
        out.write(("," if count else "") + "\n    " + row.model_dump_json())
        count += 1
    out.write("\n  ]\n}\n" if count else "]\n}\n")
    return count


async def _jsonl(rows: Rows, out: TextIO) -> int:
    """A JSON object per job, follow-up turns inside it."""
    count = 0
    async for _, row in rows():
        out.write(row.model_dump_json() + "\n")
        count += 1
    return count


async def _csv(rows: Rows, out: TextIO) -> int:
    """A line per job and turn (follow-ups are turns 2, 3, …)."""
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    count = 0
    async for workflow_id, row in rows():
        for turn in [row, *row.followups]:
            writer.writerow(
                {
                    **turn.model_dump(mode="json", include=set(CSV_COLUMNS)),
                    "structured": _json_cell(turn.structured),
                    "artifacts": turn.artifacts.count if turn.artifacts else "",
                    "artifacts_bytes": turn.artifacts.bytes if turn.artifacts else "",
                    "workflow_id": workflow_id,
                }
            )
        count += 1
    return count


def _json_cell(value: object) -> str:
    """A structured answer as one cell: its compact JSON, or nothing."""
    return "" if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _cell(text: object) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text if text is not None else "").split()).replace("|", "\\|")


def _changed(row: JobResult) -> str:
    """The job's change in files and lines, for a table cell."""
    return row.changes.describe() if row.changes is not None else ""


async def _markdown(head: BatchReport, rows: Rows, out: TextIO, link: Link) -> int:
    """Totals and cost, then the failures with their errors, then every other job; UI links."""
    failures = head.failed + head.cancelled
    out.write(f"# Batch {head.batch_id}\n\n")
    out.write(f"[{head.batch_id} in the Temporal Web UI]({link(head.batch_id)})\n\n")
    out.write(
        f"**{head.status}**: {head.total} jobs, {head.succeeded} succeeded, {head.failed} failed "
        f"({head.timed_out} timed out), {head.cancelled} cancelled, {head.running} running, "
        f"{head.pending} pending\n\n"
    )
    out.write(f"Cost: **${head.cost_usd:.4f}** over {head.num_turns} Claude turns\n\n")
    if head.cancel_reason:
        out.write(f"Cancelled: {_cell(head.cancel_reason)}\n\n")
    if head.latest_from:
        retries = ", ".join(f"[{r}]({link(r)})" for r in head.retries)
        out.write(f"Latest outcomes: {len(head.latest_from)} jobs from the retries {retries}\n\n")
    if failures:
        await _causes(rows, out)
    out.write(f"## Failures ({failures})\n\n")
    count = 0
    if failures:
        out.write(
            "| job | state | exit | tries | changes | error | ran in |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        async for workflow_id, row in rows():
            if not failed(row):
                continue
            latest = row.followups[-1] if row.followups else row
            exit_code = "" if latest.exit_code is None else latest.exit_code
            out.write(
                f"| {_cell(row.job_id)} | {latest.state.value} | {exit_code} | {latest.attempts} "
                f"| {_changed(latest)} | {_cell(latest.error)} "
                f"| [{workflow_id}]({link(workflow_id)}) |\n"
            )
            count += 1
        out.write("\n")
    else:
        out.write("None.\n\n")
    out.write(
        "## Other jobs\n\n| job | state | time | cost | changes | answer |\n"
        "|---|---|---|---|---|---|\n"
    )
    async for _, row in rows():
        if failed(row):
            continue
        latest = row.followups[-1] if row.followups else row
        took = "" if latest.duration_s is None else f"{latest.duration_s:.1f}s"
        cost = "" if latest.cost_usd is None else f"${latest.cost_usd:.4f}"
        answer = _cell(_json_cell(latest.structured) or latest.result)[:120]
        out.write(
            f"| {_cell(row.job_id)} | {latest.state.value} | {took} | {cost} "
            f"| {_changed(latest)} | {answer} |\n"
        )
        count += 1
    return count


async def _causes(rows: Rows, out: TextIO) -> None:
    """The failures grouped by error kind and first error line: count, jobs, one example."""
    causes = (await Summary.read(rows())).causes()
    out.write(f"## Causes of failure ({len(causes)})\n\n")
    out.write("| jobs | kind | first error line | which | example |\n|---|---|---|---|---|\n")
    for cause in causes:
        which = ", ".join(cause.jobs) + (" …" if cause.count > len(cause.jobs) else "")
        out.write(
            f"| {cause.count} | {cause.kind} | {_cell(cause.line)} | {_cell(which)} "
            f"| {_cell(cause.example)[:300]} |\n"
        )
    out.write("\n")
