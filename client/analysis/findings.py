"""What the analysis jobs report: the prompt, the lenient parsing of answers, the merged report.

The jobs ask Claude for their findings through a JSON Schema (FINDINGS_SCHEMA, the prompt job's
`json_schema`): the CLI hands back a validated object, and an answer that does not fit fails its
job, its text kept raw so the report can show it. Answers of analyses made before (carried over
by `--since`) are text, read leniently (fenced, wrapped in prose, wrapped in an object, severity
synonyms); the `Finding` model itself is strict either way.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from client.analysis.files import AnalysisError
from client.analysis.partition import Part

SEVERITIES = ("critical", "high", "medium", "low", "info")
Severity = Literal["critical", "high", "medium", "low", "info"]

SEVERITY_SYNONYMS: dict[str, str] = {
    "blocker": "critical",
    "fatal": "critical",
    "error": "high",
    "major": "high",
    "severe": "high",
    "warning": "medium",
    "warn": "medium",
    "moderate": "medium",
    "minor": "low",
    "note": "low",
    "trivial": "low",
}
"""Severity words models use instead of ours; any other unknown word becomes `info`."""

DEFAULT_FOCUS = "security, bugs, performance, code quality"
PROMPT_LIMIT = 100_000
"""Bytes a chunk's prompt may take: many prompts travel in one batch input."""
RAW_LIMIT = 4000
"""Characters of an unparsed answer the report shows."""
_TITLE_LIMIT = 300
_DETAIL_LIMIT = 4000
_MAX_DECODES = 1000
"""How many JSON decodes a scan of one answer may try before giving up."""

FINDINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "minLength": 1},
                    "line": {"type": ["integer", "null"], "minimum": 1},
                    "severity": {"enum": list(SEVERITIES)},
                    "category": {"type": "string", "minLength": 1},
                    "title": {"type": "string", "minLength": 1},
                    "detail": {"type": "string"},
                },
                "required": ["file", "severity", "category", "title"],
            },
        }
    },
    "required": ["findings"],
}
"""What an analysis job answers with: its findings, checked by the CLI (`--json-schema`)."""

FINDINGS_SCHEMA_DOC = """\
Answer with the findings object your output schema asks for: "findings" is a list of objects with
these keys:
  "file": the file's path relative to the repository root, as listed above
  "line": the line number (an integer >= 1), or null for a finding about the whole file
  "severity": one of "critical", "high", "medium", "low", "info"
  "category": one lower-case word, e.g. security, bugs, performance, quality, tests, docs
  "title": a one-line summary of the problem
  "detail": why it matters and how to fix it, in a few sentences
Example: [{"file": "src/db.py", "line": 42, "severity": "high", "category": "security",
"title": "SQL query built by string formatting", "detail": "User input reaches ..."}]
Give an empty "findings" list if you find nothing worth reporting."""
"""The answer format, as the prompt states it."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Finding(StrictModel):
    """One problem a job reported in one file."""

    file: str = Field(min_length=1)
    line: int | None = Field(default=None, ge=1)
    severity: Severity
    category: str = Field(min_length=1)
    title: str = Field(min_length=1)
    detail: str = ""
    chunk: str | None = None
    """The name of the part whose job reported it."""
    carried_from: str | None = None
    """The earlier analysis batch it comes from, its part unchanged since (`--since`)."""

    @field_validator("severity", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


class ParsedAnswer(StrictModel):
    """One job's answer, read: its findings, or why none could be read (with the raw answer)."""

    findings: list[Finding] = []
    skipped: int = 0
    """Items of the JSON that were not findings (no file or no title, not an object...)."""
    error: str | None = None
    raw: str | None = None


class AnalysisSummary(StrictModel):
    """The figures of one analysis run, for the report and `findings.json`."""

    repo: str
    commit: str
    files: int
    chunks: int
    unparsed_chunks: list[str] = []
    """Names of the parts whose answer had no usable findings JSON."""
    findings_by_severity: dict[str, int] = {}
    wall_s: float
    sequential_s: float
    """The sum of the jobs' own times: what running them one after another would take."""
    cost_usd: float
    sessions: dict[str, str] = {}
    """Job id → Claude session id, for follow-up questions."""
    chunk_names: dict[str, str] = {}
    """Job id → the name of the part the job reviewed."""
    batch_id: str
    status: str
    dirty: bool = False
    """Whether the local work tree had uncommitted changes the machines did not see."""
    since: str | None = None
    """The analysis this one is incremental on: its unchanged parts were not reviewed again."""
    carried: dict[str, str] = {}
    """Job id → the batch whose review of the unchanged part was carried over."""


