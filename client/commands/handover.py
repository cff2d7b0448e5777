"""Taking a job's outputs home: the files it kept (`artifacts`) and, for a prompt job, its
repositories with its change and its Claude session (`handoff`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client import batches, changes, handoff
from sortie import artifacts
from sortie.settings import Settings
from sortie.temporal import connect


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
    except OSError as error:
        print(f"cannot write into {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    print("\n".join(written))
    return 0


async def cmd_handoff(args: argparse.Namespace, settings: Settings) -> int:
    """A prompt job's repositories with its change, and its Claude session, on this machine."""
    client = await connect(settings)
    store = settings.blob_store()
    _, result = await batches.find_job(client, args.id, args.job, store=store)
    done = await handoff.handoff(store, args.id, result, Path(args.dir or f"handoff-{args.job}"))
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
