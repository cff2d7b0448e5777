"""CreatePacerWorkflow: when each create in a Fly app may go, decided once for all workers.

The story: one long-lived workflow per create queue (a task queue and a Fly app) keeps the app's
token bucket as one time: the moment the bucket would be full again (GCRA's theoretical arrival
time). A worker about to create machines asks `reserve` for some turns; the pacer answers, for
each, how many seconds after now it may go, and moves the time on. The worker waits that long,
then calls Fly. Answers are relative, so workers' clocks never need to agree; an answer that
reaches its worker late only makes its create later. The pacer continues-as-new when its run
grows long, carrying the time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.pacer_models import (
        PACER_WORKFLOW,
        RESERVE,
        CreateTurns,
        PacerState,
        ReserveCreates,
    )

RUN_EVENTS = 2_000
"""The pacer continues-as-new past this many events (each answered reserve is about five)."""


@workflow.defn(name=PACER_WORKFLOW)
class CreatePacerWorkflow:
    """Hands out an app's create turns to every worker: `burst` at once, then `rate` a second."""

    @workflow.init
    def __init__(self, state: PacerState) -> None:
        self._state = state

    @workflow.run
    async def run(self, state: PacerState) -> None:
        """Serve reservations until the run is long, then continue as new."""
        await workflow.wait_condition(self._run_is_long)
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self._state)

    @workflow.update(name=RESERVE)
    def reserve(self, request: ReserveCreates) -> CreateTurns:
        """The next `count` turns: none before the bucket has a token for it."""
        now = workflow.now()
        interval = timedelta(seconds=1 / request.rate)
        tolerance = interval * (request.burst - 1)
        full_at = max(self._state.full_at or now, now)
        turns = []
        for _ in range(request.count):
            turns.append(max(now, full_at - tolerance))
            full_at += interval
        self._state.full_at = full_at
        return CreateTurns(waits_s=[(go - now).total_seconds() for go in turns], at=turns)

    @workflow.query
    def bucket_full_at(self) -> datetime | None:
        """When the app's bucket is full again (None: never used)."""
        return self._state.full_at

    def _run_is_long(self) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() > RUN_EVENTS
