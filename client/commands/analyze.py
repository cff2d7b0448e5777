"""`analyze` and `findings`: a checkout reviewed in parallel, the findings merged."""

from __future__ import annotations

import argparse
import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

from temporalio.client import Client

from client import batches, render
from client.analysis import batch as analysis
from client.analysis.files import read_checkout
from client.analysis.partition import partition, plan_markdown, plan_table
from client.commands.run import REFRESH_S, _ui
from sortie.settings import Settings
from sortie.temporal import connect


async def cmd_analyze(args: argparse.Namespace, settings: Settings) -> int:
    """Partition a checkout, submit one prompt job per part, and report the merged findings."""
    checkout = read_checkout(Path(args.path), args.ref)
    repo_url = args.repo or checkout.remote or checkout.root
    parts = partition(
        checkout.files, args.strategy, min_files=args.min_files, max_files=args.max_files
    )
    app = args.app or os.environ.get("FLY_APP") or "sortie-analysis"
    client: Client | None = None
    increment = None
    if args.since:
        client = await connect(settings)
        increment = await analysis.plan_since(client, args.since, checkout, parts, args.focus)
        if not increment.review:
            print(
                f"nothing to review again: no part changed since {args.since} (commit "
                f"{increment.since_commit[:12]}); its findings stand: "
                f"python starter.py findings {args.since}"
            )
            return 0
    spec = analysis.analysis_spec(
        checkout,
        parts,
        repo_url=repo_url,
        focus=args.focus,
        workers=args.workers,
        app=app,
        model=args.model,
        max_cost_usd=args.max_cost,
        secrets=args.secret,
        only=set(increment.review) if increment else None,
    )
    print(f"{checkout.root} at {checkout.commit[:12]}: {len(checkout.files)} files to review")
    if checkout.dirty:
        print("note: uncommitted changes are not analysed (machines clone the commit)")
    print(f"plan ({args.strategy}, {args.min_files}-{args.max_files} files a part):")
    reviewed = [parts[i] for i in increment.review] if increment else parts
    print("\n".join(plan_table(reviewed)))
    details = f"Review of `{repo_url}` at `{checkout.commit}`\n\n{plan_markdown(reviewed)}"
    if increment:
        print(
            f"since {increment.since} (commit {increment.since_commit[:12]}): "
            f"{increment.changed} files changed; {len(increment.review)} parts to review again, "
            f"{len(increment.carried)} carried over"
        )
        details = (
            f"Incremental on [{increment.since}]({settings.workflow_url(increment.since)}): "
            f"{len(increment.carried)} unchanged parts carried over.\n\n{details}"
        )
    client = client or await connect(settings)
    submitted = await batches.submit(
        client,
        settings,
        spec,
        details=details,
        memo=analysis.analysis_memo(
            checkout, parts, repo_url, args.strategy, args.focus, increment
        ),
    )
    verb = "submitted" if submitted.created else "already running or done:"
    print(f"\n{verb} {submitted.batch_id} ({len(spec.jobs)} jobs on {args.workers} machines)")
    _ui(settings, submitted.batch_id)
    if not args.watch:
        print(f"see the findings so far: python starter.py findings {submitted.batch_id}")
        return 0
    await _watch_analysis(client, submitted.batch_id)
    return await _write_findings(client, settings, submitted.batch_id, args.out)


async def _watch_analysis(client: Client, batch_id: str) -> None:
    """Overall progress and a line per part under review, until the batch closes."""
    shown = ""
    while not (await batches.is_closed(client, batch_id))[0]:
        report = await batches.results(client, batch_id)
        done = report.succeeded + report.failed + report.cancelled
        lines = [
            f"{render.bar(done, report.total)} {done}/{report.total} parts reviewed, "
            f"{report.running} running, ${report.cost_usd:.4f} spent",
            *analysis.running_lines(report.results, datetime.now(UTC)),
        ]
        text = "\n".join(lines)
        if text != shown:
            print(text, flush=True)
            shown = text
        await asyncio.sleep(REFRESH_S)


async def _write_findings(
    client: Client, settings: Settings, batch_id: str, out: str | None
) -> int:
    result = await analysis.aggregate(client, settings, batch_id)
    target = Path(out) if out else Path("analysis") / batch_id
    paths = analysis.write_report(result, target)
    summary = result.summary
    counts = ", ".join(f"{n} {s}" for s, n in summary.findings_by_severity.items() if n)
    print(
        f"{summary.files} files in {summary.chunks} parts: {len(result.findings)} findings "
        f"({counts or 'none'}); wall {summary.wall_s:.0f}s against {summary.sequential_s:.0f}s "
        f"one after another; ${summary.cost_usd:.4f}"
    )
    if summary.unparsed_chunks:
        print(f"answers that did not parse (kept raw): {', '.join(summary.unparsed_chunks)}")
    for job, session in summary.sessions.items():
        print(f"  {job}: session {session}")
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0 if summary.status == "completed" else 1


async def cmd_findings(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    _ui(settings, args.id)
    return await _write_findings(client, settings, args.id, args.out)
