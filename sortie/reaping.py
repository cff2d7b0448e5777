"""Client side of the orphan reaper: one sweep now, or a Temporal Schedule of sweeps."""

from __future__ import annotations

import secrets
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from sortie.models import ReapInput, ReapOutput
from sortie.settings import Settings
from workflows.reaper import ReaperWorkflow


async def reap_once(client: Client, settings: Settings, request: ReapInput) -> ReapOutput:
    """Run one sweep on a worker (which holds the Fly token) and return what it found."""
    return await client.execute_workflow(
        ReaperWorkflow.run,
        request,
        id=f"sortie-reap-{request.app}-{secrets.token_hex(4)}",
        task_queue=settings.task_queue,
        static_summary=f"reap orphaned machines in {request.app}"
        + (" (dry run)" if request.dry_run else ""),
    )


def schedule_id(app: str) -> str:
    """The id of an app's reaper schedule."""
    return f"sortie-reaper-{app}"


async def schedule_reaper(
    client: Client, settings: Settings, request: ReapInput, every: timedelta
) -> str:
    """Create, or update in place, a schedule sweeping the app every `every`."""
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            ReaperWorkflow.run,
            request,
            id=schedule_id(request.app),
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(schedule_id(request.app), schedule)
    except ScheduleAlreadyRunningError:

        def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id(request.app)).update(replace)
    return schedule_id(request.app)
