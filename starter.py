"""Sortie's command line: submit batches, watch and steer them, read their results.

    python starter.py submit FILE [--wait] [--json] [--new]
    python starter.py validate FILE
    python starter.py doctor [FILE] [--json]
    python starter.py watch ID
    python starter.py status ID [--json]
    python starter.py pause|resume|cancel ID [--reason TEXT]
    python starter.py set-max-machines ID N
    python starter.py set-budget ID USD
    python starter.py results ID [--json] [--job JOB] [--latest]
        [--format json|jsonl|csv|md] [--out FILE]
    python starter.py retry ID [--failed] [--timed-out] [--cancelled] [--jobs a,b,...]
        [--continue-sessions [PROMPT]] [--wait] [--json]
    python starter.py logs ID JOB [--follow]
    python starter.py diff ID JOB [--repo PATH] [--out FILE]
    python starter.py artifacts ID [JOB] --out DIR
    python starter.py handoff ID JOB [--dir DIR]
    python starter.py set-failure-limit ID [--max-failures N] [--max-failure-rate P%]
        [--on-too-many-failures pause|cancel]
    python starter.py followup ID JOB "PROMPT" [--no-wait]
    python starter.py analyze PATH [--repo URL] [--ref REF] [--workers N]
        [--strategy directory|size|type|equal] [--min-files 5] [--max-files 20]
        [--focus "security, bugs, quality"] [--since BATCH_ID] [--watch] [--out DIR]
    python starter.py findings ID [--out DIR]
    python starter.py list
    python starter.py reap [--app APP] [--dry-run] [--schedule EVERY]

Configured by environment: Temporal's profile and TEMPORAL_* variables (temporalio.envconfig),
SORTIE_TASK_QUEUE, SORTIE_UI_URL. Exit codes: 0 success, 1 a batch with failed or cancelled
jobs, 2 bad input (usage, an unreadable or invalid batch file, a batch the worker refused, no
such batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from activities.reaper_models import ReapInput
from sortie import (
    artifacts,
    batches,
    changes,
    doctor,
    export,
    failures,
    handoff,
    machine_logs,
    reaping,
    render,
)
from sortie.analysis import batch as analysis
from sortie.analysis.files import AnalysisError, read_checkout
from sortie.analysis.findings import DEFAULT_FOCUS
from sortie.analysis.partition import partition, plan_markdown, plan_table
from sortie.models import JobResult, JobState
from sortie.plan import plan
from sortie.settings import Settings
from sortie.spec import (
    BatchFileError,
    OnTooManyFailures,
    load_batch_file,
    parse_duration,
    parse_percent,
)
from sortie.store import StoreError
from sortie.temporal import connect, run_main
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    CancelRequest,
    FailureLimitRequest,
    MaxCostRequest,
    MaxMachinesRequest,
    PauseRequest,
)

REFRESH_S = 1.0


def _ui(settings: Settings, batch_id: str, as_json: bool = False) -> None:
    """Every command names the batch's Web UI page (on stderr when stdout is JSON)."""
    print(f"Web UI: {settings.workflow_url(batch_id)}", file=sys.stderr if as_json else sys.stdout)


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    spec = load_batch_file(args.file)
    client = await connect(settings)
    suffix = secrets.token_hex(4) if args.new else None
    submitted = await batches.submit(client, settings, spec, suffix=suffix)
    out = sys.stderr if args.json else sys.stdout
    if submitted.created:
        print(f"submitted {submitted.batch_id} ({len(spec.jobs)} jobs)", file=out)
    else:
        print(
            f"{submitted.batch_id} was already submitted ({submitted.status}); "
            "use --new to run the file again as a new batch",
            file=out,
        )
    return await _started(client, settings, submitted, args)


async def _watch(client: Client, batch_id: str, quiet: bool = False) -> None:
    """Follow the batch until it closes: live bars on a terminal, a line per change on a pipe."""
    if quiet:
        with contextlib.suppress(WorkflowFailureError):  # its outcome is read and shown next
            await batches.batch_handle(client, batch_id).result()
        return
    if not sys.stdout.isatty():
        await _watch_plain(client, batch_id)
        return
    with render.LiveProgress(Console(highlight=False)) as live:
        while True:
            closed, _ = await batches.is_closed(client, batch_id)
            try:
                live.update(await batches.progress_view(client, batch_id))
            except batches.BatchNotReadable:
                break
            except RPCError:
                live.waiting(f"{batch_id}: waiting for a worker to answer…")
            if closed:
                break
            await asyncio.sleep(REFRESH_S)


