"""Views of batches for the terminal: live bars and tables drawn with rich, plain lines for pipes.

Every view takes plain values (`batches.ProgressView`, `batches.BatchReport`, `plan.Plan`), so
the workflows' models can change without touching it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bars
from rich.table import Table
from rich.text import Text

from client.batches import BatchReport, ChunkView, ProgressView
from client.plan import Plan
from sortie.models import JobState

BAR_WIDTH = 30
NARROW = 80
"""Below this many columns the live view keeps only the bar, the percentage and the ETA."""
STATE_STYLES = {
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "bold red",
    JobState.TIMED_OUT: "bold red",
    JobState.CANCELLED: "yellow",
}


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """A plain progress bar like `[#########.....]`, for output that is not a terminal."""
    filled = width if total == 0 else round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _state(v: ProgressView) -> str:
    if v.paused and v.pause_reason:
        return f"{v.status} ({v.pause_reason})"
    if v.status in ("cancelling", "cancelled") and v.cancel_reason:
        return f"{v.status} ({v.cancel_reason})"
    return v.status


def _spent(v: ProgressView) -> str:
    spent = f"${v.cost_usd:.4f}" if v.cost_usd else ""
    if v.max_cost_usd:
        spent = f"{spent or '$0'} of ${v.max_cost_usd:.2f}"
    return spent


def _machines(v: ProgressView) -> str:
    return f"{v.live_machines}" + (f"/{v.max_machines}" if v.max_machines else "")


def progress_lines(v: ProgressView) -> list[str]:
    """The overall bar, then a bar per running chunk, as plain text."""
    spent = _spent(v)
    lines = [
        f"{v.batch_id}  {_state(v)}" + (f"  {spent}" if spent else ""),
        f"  {bar(v.done, v.total)} {v.done}/{v.total} done  "
        f"ok {v.succeeded}  failed {v.failed}  timed out {v.timed_out}  "
        f"cancelled {v.cancelled}  running {v.running}  machines {_machines(v)}",
    ]
    if v.machines_created:
        ran = v.done - v.cancelled + v.running
        lines.append(f"  machines created {v.machines_created} for {ran} jobs run")
    if len(v.apps) > 1:
        lines.append(
            f"  Fly apps {', '.join(v.apps)}: jobs spread evenly, each its own create rate"
        )
    if v.failure_limit:
        lines.append(f"  failure limit: {v.failure_limit}")
    for chunk in v.chunks:
        if chunk.active:
            lines.append(
                f"  chunk {chunk.index:04d} {bar(chunk.done, chunk.total, 20)} "
                f"{chunk.done}/{chunk.total}  running {chunk.running}  slots {chunk.slots}"
            )
    return lines


def progress_line(v: ProgressView) -> str:
    """One plain line of the batch's progress, what `watch` prints when output is piped."""
    spent = _spent(v)
    return (
        f"{v.batch_id} {_state(v)}: {v.done}/{v.total} done, {v.succeeded} ok, "
        f"{v.failed + v.timed_out} failed, {v.cancelled} cancelled, {v.running} running, "
        f"machines {_machines(v)}" + (f", {spent}" if spent else "")
    )


MARKS = ("✓", "✗")
ASCII_MARKS = ("ok", "failed")
"""For a terminal whose encoding has no check marks."""


def _batch_extra(v: ProgressView, narrow: bool, marks: tuple[str, str] = MARKS) -> str:
    """The overall bar's trailing text: failures in red, cost and live machines."""
    failed = v.failed + v.timed_out
    ok, ko = marks
    bad = f"[bold red]{ko} {failed}[/]" if failed else f"{ko} 0"
    if narrow:
        return bad
    parts = [f"[green]{ok} {v.succeeded}[/]", bad]
    if v.cancelled:
        parts.append(f"[yellow]cancelled {v.cancelled}[/]")
    parts.append(f"machines {_machines(v)}")
    if spent := _spent(v):
        parts.append(spent)
    if v.paused or v.status != "running":
        parts.append(f"[yellow]{_state(v)}[/]")
    return "  ".join(parts)


def _chunk_extra(chunk: ChunkView, narrow: bool, marks: tuple[str, str] = MARKS) -> str:
    failed = f"  [bold red]{marks[1]} {chunk.failed}[/]" if chunk.failed else ""
    return failed if narrow else f"running {chunk.running}, slots {chunk.slots}{failed}"


