"""A codebase review as a Sortie batch: one prompt job per part, findings merged at the end.

The batch is an ordinary batch: every guarantee holds (a crash re-runs no finished part), and
the same checkout, commit and options make the same batch id, so running `analyze` again
attaches to the batch instead of starting over. The memo carries what aggregation needs
besides the jobs' answers (repository, commit, file counts), so a report can be written by any
process that reaches Temporal and the object store, while the batch runs or after it closed.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel
from temporalio.client import Client

from client import batches
from client.analysis.files import AnalysisError, Checkout, changed_files
from client.analysis.findings import (
    FINDINGS_SCHEMA,
    AnalysisSummary,
    Finding,
    ParsedAnswer,
    analysis_prompt,
    findings_document,
    merge,
    parse_answer,
    parse_structured,
    render_report,
    severity_counts,
)
from client.analysis.partition import Part
from sortie.claude import ErrorKind
from sortie.models import JobResult, JobState
from sortie.settings import Settings
from sortie.spec import BatchSpec, parse_batch

MEMO_KEY = "analysis"
KEEP_SESSIONS = "7d"
"""Analysis sessions stay available for follow-up questions this long after the batch closes."""


class CarriedPart(BaseModel):
    """A part whose files did not change: its answer is read from the batch that reviewed it."""

    batch_id: str
    job_id: str


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
    """Job id → the display name of the part it reviews (`src/api (2/3)`), carried ones too."""
    scope: str = ""
    digests: dict[str, str] = {}
    """Job id → a digest of the part's file list: a later `--since` finds unchanged parts."""
    since: str | None = None
    """The analysis this one is incremental on (`analyze --since`)."""
    carried: dict[str, CarriedPart] = {}
    """Job id → where the answer of a part carried over unchanged is (never re-reviewed here)."""


def part_digest(part: Part) -> str:
    """A short digest of the part's files: the same files make the same part."""
    return hashlib.sha256("\0".join(sorted(part.files)).encode()).hexdigest()[:16]


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
    only: set[int] | None = None,
) -> BatchSpec:
    """The batch: a prompt job per part (only those of `only`, by index, when given), each
    cloning the repository at the checkout's commit."""
    if not parts:
        raise AnalysisError(f"nothing to analyse in {checkout.root}: no source file at HEAD")
    name = re.sub(r"[^a-z0-9-]+", "-", Path(checkout.root).name.lower()).strip("-")[:24]
    defaults: dict[str, object] = {
        "timeout": timeout,
        "retries": 1,
        "repos": [{"url": repo_url, "ref": checkout.commit}],
        "allowed_tools": ["Read", "Grep", "Glob"],
        "json_schema": FINDINGS_SCHEMA,
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
                if only is None or i in only
            ],
        },
        source="analysis",
    )


def analysis_memo(
    checkout: Checkout,
    parts: list[Part],
    repo_url: str,
    strategy: str,
    focus: str,
    increment: Increment | None = None,
) -> dict[str, object]:
    """The batch memo that lets any process aggregate the analysis later."""
    memo = AnalysisMemo(
        repo=repo_url,
        commit=checkout.commit,
        root=checkout.root,
        scope=checkout.scope,
        files=len(checkout.files),
        strategy=strategy,
        focus=focus,
        dirty=checkout.dirty,
        parts={job_id(i, part): part.name for i, part in enumerate(parts)},
        digests={job_id(i, part): part_digest(part) for i, part in enumerate(parts)},
        since=increment.since if increment else None,
        carried=increment.carried if increment else {},
    )
    return {MEMO_KEY: memo.model_dump(mode="json")}


async def read_memo(client: Client, batch_id: str) -> AnalysisMemo:
    """The analysis memo of a batch; AnalysisError when it is no analysis batch."""
    description = await client.get_workflow_handle(batch_id).describe()
    memo_value = (await description.memo()).get(MEMO_KEY)
    if memo_value is None:
        raise AnalysisError(f"{batch_id} is not an analysis batch (its memo has no {MEMO_KEY!r})")
    return AnalysisMemo.model_validate(memo_value)


