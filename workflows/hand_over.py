"""Hand a finishing job's slot to the chunk's next job inside the `finish_job` activity.

What it buys: without it, a slot's next machine is created only after `finish_job` returned,
the chunk's workflow task ran and a `create_machine` activity was dispatched, about 0.3 s a job
on a loaded worker (docs/benchmarks.md). With it, the activity creates the next job's machine
the moment the last one is destroyed.

How it stays safe:
- Before `finish_job` is scheduled the chunk *claims* the next job: it leaves the queue, so no
  other slot starts it. A claim that gets no machine lapses and the job goes back to the front.
- The activity creates the machine only when the chunk's `may_start` memo says so. The chunk
  closes that gate the moment it is paused, cancelled or owes slots to a lowered cap. A memo,
  not a query, because the server answers it without asking a busy worker.
- Cancelled while the activity may still be creating, the chunk destroys the finishing job's
  machine (which ends the activity), waits for it at most HAND_OVER_GRACE, then destroys what it
  made: by id when it answered, by its deterministic name when it never did.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.machine_models import MAY_START_MEMO, CreateMachineInput, FinishJobOutput
    from sortie.models import MachineRef
    from sortie.spec import Job

HAND_OVER_GRACE = timedelta(seconds=90)
"""Longest a dropped hand-over's create can still take (Fly client read timeout, and more)."""


class HandOver:
    """The chunk's claims on its next jobs, and the gate the activity reads before a create."""

    def __init__(self, queue: deque[Job]) -> None:
        self._queue = queue
        self._claimed: set[str] = set()
        self._gate_open = True

    @property
    def claims(self) -> int:
        """Jobs claimed by a finishing activity: not started, not waiting in the queue."""
        return len(self._claimed)

    def claim(self, allowed: bool) -> Job | None:
        """Take the next job for a finishing job's slot, when that slot would go to it anyway."""
        if not (allowed and self._queue):
            return None
        job = self._queue.popleft()
        self._claimed.add(job.id)
        return job

    def settle(self, job: Job, started: bool) -> None:
        """The claim ended: its job started on the handed machine, or it goes back in front."""
        self._claimed.discard(job.id)
        if not started:
            self._queue.appendleft(job)

    def publish_gate(self, open: bool) -> None:
        """Keep the memo the activity reads; unset means open, so most chunks write none."""
        if open != self._gate_open:
            self._gate_open = open
            workflow.upsert_memo({MAY_START_MEMO: open})

    async def drop(
        self,
        claim: CreateMachineInput,
        finishing: asyncio.Future[FinishJobOutput],
        destroy: Callable[[MachineRef], Awaitable[None]],
        destroy_named: Callable[[CreateMachineInput], Awaitable[None]],
        destroy_now: MachineRef | None = None,
    ) -> None:
        """Once the activity has ended (or the grace is up), destroy anything it made for `claim`.

        The gate is closed by then, so an activity still running can create a machine only if it
        read the gate before: within HAND_OVER_GRACE that create has landed or failed.
        """
        destroying = asyncio.ensure_future(destroy(destroy_now)) if destroy_now else None
        await workflow.wait([finishing], timeout=HAND_OVER_GRACE.total_seconds())
        if not finishing.done() or finishing.cancelled() or finishing.exception() is not None:
            await destroy_named(claim)  # it may have created one and lost the answer
        elif (handed := finishing.result().next) is not None:
            await destroy(handed.machine)
        if destroying is not None:
            await destroying
        self.settle(claim.job, started=False)