def _path_line(path: str) -> str:
    """A file path as one line of the prompt's list, quoted when it holds odd characters."""
    if path.isprintable() and path == path.strip():
        return f"- {path}"
    return f"- {json.dumps(path)}"


def analysis_prompt(part: Part, focus: str) -> str:
    """The prompt of the job reviewing one part: only its files, answering with findings JSON."""
    files = "\n".join(_path_line(path) for path in part.files)
    prompt = (
        f'You are reviewing one part ("{part.name}") of the codebase in your working directory; '
        "paths are relative to its root.\n\n"
        f"Review ONLY these {len(part.files)} files. Read other files only where you need them "
        "to understand these, and report nothing about them:\n"
        f"{files}\n\n"
        f"Focus on: {focus.strip() or DEFAULT_FOCUS}.\n"
        "Report real problems with concrete evidence, not style nits or guesses. "
        "Do not modify any file.\n\n"
        f"{FINDINGS_SCHEMA_DOC}\n"
    )
    size = len(prompt.encode())
    if size > PROMPT_LIMIT:
        raise AnalysisError(
            f"the prompt of part {part.name!r} takes {size:,} bytes (at most {PROMPT_LIMIT:,}): "
            "use smaller parts"
        )
    return prompt


def _text(item: dict[str, Any], *keys: str) -> str:
    """The first non-blank string among `item`'s keys, stripped; "" when none."""
    for key in keys:
        value = item.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _line(value: object) -> int | None:
    """A line number from 42, 42.0, "42" or "42-50"; None for anything else or below 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and (match := re.match(r"\s*L?(\d+)", value)):
        value = int(match.group(1))
    return value if isinstance(value, int) and value >= 1 else None


def _severity(value: object) -> str:
    """Our severity for a model's word: ours as is, synonyms mapped, anything else `info`."""
    word = value.strip().lower() if isinstance(value, str) else ""
    return word if word in SEVERITIES else SEVERITY_SYNONYMS.get(word, "info")


def _finding(item: object, chunk: str) -> Finding | None:
    """A finding from one JSON item, or None when it has no file or no title."""
    if not isinstance(item, dict):
        return None
    file = _text(item, "file", "path", "filename").removeprefix("./")
    title = " ".join(_text(item, "title", "summary", "message", "issue").split())
    if not file or not title:
        return None
    line = _line(item.get("line", item.get("line_number")))
    if line is None and (match := re.fullmatch(r"(.+?):(\d+)(?::\d+)?", file)):
        file, line = match.group(1), _line(match.group(2))
    try:
        return Finding(
            file=file,
            line=line,
            severity=_severity(item.get("severity", item.get("level"))),
            category=_text(item, "category", "type").lower() or "general",
            title=title[:_TITLE_LIMIT],
            detail=_text(item, "detail", "details", "description")[:_DETAIL_LIMIT],
            chunk=chunk,
        )
    except ValidationError:
        return None


def _container(value: object) -> list[Any] | None:
    """The findings list in a decoded JSON value: an array of objects, or an object holding one."""
    if isinstance(value, list):
        return value if not value or any(isinstance(item, dict) for item in value) else None
    if isinstance(value, dict):
        for key in ("findings", "issues", "results"):
            if isinstance(value.get(key), list):
                return _container(value[key])
        if "file" in value and "title" in value:
            return [value]
    return None


def _scan(text: str) -> list[Any] | None:
    """The first findings list in `text`: the first non-empty one, else the first empty one."""
    decoder = json.JSONDecoder()
    empty: list[Any] | None = None
    position, decodes = 0, 0
    while decodes < _MAX_DECODES and (start := _next_open(text, position)) >= 0:
        decodes += 1
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            position = start + 1
            continue
        found = _container(value)
        if found:
            return found
        if found is not None and empty is None:
            empty = found
        # Past a findings-less array, look inside a non-matching object for a nested one.
        position = end if isinstance(value, list) else start + 1
    return empty