class LiveProgress:
    """The batch's bar (ETA, cost, live machines) over a bar per running chunk, redrawn live."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.narrow = console.width < NARROW
        self.marks = MARKS if console.encoding.lower().startswith("utf") else ASCII_MARKS
        columns: list[str | ProgressColumn] = [
            TextColumn("{task.description}"),
            BarColumn(bar_width=None if self.narrow else BAR_WIDTH),
            TaskProgressColumn(),
        ]
        if not self.narrow:
            columns.append(MofNCompleteColumn())
        columns += [TimeRemainingColumn(), TextColumn("{task.fields[extra]}")]
        self.bars = Bars(*columns, console=console, auto_refresh=False, expand=self.narrow)
        self.batch: TaskID | None = None
        self.chunks: dict[int, TaskID] = {}
        self.caps: tuple[int, float | None] = (0, None)

    def __enter__(self) -> LiveProgress:
        self.bars.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.bars.stop()

    def waiting(self, text: str) -> None:
        """Say what the view waits for, before there is progress to draw."""
        if self.batch is None:
            self.batch = self.bars.add_task(text, total=None, extra="")
        else:
            self.bars.update(self.batch, description=text)
        self.bars.refresh()

    def update(self, v: ProgressView) -> None:
        """Draw the batch as it is now; a closed batch's view lacks its caps, so keep the last."""
        if v.max_machines:
            self.caps = (v.max_machines, v.max_cost_usd)
        else:
            v = replace(v, max_machines=self.caps[0], max_cost_usd=self.caps[1])
        failed = v.failed + v.timed_out
        name = v.batch_id if not self.narrow else "batch"
        description = f"[bold red]{name}[/]" if failed else f"[bold]{name}[/]"
        extra = _batch_extra(v, self.narrow, self.marks)
        if self.batch is None:
            self.batch = self.bars.add_task(
                description, total=v.total, completed=v.done, extra=extra
            )
        self.bars.update(
            self.batch, description=description, completed=v.done, total=v.total, extra=extra
        )
        active = {chunk.index: chunk for chunk in v.chunks if chunk.active}
        for index in [i for i in self.chunks if i not in active]:
            self.bars.remove_task(self.chunks.pop(index))
        for index, chunk in active.items():
            label = f"  chunk {index:04d}" if not self.narrow else f"  #{index}"
            label = f"[red]{label}[/]" if chunk.failed else label
            task = self.chunks.get(index)
            if task is None:
                task = self.bars.add_task(label, total=chunk.total, completed=chunk.done, extra="")
                self.chunks[index] = task
            self.bars.update(
                task,
                description=label,
                completed=chunk.done,
                total=chunk.total,
                extra=_chunk_extra(chunk, self.narrow, self.marks),
            )
        self.bars.refresh()


def result_rows(report: BatchReport) -> list[tuple[JobState, list[str]]]:
    """A row per job and turn: state, exit, tries, machine, time, cost, session, changes (files
    and lines), artifacts (files and bytes), error/answer."""
    rows: list[tuple[JobState, list[str]]] = []
    for result in report.results:
        for r in [result, *result.followups]:
            what = r.error if r.state is not JobState.SUCCEEDED else r.result
            rows.append(
                (
                    r.state,
                    [
                        r.job_id if r.turn == 1 else f"  turn {r.turn}",
                        r.state.value,
                        "" if r.exit_code is None else str(r.exit_code),
                        str(r.attempts),
                        f"{r.app}/{r.machine_id}" if r.app and r.machine_id else r.machine_id or "",
                        "" if r.duration_s is None else f"{r.duration_s:.1f}s",
                        "" if r.cost_usd is None else f"${r.cost_usd:.4f}",
                        r.session_id or "",
                        r.changes.describe() if r.changes is not None else "",
                        r.artifacts.describe() if r.artifacts is not None else "",
                        " ".join((what or "").split())[:60],
                    ],
                )
            )
    return rows


RESULT_HEADERS = [
    "JOB",
    "STATE",
    "EXIT",
    "TRIES",
    "MACHINE",
    "TIME",
    "COST",
    "SESSION",
    "CHANGES",
    "ARTIFACTS",
]
OPTIONAL = [RESULT_HEADERS.index("CHANGES"), RESULT_HEADERS.index("ARTIFACTS")]


