"""`followup` and `retry`: a job's next turn, a batch's failed jobs run again."""

from __future__ import annotations

import argparse
import sys

from client import batches
from client.commands.read import _print_turn
from client.commands.run import _started
from sortie.models import JobState
from sortie.settings import Settings
from sortie.temporal import connect


async def cmd_followup(args: argparse.Namespace, settings: Settings) -> int:
    client = await connect(settings)
    workflow_id = await batches.followup(client, settings, args.id, args.job, args.prompt)
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
    retried = await batches.retry(
        client,
        settings,
        args.id,
        states=states,
        job_ids=job_ids,
        continue_prompt=args.continue_sessions,
    )
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