_OPEN = re.compile(r"[\[{]")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def _next_open(text: str, position: int) -> int:
    """The index of the next `[` or `{` from `position`, -1 when there is none."""
    match = _OPEN.search(text, position)
    return match.start() if match else -1


def _locate(text: str) -> list[Any] | None:
    """The findings list of an answer: the whole text, else a fenced block, else a scan."""
    try:
        found = _container(json.loads(text))
    except (ValueError, RecursionError):
        found = None
    if found is not None:
        return found
    for block in _FENCE.findall(text):
        found = _scan(block)
        if found is not None:
            return found
    return _scan(text)


def parse_structured(value: object, chunk: str) -> ParsedAnswer:
    """One job's structured answer (FINDINGS_SCHEMA): its findings; invalid items skipped."""
    items = _container(value)
    if items is None:
        return ParsedAnswer(error="no findings in the structured answer", raw=json.dumps(value))
    return _read(items, chunk, json.dumps(value))


def parse_answer(text: str | None, chunk: str) -> ParsedAnswer:
    """One job's answer read leniently: invalid items are skipped, no JSON at all is an error."""
    if text is None or not text.strip():
        return ParsedAnswer(error="empty answer", raw=text or None)
    items = _locate(text)
    if items is None:
        return ParsedAnswer(error="no JSON findings in the answer", raw=text)
    return _read(items, chunk, text)


def _read(items: list[Any], chunk: str, text: str) -> ParsedAnswer:
    """The findings among decoded items."""
    findings = [f for f in (_finding(item, chunk) for item in items) if f is not None]
    skipped = len(items) - len(findings)
    if items and not findings:
        return ParsedAnswer(
            skipped=skipped, error=f"none of the {len(items)} items is a finding", raw=text
        )
    return ParsedAnswer(findings=findings, skipped=skipped)


def _rank(finding: Finding) -> int:
    """0 for critical up to 4 for info."""
    return SEVERITIES.index(finding.severity)


def merge(parsed: list[ParsedAnswer]) -> list[Finding]:
    """All answers' findings, deduplicated on (file, line, title) and sorted by severity."""
    kept: dict[tuple[str, int | None, str], Finding] = {}
    for answer in parsed:
        for finding in answer.findings:
            key = (finding.file, finding.line, " ".join(finding.title.split()).casefold())
            first = kept.get(key)
            if first is None:
                kept[key] = finding
            elif _rank(finding) < _rank(first):
                kept[key] = finding.model_copy(update={"chunk": first.chunk})
    return sorted(
        kept.values(),
        key=lambda f: (_rank(f), f.file, f.line is None, f.line or 0, f.title.casefold()),
    )


def severity_counts(findings: list[Finding]) -> dict[str, int]:
    """How many findings of each severity, every severity present, most severe first."""
    counts = dict.fromkeys(SEVERITIES, 0)
    for finding in findings:
        counts[finding.severity] += 1
    return counts


def _duration(seconds: float) -> str:
    """A duration as `45s`, `3m 45s` or `1h 02m`."""
    total = round(max(seconds, 0.0))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m {total % 60:02d}s"
    return f"{total // 3600}h {total % 3600 // 60:02d}m"


def _code(text: str) -> str:
    """`text` as an inline code span that survives a markdown table."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return "`" + clean.replace("`", "'").replace("|", "\\|") + "`"


def _fenced(text: str) -> str:
    """`text` in a fenced block whose fence no run of backticks inside can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def _summary_lines(summary: AnalysisSummary, findings: list[Finding]) -> list[str]:
    """The report's summary table."""
    counts = severity_counts(findings)
    by_severity = ", ".join(f"{n} {severity}" for severity, n in counts.items() if n) or "none"
    if summary.wall_s > 0 and summary.sequential_s > 0:
        speedup = f", {summary.sequential_s / summary.wall_s:.1f}x faster"
    else:
        speedup = ""
    unparsed = f" ({len(summary.unparsed_chunks)} unparsed)" if summary.unparsed_chunks else ""
    return [
        "| | |",
        "|---|---|",
        f"| files analysed | {summary.files:,} |",
        f"| chunks | {summary.chunks:,}{unparsed} |",
        f"| findings | {len(findings):,}: {by_severity} |",
        f"| wall time | {_duration(summary.wall_s)} "
        f"(sequential estimate {_duration(summary.sequential_s)}{speedup}) |",
        f"| cost | ${summary.cost_usd:.2f} |",
        f"| batch | {_code(summary.batch_id)}, {summary.status} |",
        *(
            [
                f"| carried over | {len(summary.carried)} unchanged parts since "
                f"{_code(summary.since)}, not reviewed again |"
            ]
            if summary.since
            else []
        ),
    ]