class Increment(BaseModel):
    """What `analyze --since` reviews again, and what it carries over from earlier analyses."""

    since: str
    since_commit: str
    changed: int
    """Files added, changed or deleted since the commit `since` analysed."""
    review: list[int]
    """Indices of the parts to review: a file of theirs changed, or no earlier review fits."""
    carried: dict[str, CarriedPart]


async def plan_since(
    client: Client, since: str, checkout: Checkout, parts: list[Part], focus: str
) -> Increment:
    """Carry over each part with the same files as a part of `since`, none of them changed,
    that was reviewed with the same focus and succeeded; review the others again."""
    memo = await read_memo(client, since)
    if (memo.root, memo.scope) != (checkout.root, checkout.scope):
        where = f"{memo.root}/{memo.scope}".rstrip("/")
        raise AnalysisError(f"{since} analysed {where}, not {checkout.root}/{checkout.scope}")
    changed = changed_files(checkout, memo.commit)
    earlier = {r.job_id: r for r in (await batches.results(client, since)).results}
    by_digest = {digest: job for job, digest in memo.digests.items()}
    review: list[int] = []
    carried: dict[str, CarriedPart] = {}
    for i, part in enumerate(parts):
        old = by_digest.get(part_digest(part))
        source: CarriedPart | None = None
        if old is not None and memo.focus == focus and not changed.intersection(part.files):
            if old in memo.carried:
                source = memo.carried[old]
            elif old in earlier and earlier[old].state is JobState.SUCCEEDED:
                source = CarriedPart(batch_id=since, job_id=old)
        if source is None:
            review.append(i)
        else:
            carried[job_id(i, part)] = source
    return Increment(
        since=since,
        since_commit=memo.commit,
        changed=len(changed),
        review=review,
        carried=carried,
    )


class Aggregate(BaseModel):
    """The merged findings of an analysis batch, so far or final."""

    summary: AnalysisSummary
    findings: list[Finding]
    raw_answers: dict[str, str]


async def aggregate(client: Client, settings: Settings, batch_id: str) -> Aggregate:
    """Merge the findings of every finished part; parts still running are simply not in yet."""
    description = await client.get_workflow_handle(batch_id).describe()
    memo = await read_memo(client, batch_id)
    report = await batches.results(client, batch_id, store=settings.blob_store())
    parsed: list[ParsedAnswer] = []
    raw: dict[str, str] = {}
    unparsed: list[str] = []
    names = {r.job_id: memo.parts.get(r.job_id, r.job_id) for r in report.results}
    for job, result, carried_from in [
        *((r.job_id, r, None) for r in report.results),
        *await _carried_results(client, settings, memo),
    ]:
        off_schema = result.error_kind == ErrorKind.INVALID_OUTPUT
        if result.state is not JobState.SUCCEEDED and not off_schema:
            continue
        part = memo.parts.get(job, job)
        names[job] = part
        if off_schema:
            text = await batches.full_answer(settings, result)
            answer = ParsedAnswer(error="the answer did not fit the findings schema", raw=text)
        elif result.structured is not None:
            answer = parse_structured(result.structured, part)
        else:
            answer = parse_answer(await batches.full_answer(settings, result), part)
        if carried_from is not None:
            answer.findings = [
                f.model_copy(update={"carried_from": carried_from}) for f in answer.findings
            ]
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
        chunks=len(report.results) + len(memo.carried),
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
        since=memo.since,
        carried={job: source.batch_id for job, source in memo.carried.items()},
    )
    return Aggregate(summary=summary, findings=findings, raw_answers=raw)


async def _carried_results(
    client: Client, settings: Settings, memo: AnalysisMemo
) -> list[tuple[str, JobResult, str]]:
    """The carried parts' results, read from the batches that reviewed them: job id, result,
    that batch's id."""
    sources = sorted({source.batch_id for source in memo.carried.values()})
    by_batch = {
        batch: {r.job_id: r for r in (await batches.results(client, batch)).results}
        for batch in sources
    }
    found: list[tuple[str, JobResult, str]] = []
    for job, source in sorted(memo.carried.items()):
        result = by_batch[source.batch_id].get(source.job_id)
        if result is not None:
            found.append((job, result, source.batch_id))
    return found


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
