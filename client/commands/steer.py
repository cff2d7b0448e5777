"""`pause`, `resume`, `cancel` and the `set-*` commands: signals that steer a running batch."""

from __future__ import annotations

import argparse

from client import batches
from client.commands.run import _ui
from sortie.settings import Settings
from sortie.temporal import connect
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    CancelRequest,
    FailureLimitRequest,
    MaxCostRequest,
    MaxMachinesRequest,
    PauseRequest,
)


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
