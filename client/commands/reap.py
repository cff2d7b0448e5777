"""`reap`: orphaned machines swept once, or on a schedule."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

from sortie import reaping
from sortie.fields import parse_duration
from sortie.reaper_models import ReapInput
from sortie.settings import Settings
from sortie.temporal import connect


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
