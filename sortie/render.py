"""Plain-text views of batches for the terminal: progress bars, status and results tables."""

from __future__ import annotations

from sortie.batches import BatchReport
from sortie.models import ChunkStatus, Counts, JobState, Progress

BAR_WIDTH = 30


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """A progress bar like `[#########.....]`."""
    filled = width if total == 0 else round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _done(counts: Counts) -> int:
    return counts.succeeded + counts.failed + counts.timed_out + counts.cancelled


def progress_lines(p: Progress) -> list[str]:
    """The overall bar, then a bar per running chunk."""
    c = p.counts
    state = p.status + (f" ({p.pause_reason})" if p.paused and p.pause_reason else "")
    spent = f"  ${c.cost_usd:.4f}" if c.cost_usd else ""
    if p.max_cost_usd:
        spent += f" of ${p.max_cost_usd:.2f}"
    lines = [
        f"{p.batch_id}  {state}{spent}",
        f"  {bar(_done(c), c.total)} {_done(c)}/{c.total} done  "
        f"ok {c.succeeded}  failed {c.failed}  timed out {c.timed_out}  "
        f"cancelled {c.cancelled}  running {c.running}  machines {c.live_machines}"
        + (f"/{p.max_machines}" if p.max_machines else ""),
    ]
    for chunk in p.chunks:
        if chunk.status is ChunkStatus.RUNNING:
            k = chunk.counts
            lines.append(
                f"  chunk {chunk.index:04d} {bar(_done(k), k.total, 20)} "
                f"{_done(k)}/{k.total}  running {k.running}  slots {chunk.slots}"
            )
    return lines


def results_table(report: BatchReport) -> list[str]:
    """A row per job and turn, then the totals; prompt jobs show cost, session and answer."""
    rows = [("JOB", "STATE", "EXIT", "TRIES", "MACHINE", "TIME", "COST", "SESSION", "ERROR/ANSWER")]
    for result in report.results:
        for r in [result, *result.followups]:
            what = r.error if r.state is not JobState.SUCCEEDED else r.result
            rows.append(
                (
                    r.job_id if r.turn == 1 else f"  turn {r.turn}",
                    r.state.value,
                    "" if r.exit_code is None else str(r.exit_code),
                    str(r.attempts),
                    r.machine_id or "",
                    "" if r.duration_s is None else f"{r.duration_s:.1f}s",
                    "" if r.cost_usd is None else f"${r.cost_usd:.4f}",
                    r.session_id or "",
                    " ".join((what or "").split())[:60],
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    lines.append(summary_line(report))
    return [line.rstrip() for line in lines]


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
