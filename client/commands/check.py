"""`validate` and `doctor`: a batch file and the deployment checked before anything runs."""

from __future__ import annotations

import argparse

from client import doctor, render
from client.plan import plan
from sortie.settings import Settings
from sortie.spec import (
    load_batch_file,
)


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
