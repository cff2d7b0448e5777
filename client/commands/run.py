"""`submit` and `watch`: start a batch, follow it to its end, print its results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys

from rich.console import Console
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError

from client import batches, render
from sortie.settings import Settings
from sortie.spec import (
    load_batch_file,
)
from sortie.temporal import connect

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
    if latest:
        report = await batches.latest_results(client, batch_id, store=settings.blob_store())
    else:
        report = await batches.results(client, batch_id, store=settings.blob_store())
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