async def _watch_plain(client: Client, batch_id: str) -> None:
    """A plain line each time the batch's counts change, the last one once it closes."""
    shown = ""
    while True:
        closed, _ = await batches.is_closed(client, batch_id)
        try:
            line = render.progress_line(await batches.progress_view(client, batch_id))
        except batches.BatchNotReadable:
            return
        except RPCError:
            line = f"{batch_id}: waiting for a worker to answer…"
        if line != shown:
            print(line, flush=True)
            shown = line
        if closed:
            return
        await asyncio.sleep(REFRESH_S)


async def _print_results(
    client: Client, settings: Settings, batch_id: str, as_json: bool, latest: bool = False
) -> int:
    try:
        if latest:
            report = await batches.latest_results(client, batch_id, store=settings.blob_store())
        else:
            report = await batches.results(client, batch_id, store=settings.blob_store())
    except batches.BatchRejected as error:
        print(error, file=sys.stderr)
        return 2
    except batches.BatchNotReadable as error:
        print(error, file=sys.stderr)
        return 1
    if as_json:
        print(report.model_dump_json(indent=2))
    elif sys.stdout.isatty():
        render.print_results(Console(highlight=False), report)
    else:
        print("\n".join(render.results_table(report)))
    if report.latest_from and not as_json:
        print(
            f"latest outcomes: {len(report.latest_from)} jobs from the retries "
            f"{', '.join(report.retries)}"
        )
    return 1 if report.failed or report.cancelled else 0


async def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    _ui(settings, args.id)
    await _watch(client, args.id)
    return await _print_results(client, settings, args.id, as_json=False)


TOP_CAUSES = 3
"""Causes of failure `status` shows; `results ID --format md` lists them all."""


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    _ui(settings, args.id, args.json)
    try:
        progress = await batches.progress(client, args.id)
    except batches.BatchRejected as error:
        print(error, file=sys.stderr)
        return 2
    except batches.BatchNotReadable as error:
        print(error, file=sys.stderr)
        return 1
    retry_of = await batches.retry_of(client, args.id)
    retried_by = [
        (batch, state)
        for batch, state, parent in await batches.retries_of(client, args.id)
        if parent == args.id
    ]
    counts = progress.counts
    causes: list[failures.Cause] = []
    if counts.failed or counts.timed_out or counts.cancelled:
        rows = batches.iter_results(client, args.id, store=settings.blob_store())
        causes = (await failures.Summary.read(rows)).causes()
    if args.json:
        document = progress.model_dump(mode="json")
        document["retry_of"] = retry_of
        document["retried_by"] = [{"batch_id": b, "status": st} for b, st in retried_by]
        document["causes"] = [cause.model_dump() for cause in causes[:TOP_CAUSES]]
        print(json.dumps(document, indent=2))
        return 0
    if sys.stdout.isatty():
        with render.LiveProgress(Console(highlight=False)) as bars:
            bars.update(batches.view(progress))
    else:
        print("\n".join(render.progress_lines(batches.view(progress))))
    if causes:
        print("top causes of failure:")
        print("\n".join(f"  {line}" for line in failures.cause_lines(causes, TOP_CAUSES)))
    if retry_of:
        print(f"retry of {retry_of}: {settings.workflow_url(retry_of)}")
    for batch, state in retried_by:
        print(f"retried by {batch} ({state}): {settings.workflow_url(batch)}")
    return 0


