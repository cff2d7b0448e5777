"""`status`, `results`, `logs`, `diff` and `list`: what a batch did, read back."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console
from temporalio.client import Client

from client import batches, changes, export, machine_logs, render
from client.commands.run import _print_results, _ui
from sortie import artifacts, failures
from sortie.models import JobResult
from sortie.settings import Settings
from sortie.temporal import connect

TOP_CAUSES = 3
"""Causes of failure `status` shows; `results ID --format md` lists them all."""


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    _ui(settings, args.id, args.json)
    progress = await batches.progress(client, args.id)
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
    _, result = await batches.find_job(client, args.id, args.job, store=settings.blob_store())
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    for turn in [result, *result.followups]:
        await _print_turn(settings, turn)
    return 0


async def _export(client: Client, settings: Settings, args: argparse.Namespace) -> int:
    """Write the results in a format, streaming; to --out atomically, or to stdout."""
    store = settings.blob_store()
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


async def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    """A job's machine logs: as they come while it runs (--follow: until it ends), then its
    stored tail; read and scrubbed of secrets on a worker."""
    client = await connect(settings)
    async for line in machine_logs.follow(
        client, settings, args.id, args.job, keep_following=args.follow
    ):
        print(line, flush=True)
    return 0


async def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    """A prompt job's change to one repository as a patch `git apply` takes: printed, or
    written to --out."""
    client = await connect(settings)
    store = settings.blob_store()
    _, result = await batches.find_job(client, args.id, args.job, store=store)
    found = await changes.job_patch(store, result, args.repo)
    patch = found.data()
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
