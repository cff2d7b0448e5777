"""Client side of the orphan reaper: one sweep now, or a Temporal Schedule of sweeps.

Every worker ensures its task queue's schedule at start (`ensure_reaper_schedule`), so leaked
machines are destroyed within one interval without anyone typing `starter.py reap`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable
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

from sortie.reaper_models import REAPER_WORKFLOW, ReapInput, ReapOutput
from sortie.settings import Settings

log = logging.getLogger("sortie.reaper")


async def reap_once(client: Client, settings: Settings, request: ReapInput) -> ReapOutput:
    """Run one sweep on a worker (which holds the Fly token) and return what it found."""
    output: ReapOutput = await client.execute_workflow(
        REAPER_WORKFLOW,
        request,
        result_type=ReapOutput,
        id=f"sortie-reap-{request.app}-{secrets.token_hex(4)}",
        task_queue=settings.task_queue,
        static_summary=f"reap orphaned machines in {request.app}"
        + (" (dry run)" if request.dry_run else ""),
    )
    return output


def schedule_id(app: str) -> str:
    """The id of an app's reaper schedule."""
    return f"sortie-reaper-{app}"


def queue_schedule_id(task_queue: str, app: str | None = None) -> str:
    """The id of the schedule the workers of a task queue keep for FLY_APP, or for another app
    their batches use (one per namespace, queue and app)."""
    own = f"sortie-reaper-queue-{task_queue}"
    return own if app is None else f"{own}.{app}"


async def schedule_reaper(
    client: Client,
    settings: Settings,
    request: ReapInput,
    every: timedelta,
    sid: str | None = None,
) -> str:
    """Create, or update in place when it differs, a schedule sweeping the app every `every`."""
    sid = sid or schedule_id(request.app)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            REAPER_WORKFLOW,
            request,
            id=sid,
            task_queue=settings.task_queue,
            static_summary=f"scheduled sweep of orphaned machines in {request.app}",
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(sid, schedule)
    except ScheduleAlreadyRunningError:

        async def replace(current: ScheduleUpdateInput) -> ScheduleUpdate | None:
            existing = current.description.schedule
            if await _same(client, existing, settings.task_queue, request, every):
                return None
            # An operator's pause (and its note) survives a worker bringing the schedule up to date.
            return ScheduleUpdate(schedule=dataclasses.replace(schedule, state=existing.state))

        await client.get_schedule_handle(sid).update(replace)
    return sid


async def _same(
    client: Client, current: Schedule, task_queue: str, request: ReapInput, every: timedelta
) -> bool:
    """Whether the existing schedule already sweeps the same app, as often, on the same queue."""
    action = current.action
    if not isinstance(action, ScheduleActionStartWorkflow):
        return False
    if [i.every for i in current.spec.intervals] != [every] or action.task_queue != task_queue:
        return False
    if action.workflow != REAPER_WORKFLOW:
        return False
    try:
        args = await client.data_converter.decode(list(action.args), [ReapInput])
    except Exception:  # written by another version, or with other keys: write ours
        return False
    return bool(args == [request])


async def ensure_reaper_schedule(
    client: Client, settings: Settings, app: str | None, *, home: bool = True
) -> str | None:
    """The task queue's reaper schedule of FLY_APP (`home`) or of another app, created or
    brought up to date; None when it is off."""
    if not settings.reaper:
        log.info("reaper schedule off (SORTIE_REAPER=off): orphaned machines are not swept")
        return None
    if not app:
        log.warning("no FLY_APP: no reaper schedule, orphaned machines are not swept")
        return None
    every = timedelta(seconds=settings.reaper_interval_s)
    sid = await schedule_reaper(
        client,
        settings,
        ReapInput(app=app),
        every,
        queue_schedule_id(settings.task_queue, None if home else app),
    )
    log.info("reaper schedule %s sweeps %s every %ss", sid, app, settings.reaper_interval_s)
    return sid


class ReaperSchedules:
    """Each app's reaper schedule, tried again until it exists: an app whose schedule could
    not be made would have its orphaned machines never swept, so no failure is final."""

    def __init__(
        self, ensure: Callable[[str], Awaitable[object]], *, first_delay_s: float = 1.0
    ) -> None:
        """`ensure`: make one app's schedule (or bring it up to date), raising when it cannot."""
        self._ensure = ensure
        self._first_delay_s = first_delay_s
        self._tries: dict[str, asyncio.Task[None]] = {}

    async def ensure(self, app: str) -> None:
        """Start making the app's schedule (once per app), in the background."""
        if app not in self._tries:
            self._tries[app] = asyncio.create_task(self._keep_trying(app))

    def missing(self) -> list[str]:
        """The apps whose schedule does not exist yet."""
        return sorted(app for app, task in self._tries.items() if not task.done())

    async def _keep_trying(self, app: str) -> None:
        delay = self._first_delay_s
        while True:
            try:
                await self._ensure(app)
                return
            except Exception as error:  # any failure: said, and tried again until it exists
                log.warning(
                    "no reaper schedule for Fly app %s yet (%s): its orphaned machines are not "
                    "swept until there is; trying again in %gs",
                    app,
                    error,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def close(self) -> None:
        """Stop trying (the worker stops); the next worker tries again."""
        for task in self._tries.values():
            task.cancel()
        await asyncio.gather(*self._tries.values(), return_exceptions=True)