def results_table(report: BatchReport) -> list[str]:
    """The results as plain aligned columns, then the totals: for output that is not a terminal.

    The changes and artifacts columns show only when some job changed a repository or kept
    artifacts.
    """
    cells = [cells for _, cells in result_rows(report)]
    rows = [[*RESULT_HEADERS, "ERROR/ANSWER"], *cells]
    empty = {i for i in OPTIONAL if not any(row[i] for row in cells)}
    rows = [[cell for i, cell in enumerate(row) if i not in empty] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    lines.append(summary_line(report))
    return [line.rstrip() for line in lines]


WIDE = 120
"""Below this many columns the results table leaves out the machine and session columns."""


def print_results(console: Console, report: BatchReport) -> None:
    """The results as a rich table, states coloured, then the totals.

    Columns no row fills are left out, and so are the machine and session ids on a terminal
    narrower than `WIDE`, so the answer or error keeps room to be read.
    """
    rows = result_rows(report)
    keep = [
        i
        for i, header in enumerate(RESULT_HEADERS)
        if i < 2
        or (
            any(cells[i] for _, cells in rows)
            and not (console.width < WIDE and header in ("MACHINE", "SESSION"))
        )
    ]
    table = Table(title=f"{report.batch_id} ({report.status})", title_justify="left")
    for i in keep:
        table.add_column(RESULT_HEADERS[i], no_wrap=True)
    table.add_column("ERROR/ANSWER", overflow="ellipsis", no_wrap=True, ratio=1, min_width=12)
    for state, cells in rows:
        picked: list[str | Text] = [cells[i] for i in keep]
        picked[1] = Text(cells[1], style=STATE_STYLES.get(state, ""))
        table.add_row(*picked, cells[-1])
    console.print(table)
    failed = report.failed or report.cancelled
    console.print(Text(summary_line(report), style="bold red" if failed else "bold green"))


Listed = list[tuple[str, str, datetime | None, str]]
"""Recent batches: id, status, start time and Web UI page."""


def list_lines(rows: Listed) -> list[str]:
    """Recent batches as plain lines: id, status, start time, Web UI page."""
    return [f"{bid:50} {status:12} {_when(started)}  {url}" for bid, status, started, url in rows]


def _when(started: datetime | None) -> str:
    return started.strftime("%Y-%m-%d %H:%M:%S") if started else ""


LIST_STYLES = {"completed": "green", "failed": "bold red", "running": "cyan"}


def print_list(console: Console, rows: Listed) -> None:
    """Recent batches as a rich table."""
    table = Table("BATCH", "STATUS", "STARTED")
    table.add_column("WEB UI", overflow="fold")
    for bid, status, started, url in rows:
        style = LIST_STYLES.get(status, "yellow")
        table.add_row(bid, Text(status, style=style), _when(started), url)
    console.print(table)


def _apps(apps: list[str]) -> str:
    return f"app {apps[0]}" if len(apps) == 1 else f"apps {', '.join(apps)}"


def summary_line(report: BatchReport) -> str:
    """Totals in one line."""
    line = (
        f"{report.batch_id}: {report.status}; {report.total} jobs, {report.succeeded} succeeded, "
        f"{report.failed} failed ({report.timed_out} timed out), {report.cancelled} cancelled"
    )
    if report.pending or report.running:
        line += f", {report.running} running, {report.pending} pending"
    if report.cost_usd or report.num_turns:
        line += f"; Claude: ${report.cost_usd:.4f}, {report.num_turns} turns"
    return line


def duration(seconds: float) -> str:
    """`1h 30m`, `45m`, `90s`: a span as people say it."""
    s = round(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if s or not parts:
        parts.append(f"{s}s")
    return " ".join(parts[:2])


def plan_lines(p: Plan) -> list[str]:
    """What `validate` prints for a valid file: shape, names and bounds."""
    if p.secrets:
        secrets = ", ".join(p.secrets) + " (names only: the worker resolves them)"
    else:
        secrets = "none"
    if p.prompt_jobs:
        secrets += "; prompt jobs also need a Claude credential on the worker"
    if not p.prompt_jobs:
        cost = "$0 of Claude (command jobs only)"
    elif p.job_costs_usd is not None:
        cost = f"at most ${p.job_costs_usd:.2f} of Claude (the prompt jobs' max_cost_usd)"
    else:
        cost = "unbounded by the jobs (a prompt job sets no max_cost_usd)"
    if p.prompt_jobs and p.budget_usd is not None:
        cost += f"; budget ${p.budget_usd:.2f}: the batch pauses once it is spent"
    warnings = []
    if p.open_network:
        shown = ", ".join(p.open_network[:5]) + (" …" if len(p.open_network) > 5 else "")
        warnings.append(
            f"  warning:  network: open for {len(p.open_network)} prompt job(s) ({shown}): "
            "their agent's commands and WebFetch may connect anywhere (docs/security.md)"
        )
    return [
        f"{p.batch_id} is valid: {p.name} on Fly {_apps(p.apps)}",
        f"  jobs:     {p.jobs} ({p.command_jobs} command, {p.prompt_jobs} prompt)",
        f"  chunks:   {p.chunks} of at most {p.chunk_size} jobs",
        f"  machines: at most {p.machines_at_once} at once (max_machines {p.max_machines})",
        f"  app:      {p.app}"
        if len(p.apps) == 1
        else f"  apps:     {', '.join(p.apps)} (jobs in turn, each app its own create rate)",
        f"  secrets:  {secrets}",
        f"  time:     at most {duration(p.time_bound_s)} (one job at most "
        f"{duration(p.longest_job_s)}: every try boots and runs to its timeout)",
        f"  cost:     {cost}",
        f"  failures: {p.failure_limit or 'no limit (max_failures, max_failure_rate)'}",
        f"  storms:   {p.storm or 'not watched (storm: off)'}",
        *warnings,
    ]