def _chunk_lines(summary: AnalysisSummary, findings: list[Finding]) -> list[str]:
    """The table of chunks: job, part, findings, session and the follow-up command."""
    per_part: dict[str, int] = {}
    for finding in findings:
        per_part[finding.chunk or ""] = per_part.get(finding.chunk or "", 0) + 1
    lines = [
        "| job | part | findings | session | follow up |",
        "|---|---|---:|---|---|",
    ]
    batch = shlex.quote(summary.batch_id)
    for job in sorted(set(summary.chunk_names) | set(summary.sessions)):
        part = summary.chunk_names.get(job, "")
        session = summary.sessions.get(job)
        followup = f'python starter.py followup {batch} {shlex.quote(job)} "..."'
        count = "unparsed" if part in summary.unparsed_chunks else str(per_part.get(part, 0))
        if job in summary.carried:
            ask = f"carried over from {_code(summary.carried[job])}"
        else:
            ask = _code(followup) if session else ""
        lines.append(
            f"| {_code(job)} | {_code(part) if part else ''} | {count} "
            f"| {_code(session) if session else 'none'} | {ask} |"
        )
    return lines


def _finding_lines(findings: list[Finding]) -> list[str]:
    """The findings, grouped by severity, each with its place, title, category and detail."""
    lines: list[str] = []
    for severity in SEVERITIES:
        group = [f for f in findings if f.severity == severity]
        if not group:
            continue
        lines += ["", f"### {severity.capitalize()} ({len(group)})", ""]
        for finding in group:
            where = finding.file if finding.line is None else f"{finding.file}:{finding.line}"
            carried = (
                f" (carried over from {_code(finding.carried_from)})"
                if finding.carried_from
                else ""
            )
            lines.append(f"- **{_code(where)}** {finding.title} _({finding.category})_{carried}")
            lines += [f"  {line}".rstrip() for line in finding.detail.splitlines()]
    return lines


def render_report(
    summary: AnalysisSummary, findings: list[Finding], raw_answers: dict[str, str]
) -> str:
    """The `report.md` of a run; `raw_answers` maps part names to the answers that did not parse."""
    lines = [f"# Analysis of {summary.repo}", "", f"Commit `{summary.commit}`.", ""]
    if summary.dirty:
        lines += ["The work tree had uncommitted changes: they were not analysed.", ""]
    lines += _summary_lines(summary, findings)
    lines += ["", "## Chunks", "", *_chunk_lines(summary, findings)]
    lines += ["", f"## Findings ({len(findings)})"]
    lines += _finding_lines(findings) or ["", "No findings."]
    if summary.unparsed_chunks:
        jobs = {part: job for job, part in summary.chunk_names.items()}
        lines += ["", "## Unparsed answers"]
        for part in summary.unparsed_chunks:
            job = f" (job {_code(jobs[part])})" if part in jobs else ""
            lines += ["", f"### {_code(part)}{job}", ""]
            raw = raw_answers.get(part)
            if not raw:
                lines.append("No answer.")
                continue
            shown = raw[:RAW_LIMIT]
            if len(raw) > RAW_LIMIT:
                lines.append(f"First {RAW_LIMIT:,} of {len(raw):,} characters:")
                lines.append("")
            lines.append(_fenced(shown))
    return "\n".join(lines) + "\n"


def findings_document(summary: AnalysisSummary, findings: list[Finding]) -> str:
    """The `findings.json` of a run: the summary and every finding, pretty-printed."""
    document = {
        "summary": summary.model_dump(mode="json"),
        "findings": [finding.model_dump(mode="json") for finding in findings],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
