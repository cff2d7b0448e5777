"""A codebase review as a Sortie batch: one prompt job per part, findings merged at the end.

The batch is an ordinary batch: every guarantee holds (a crash re-runs no finished part), and
the same checkout, commit and options make the same batch id, so running `analyze` again
attaches to the batch instead of starting over. The memo carries what aggregation needs
besides the jobs' answers (repository, commit, file counts), so a report can be written by any
process that reaches Temporal and the object store, while the batch runs or after it closed.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel
from temporalio.client import Client

from sortie import batches
from sortie.analysis.files import AnalysisError, Checkout
from sortie.analysis.findings import (
    AnalysisSummary,
    Finding,
    ParsedAnswer,
    analysis_prompt,
    findings_document,
    merge,
    parse_answer,
    render_report,
    severity_counts,
)
from sortie.analysis.partition import Part
from sortie.models import JobResult, JobState
from sortie.settings import Settings
from sortie.spec import BatchSpec, parse_batch

MEMO_KEY = "analysis"
KEEP_SESSIONS = "7d"
"""Analysis sessions stay available for follow-up questions this long after the batch closes."""


class AnalysisMemo(BaseModel):
    """What the batch's memo says about the analysis; no file list (it could be large)."""

    repo: str
    commit: str
    root: str
    files: int
    strategy: str
    focus: str
    dirty: bool = False
    parts: dict[str, str] = {}
    """Job id → the display name of the part it reviews (`src/api (2/3)`)."""


def job_id(index: int, part: Part) -> str:
    """A job id naming its part: `003-src-api-2-3` for part 3, `src/api (2/3)`."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", part.name).strip("-.") or "part"
    return f"{index:03d}-{slug}"[:100].rstrip("-.")


def analysis_spec(
    checkout: Checkout,
    parts: list[Part],
    *,
    repo_url: str,
    focus: str,
    workers: int,
    app: str,
    model: str | None = None,
    max_cost_usd: float | None = None,
    timeout: str = "30m",
    secrets: list[str] | None = None,
) -> BatchSpec:
    """The batch: a prompt job per part, each cloning the repository at the checkout's commit."""
    if not parts:
        raise AnalysisError(f"nothing to analyse in {checkout.root}: no source file at HEAD")
    name = re.sub(r"[^a-z0-9-]+", "-", Path(checkout.root).name.lower()).strip("-")[:24]
    defaults: dict[str, object] = {
        "timeout": timeout,
        "retries": 1,
        "repos": [{"url": repo_url, "ref": checkout.commit}],
        "allowed_tools": ["Read", "Grep", "Glob"],
    }
    if model:
        defaults["model"] = model
    if secrets:
        defaults["secrets"] = secrets  # e.g. GITHUB_TOKEN for a private repository
    return parse_batch(
        {
            "name": f"analyze-{name or 'repo'}",
            "app": app,
            "max_machines": workers,
            "chunk_size": 25,
            "keep_sessions": KEEP_SESSIONS,
            **({"max_cost_usd": max_cost_usd} if max_cost_usd else {}),
            "defaults": defaults,
            "jobs": [
                {"id": job_id(i, part), "prompt": analysis_prompt(part, focus)}
                for i, part in enumerate(parts)
            ],
        },
        source="analysis",
    )


def analysis_memo(
    checkout: Checkout, parts: list[Part], repo_url: str, strategy: str, focus: str
) -> dict[str, object]:
    """The batch memo that lets any process aggregate the analysis later."""
    memo = AnalysisMemo(
        repo=repo_url,
        commit=checkout.commit,
        root=checkout.root,
        files=len(checkout.files),
        strategy=strategy,
        focus=focus,
        dirty=checkout.dirty,
        parts={job_id(i, part): part.name for i, part in enumerate(parts)},
    )
    return {MEMO_KEY: memo.model_dump(mode="json")}


class Aggregate(BaseModel):
    """The merged findings of an analysis batch, so far or final."""

    summary: AnalysisSummary
    findings: list[Finding]
    raw_answers: dict[str, str]


async def aggregate(client: Client, settings: Settings, batch_id: str) -> Aggregate:
    """Merge the findings of every finished part; parts still running are simply not in yet."""
    handle = client.get_workflow_handle(batch_id)
    description = await handle.describe()
    memo_value = (await description.memo()).get(MEMO_KEY)
    if memo_value is None:
        raise AnalysisError(f"{batch_id} is not an analysis batch (its memo has no {MEMO_KEY!r})")
    memo = AnalysisMemo.model_validate(memo_value)
    report = await batches.results(client, batch_id, store=settings.blob_store())
    parsed: list[ParsedAnswer] = []
    raw: dict[str, str] = {}
    unparsed: list[str] = []
    names = {r.job_id: memo.parts.get(r.job_id, r.job_id) for r in report.results}
    for result in report.results:
        if result.state is not JobState.SUCCEEDED:
            continue
        part = names[result.job_id]
        answer = parse_answer(await batches.full_answer(settings, result), part)
        parsed.append(answer)
        if answer.error is not None:
            unparsed.append(part)
            raw[part] = answer.raw or ""
    findings = merge(parsed)
    started = description.start_time or datetime.now(UTC)
    ended = description.close_time or datetime.now(UTC)
    summary = AnalysisSummary(
        repo=memo.repo,
        commit=memo.commit,
        files=memo.files,
        chunks=len(report.results),
        unparsed_chunks=unparsed,
        findings_by_severity=severity_counts(findings),
        wall_s=(ended - started).total_seconds(),
        sequential_s=sum(r.duration_s or 0.0 for r in report.results),
        cost_usd=report.cost_usd,
        sessions={r.job_id: r.session_id for r in report.results if r.session_id},
        chunk_names=names,
        batch_id=batch_id,
        status=report.status,
        dirty=memo.dirty,
    )
    return Aggregate(summary=summary, findings=findings, raw_answers=raw)


def write_report(aggregate: Aggregate, out: Path) -> list[Path]:
    """Write `report.md` and `findings.json` under `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    document = out / "findings.json"
    report.write_text(render_report(aggregate.summary, aggregate.findings, aggregate.raw_answers))
    document.write_text(findings_document(aggregate.summary, aggregate.findings))
    return [report, document]


def running_lines(results: list[JobResult], now: datetime) -> list[str]:
    """A line per part being reviewed right now, as the orchestrator scripts show them."""
    lines = []
    for result in results:
        if result.state in (JobState.STARTING, JobState.RUNNING):
            since = (now - result.started_at).total_seconds() if result.started_at else 0.0
            lines.append(f"  {result.state.value:9} {result.job_id}  {since:5.0f}s")
    return lines


def plan_document(parts: list[Part]) -> str:
    """The plan as JSON (names, files, bytes) for `--out`."""
    return json.dumps([part.model_dump() for part in parts], indent=2)