async def cmd_signal(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    handle = batches.batch_handle(client, args.id)
    match args.command:
        case "pause":
            await handle.signal(BatchWorkflow.pause, PauseRequest(reason=args.reason or "paused"))
        case "resume":
            await handle.signal(BatchWorkflow.resume)
        case "cancel":
            await handle.signal(
                BatchWorkflow.cancel, CancelRequest(reason=args.reason or "cancelled by operator")
            )
        case "set-max-machines":
            await handle.signal(
                BatchWorkflow.set_max_machines, MaxMachinesRequest(max_machines=args.n)
            )
        case "set-budget":
            await handle.signal(BatchWorkflow.set_max_cost, MaxCostRequest(max_cost_usd=args.usd))
        case "set-failure-limit":
            limit = FailureLimitRequest(
                max_failures=args.max_failures,
                max_failure_rate=args.max_failure_rate,
                on_too_many_failures=args.on_too_many_failures,
            )
            await handle.signal(BatchWorkflow.set_failure_limit, limit)
    print(f"sent {args.command} to {args.id}")
    _ui(settings, args.id)
    return 0


async def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    if args.out is not None and args.format is None:
        suffix = Path(args.out).suffix.lstrip(".")
        if suffix not in {f.value for f in export.Format}:
            print(
                f"--out {args.out}: name the format with --format json|jsonl|csv|md",
                file=sys.stderr,
            )
            return 2
        args.format = suffix
    if args.format is not None and args.job is not None:
        print("--format writes a whole batch: leave out --job", file=sys.stderr)
        return 2
    client = await connect(settings)
    _ui(settings, args.id, args.json or args.format is not None)
    if args.format is not None:
        return await _export(client, settings, args)
    if args.job is None:
        return await _print_results(client, settings, args.id, args.json, args.latest)
    try:
        _, result = await batches.find_job(client, args.id, args.job, store=settings.blob_store())
    except batches.UnknownJob as error:
        print(error, file=sys.stderr)
        return 2
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    for turn in [result, *result.followups]:
        await _print_turn(settings, turn)
    return 0


async def _export(client: Client, settings: Settings, args: argparse.Namespace) -> int:
    """Write the results in a format, streaming; to --out atomically, or to stdout."""
    store = settings.blob_store()
    try:
        if args.latest:
            head = await batches.latest_results(client, args.id, store=store)
            rows = head.results
            head = head.model_copy(update={"results": []})

            async def stream() -> AsyncIterator[tuple[str, JobResult]]:
                for row in rows:
                    yield head.latest_from.get(row.job_id, args.id), row
        else:
            head = await batches.report_head(client, args.id)

            def stream() -> AsyncIterator[tuple[str, JobResult]]:
                return batches.iter_results(client, args.id, store=store)
    except batches.BatchRejected as error:
        print(error, file=sys.stderr)
        return 2
    except batches.BatchNotReadable as error:
        print(error, file=sys.stderr)
        return 1
    kind = export.Format(args.format)
    if args.out is None:
        await export.export(kind, head, stream, sys.stdout, settings.workflow_url)
    else:
        target = Path(args.out)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with partial.open("w", encoding="utf-8", newline="") as out:
                count = await export.export(kind, head, stream, out, settings.workflow_url)
            partial.replace(target)
        except OSError as error:
            partial.unlink(missing_ok=True)
            print(f"cannot write {target}: {error.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {count} jobs of {args.id} to {target} ({kind.value})")
    return 1 if head.failed or head.cancelled else 0


async def _print_turn(settings: Settings, turn: JobResult) -> None:
    """One turn of a job in full: its state, cost, session and whole answer."""
    cost = "" if turn.cost_usd is None else f", ${turn.cost_usd:.4f}, {turn.num_turns} turns"
    print(f"== {turn.job_id} turn {turn.turn}: {turn.state.value}{cost}")
    if turn.session_id:
        print(f"session: {turn.session_id}")
    if turn.error:
        print(f"error: {turn.error}")
    for number, step in enumerate(turn.iterations, 1):
        print(
            f"iteration {number}: claude exited {step.claude_exit}, verify exited "
            f"{'-' if step.verify_exit is None else step.verify_exit}, {step.seconds:.1f}s, "
            f"${step.cost_usd:.4f}"
        )
    if turn.changes is not None:
        print(f"changes: {turn.changes.describe()} (python starter.py diff ID {turn.job_id})")
    if turn.pushed is not None:
        commits = ", ".join(f"{path} {sha[:12]}" for path, sha in turn.pushed.commits.items())
        print(f"pushed: {turn.pushed.branch} ({commits})")
    if turn.artifacts is not None:
        print(
            f"artifacts: {turn.artifacts.describe()} (python starter.py artifacts ID JOB --out DIR)"
        )
        print("\n".join(artifacts.listing(turn.artifacts)))
    if turn.structured is not None:
        print("structured (json_schema):")
        print(json.dumps(turn.structured, indent=2, ensure_ascii=False))
        return
    answer = await batches.full_answer(settings, turn)
    if answer is None and turn.result_ref:
        answer = f"{turn.result}\n[… {turn.result_chars} characters in all; the rest was at "
        answer += f"{turn.result_ref} in the object store, which no longer has it]"
    if answer:
        print(answer)
    elif turn.log_tail:
        print("\n".join(turn.log_tail))


async def cmd_followup(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    try:
        workflow_id = await batches.followup(client, settings, args.id, args.job, args.prompt)
    except batches.FollowupRefused as error:
        print(error, file=sys.stderr)
        return 2
    print(f"started {workflow_id}")
    print(f"Web UI: {settings.workflow_url(workflow_id)}")
    if args.no_wait:
        return 0
    turns = await batches.turn_rows(client, workflow_id, settings.blob_store())
    for turn in turns:
        await _print_turn(settings, turn)
    return 0 if all(t.state.value == "succeeded" for t in turns) else 1


async def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Run again, as a new batch with the same settings, the jobs that did not succeed."""
    states = {
        state
        for flag, state in (
            (args.failed, JobState.FAILED),
            (args.timed_out, JobState.TIMED_OUT),
            (args.cancelled, JobState.CANCELLED),
        )
        if flag
    }
    job_ids = [j.strip() for j in args.jobs.split(",") if j.strip()] if args.jobs else None
    if not states and not job_ids:
        states = {JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED}
    client = await connect(settings)
    try:
        retried = await batches.retry(
            client,
            settings,
            args.id,
            states=states,
            job_ids=job_ids,
            continue_prompt=args.continue_sessions,
        )
    except batches.RetryRefused as error:
        print(f"cannot retry: {error}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout
    if retried.created:
        continued = (
            f", {len(retried.continued)} continuing their session" if retried.continued else ""
        )
        print(
            f"retrying {len(retried.jobs)} jobs of {args.id} as {retried.batch_id}{continued}",
            file=out,
        )
    else:
        print(f"{retried.batch_id} already retries them ({retried.status})", file=out)
    return await _started(client, settings, retried, args)


async def _started(
    client: Client, settings: Settings, started: batches.Submitted, args: argparse.Namespace
) -> int:
    """After submit or retry: the UI link, then the answer (--json) or, with --wait, the end."""
    _ui(settings, started.batch_id, args.json)
    if not args.wait:
        if args.json:
            print(started.model_dump_json(indent=2))
        return 0
    await _watch(client, started.batch_id, quiet=args.json)
    return await _print_results(client, settings, started.batch_id, args.json)


async def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    """A job's machine logs: as they come while it runs (--follow: until it ends), then its
    stored tail; read and scrubbed of secrets on a worker."""
    client = await connect(settings)
    try:
        async for line in machine_logs.follow(
            client, settings, args.id, args.job, keep_following=args.follow
        ):
            print(line, flush=True)
    except batches.UnknownJob as error:
        print(error, file=sys.stderr)
        return 2
    except batches.BatchNotReadable as error:
        print(error, file=sys.stderr)
        return 1
    return 0


async def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    """A prompt job's change to one repository as a patch `git apply` takes: printed, or
    written to --out."""
    client = await connect(settings)
    store = settings.blob_store()
    try:
        _, result = await batches.find_job(client, args.id, args.job, store=store)
        found = await changes.job_patch(store, result, args.repo)
        patch = found.data()
    except (batches.UnknownJob, changes.ChangesUnavailable) as error:
        print(error, file=sys.stderr)
        return 2
    except batches.BatchNotReadable as error:
        print(error, file=sys.stderr)
        return 1
    if args.out is None:
        sys.stdout.buffer.write(patch)
        sys.stdout.flush()
        return 0
    try:
        await asyncio.to_thread(Path(args.out).write_bytes, patch)
    except OSError as error:
        print(f"cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    print(
        f"wrote the change of {args.job} to {found.path} (from {found.commit}, {found.files} "
        f"files +{found.insertions} -{found.deletions}) to {args.out}"
    )
    return 0


async def cmd_artifacts(args: argparse.Namespace, settings: Settings) -> int:
    """Write the artifacts of one job (into DIR) or of every job (into DIR/JOB), paths kept."""
    client = await connect(settings)
    store = settings.blob_store()
    try:
        if args.job is not None:
            _, result = await batches.find_job(client, args.id, args.job, store=store)
            found = [(changes.latest_turn(result), Path(args.out))]
        else:
            found = [
                (changes.latest_turn(row), Path(args.out) / row.job_id)
                async for _, row in batches.iter_results(client, args.id, store=store)
            ]
        written = await artifacts.write_out(store, found, single=args.job is not None)
    except (batches.UnknownJob, artifacts.ArtifactsUnavailable) as error:
        print(error, file=sys.stderr)
        return 2
    except batches.BatchNotReadable as error:
        print(error, file=sys.stderr)
        return 1
    except OSError as error:
        print(f"cannot write into {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    print("\n".join(written))
    return 0


async def cmd_handoff(args: argparse.Namespace, settings: Settings) -> int:
    """A prompt job's repositories with its change, and its Claude session, on this machine."""
    client = await connect(settings)
    store = settings.blob_store()
    try:
        _, result = await batches.find_job(client, args.id, args.job, store=store)
        done = await handoff.handoff(
            store, args.id, result, Path(args.dir or f"handoff-{args.job}")
        )
    except (batches.UnknownJob, handoff.HandoffError, changes.ChangesUnavailable) as error:
        print(error, file=sys.stderr)
        return 2
    except batches.BatchNotReadable as error:
        print(error, file=sys.stderr)
        return 1
    for repo in done.repos:
        print(f"{done.workspace / repo.path}: {repo.url} at {repo.commit[:12]}, its change applied")
    if done.command is None:
        print(
            f"job {args.job}'s Claude session is not kept (the batch's keep_sessions keeps it "
            "after the batch closes): the repositories are ready, but there is nothing to resume",
            file=sys.stderr,
        )
        return 1
    print(f"session {done.session_id} restored to {done.session_file}")
    print(done.command)
    return 0


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    rows = [
        (batch_id, status, started, settings.workflow_url(batch_id))
        for batch_id, status, started in await batches.list_batches(client)
    ]
    if sys.stdout.isatty():
        render.print_list(Console(highlight=False), rows)
    else:
        print("\n".join(render.list_lines(rows)))
    return 0


async def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    """Check a batch file and print its plan or every problem; needs no server."""
    print("\n".join(render.plan_lines(plan(load_batch_file(args.file)))))
    return 0


async def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    """Check the setup a batch needs, one line a check; exit 2 when something is missing."""
    spec = load_batch_file(args.file) if args.file else None
    text, code = doctor.report(await doctor.diagnose(spec), as_json=args.json)
    print(text)
    return code


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


async def cmd_reap(args: argparse.Namespace, settings: Settings) -> int:
    app = args.app or os.environ.get("FLY_APP")
    if not app:
        print("name the Fly app with --app or FLY_APP", file=sys.stderr)
        return 2
    request = ReapInput(app=app, dry_run=args.dry_run)
    client = await connect(settings)
    if args.schedule:
        try:
            every = timedelta(seconds=parse_duration(args.schedule))
        except ValueError as error:
            print(f"--schedule: {error}", file=sys.stderr)
            return 2
        sid = await reaping.schedule_reaper(client, settings, request, every)
        print(f"schedule {sid} sweeps {app} every {args.schedule}")
        print(
            f"Web UI: {settings.ui_url.rstrip('/')}/namespaces/{settings.temporal_namespace}"
            f"/schedules/{sid}"
        )
        return 0
    output = await reaping.reap_once(client, settings, request)
    for orphan in output.orphans:
        state, job = orphan.state or "?", orphan.job_id or "?"
        print(f"{orphan.machine_id}  {state:10} {job:20} {orphan.reason}")
    verb = "would destroy" if output.dry_run else "destroyed"
    count = len(output.orphans) if output.dry_run else output.destroyed
    print(
        f"{app}: {output.checked} Sortie machines checked, {len(output.orphans)} orphaned, "
        f"{verb} {count}"
    )
    for chunk in output.cancelled_chunks:
        print(f"cancelled stray chunk {chunk}")
    for prefix in output.expired_sessions:
        print(
            f"{'would delete' if output.dry_run else 'deleted'} expired session archives {prefix}"
        )
    return 0


def _positive_usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the budget must be positive")
    return value


def _failures(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of jobs: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the number of failures must be 0 (no limit) or more")
    return value


def _failure_rate(text: str) -> float:
    if text.strip().removesuffix("%").strip() in ("0", "0.0"):
        return 0.0  # no limit
    try:
        return parse_percent(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    p = argparse.ArgumentParser(prog="starter.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a batch file")
    s.add_argument("file")
    s.add_argument("--wait", action="store_true", help="watch until done and print results")
    s.add_argument("--json", action="store_true", help="print a JSON document")
    s.add_argument("--new", action="store_true", help="run an already submitted file again")
    s.set_defaults(run=cmd_submit)
    s = sub.add_parser("validate", help="check a batch file and print its plan (no server)")
    s.add_argument("file")
    s.set_defaults(run=cmd_validate)
    s = sub.add_parser("doctor", help="check Temporal, workers, the store, Fly and credentials")
    s.add_argument("file", nargs="?", help="a batch file: also check its apps, images, secrets")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_doctor)
    for name, run in (("watch", cmd_watch), ("status", cmd_status), ("results", cmd_results)):
        s = sub.add_parser(name, help=f"{name} a batch")
        s.add_argument("id")
        if name != "watch":
            s.add_argument("--json", action="store_true")
        if name == "results":
            s.add_argument("--job", help="one job's turns with their whole answers")
            s.add_argument(
                "--latest", action="store_true", help="each job's latest outcome over its retries"
            )
            s.add_argument(
                "--format", choices=[f.value for f in export.Format], help="export, streaming"
            )
            s.add_argument("--out", metavar="FILE", help="write the export to FILE")
        s.set_defaults(run=run)
    for name in ("pause", "resume", "cancel"):
        s = sub.add_parser(name, help=f"{name} a batch")
        s.add_argument("id")
        if name != "resume":
            s.add_argument("--reason")
        s.set_defaults(run=cmd_signal)
    s = sub.add_parser("set-max-machines", help="change a running batch's machine cap")
    s.add_argument("id")
    s.add_argument("n", type=int)
    s.set_defaults(run=cmd_signal)
    s = sub.add_parser("set-budget", help="change a running batch's budget (US dollars)")
    s.add_argument("id")
    s.add_argument("usd", type=_positive_usd)
    s.set_defaults(run=cmd_signal)
    s = sub.add_parser(
        "set-failure-limit", help="change a running batch's failure thresholds (0: no limit)"
    )
    s.add_argument("id")
    s.add_argument("--max-failures", type=_failures, metavar="N")
    s.add_argument("--max-failure-rate", type=_failure_rate, metavar="P%")
    s.add_argument("--on-too-many-failures", choices=[o.value for o in OnTooManyFailures])
    s.set_defaults(run=cmd_signal)
    s = sub.add_parser("analyze", help="review a codebase with parallel Claude jobs")
    s.add_argument("path", help="a local git checkout (or a directory inside one)")
    s.add_argument("--repo", help="the URL machines clone (default: origin, else PATH)")
    s.add_argument("--ref", default="HEAD", help="the commit to review (default HEAD)")
    s.add_argument("--workers", type=int, default=4, help="machines at once")
    s.add_argument(
        "--strategy", choices=["directory", "size", "type", "equal"], default="directory"
    )
    s.add_argument("--min-files", type=int, default=5)
    s.add_argument("--max-files", type=int, default=20)
    s.add_argument("--focus", default=DEFAULT_FOCUS)
    s.add_argument(
        "--since",
        metavar="BATCH_ID",
        help="review only the parts changed since that analysis; carry the others over",
    )
    s.add_argument("--watch", action="store_true", help="follow it and write the report")
    s.add_argument("--out", help="where report.md and findings.json go")
    s.add_argument("--app", help="Fly app (default FLY_APP)")
    s.add_argument("--model")
    s.add_argument("--max-cost", type=_positive_usd, help="budget in US dollars")
    s.add_argument(
        "--secret", action="append", help="a worker secret the jobs need, e.g. GITHUB_TOKEN"
    )
    s.set_defaults(run=cmd_analyze)
    s = sub.add_parser("findings", help="merge an analysis batch's findings (so far) into a report")
    s.add_argument("id")
    s.add_argument("--out")
    s.set_defaults(run=cmd_findings)
    s = sub.add_parser("retry", help="run a closed batch's unsuccessful jobs again")
    s.add_argument("id")
    s.add_argument("--failed", action="store_true", help="the failed jobs")
    s.add_argument("--timed-out", action="store_true", help="the jobs that timed out")
    s.add_argument("--cancelled", action="store_true", help="the cancelled jobs")
    s.add_argument("--jobs", help="these jobs, by id: a,b,c")
    s.add_argument(
        "--continue-sessions",
        nargs="?",
        const=batches.DEFAULT_CONTINUE_PROMPT,
        metavar="PROMPT",
        help="prompt jobs out of turns or budget continue their session (with PROMPT)",
    )
    s.add_argument("--wait", action="store_true", help="watch until done and print results")
    s.add_argument("--json", action="store_true", help="print a JSON document")
    s.set_defaults(run=cmd_retry)
    s = sub.add_parser("logs", help="a job's machine logs, live while it runs")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("--follow", "-f", action="store_true", help="until the job ends")
    s.set_defaults(run=cmd_logs)
    s = sub.add_parser("diff", help="a prompt job's change to a repository, as a patch")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("--repo", metavar="PATH", help="the repository's path (when it has several)")
    s.add_argument("--out", metavar="FILE", help="write the patch to FILE")
    s.set_defaults(run=cmd_diff)
    s = sub.add_parser("artifacts", help="write the files jobs kept (their `artifacts`)")
    s.add_argument("id")
    s.add_argument("job", nargs="?", help="one job (default: every job, each in DIR/JOB)")
    s.add_argument("--out", metavar="DIR", required=True, help="where the files go")
    s.set_defaults(run=cmd_artifacts)
    s = sub.add_parser("handoff", help="a prompt job's repositories and session, to go on here")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("--dir", metavar="DIR", help="a new directory (default ./handoff-JOB)")
    s.set_defaults(run=cmd_handoff)
    s = sub.add_parser("followup", help="continue a finished prompt job's Claude session")
    s.add_argument("id")
    s.add_argument("job")
    s.add_argument("prompt")
    s.add_argument("--no-wait", action="store_true", help="start it and return")
    s.set_defaults(run=cmd_followup)
    sub.add_parser("list", help="list recent batches").set_defaults(run=cmd_list)
    s = sub.add_parser("reap", help="destroy machines no running batch owns")
    s.add_argument("--app", help="Fly app (default FLY_APP)")
    s.add_argument("--dry-run", action="store_true", help="only list the orphans")
    s.add_argument("--schedule", metavar="EVERY", help="run on a Temporal Schedule, e.g. 10m")
    s.set_defaults(run=cmd_reap)
    return p


async def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run one command; report bad input clearly."""
    args = parser().parse_args(argv)
    if getattr(args, "n", 1) < 1:
        print("N must be at least 1", file=sys.stderr)
        return 2
    if args.command == "set-failure-limit" and (
        args.max_failures is None
        and args.max_failure_rate is None
        and args.on_too_many_failures is None
    ):
        print(
            "set-failure-limit: give --max-failures, --max-failure-rate or --on-too-many-failures",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings.from_env()
    except ValueError as error:
        print(f"bad configuration: {error}", file=sys.stderr)
        return 2
    try:
        code: int = await args.run(args, settings)
    except StoreError as error:
        print(error, file=sys.stderr)
        return 2
    except BatchFileError as error:
        print(error.render(), file=sys.stderr)
        return 2
    except AnalysisError as error:
        print(f"cannot analyse: {error}", file=sys.stderr)
        return 2
    except RPCError as error:
        if error.status is RPCStatusCode.NOT_FOUND:
            print(f"no such batch: {error.message}", file=sys.stderr)
            return 2
        raise
    except RuntimeError as error:
        if "connect" in str(error).lower():
            print(f"cannot reach Temporal at {settings.temporal_address}: {error}", file=sys.stderr)
            return 2
        raise
    finally:
        await settings.blob_store().close()
    return code


if __name__ == "__main__":
    run_main(main())
