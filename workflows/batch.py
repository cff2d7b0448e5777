"""BatchWorkflow: split a batch into chunk child workflows and keep at most `max_machines` busy.

The story: check the worker has the batch's secrets; start chunks as children, each with a
window of machine slots (workflows/slots.py has every rule); as chunks report back, lend freed
slots, start waiting chunks, pass on pause, resume and cancel, and pause (or cancel) the batch
when its failures or a storm of platform errors say so (workflows/guards.py has those rules);
continue-as-new whenever the run grows long; when every chunk is done, release the batch's
sessions and return the counts.

Chunks are children with ParentClosePolicy.ABANDON. Continue-as-new closes the batch's run, and
any other policy would terminate or cancel every running chunk each time the batch continues.
So the batch never waits on its children's handles: each chunk reports to the batch's workflow
id by signal, which reaches whichever run is current, and a chunk's result (its counts, and
where its rows are in the object store) lands in the history of the run that started it. A
batch that is terminated cannot be
told anything: its chunks stop themselves at their next report, and the reaper destroys what
they leave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.machine_models import CheckBatchInput, ReleaseSessionsInput
    from activities.machines import MachineActivities
    from sortie.labels import BATCH_ID, chunk_workflow_id
    from sortie.models import Counts
    from sortie.pacing import batch_priority
    from sortie.spec import OnTooManyFailures
    from workflows import guards, policies, slots
    from workflows.batch_models import (
        BatchInput,
        BatchOutput,
        BatchState,
        CancelRequest,
        ChunkPlan,
        ChunkState,
        ChunkStatus,
        FailureLimitRequest,
        MaxCostRequest,
        MaxMachinesRequest,
        PausedBy,
        PauseRequest,
        Progress,
        StormMark,
    )
    from workflows.chunk import ChunkWorkflow
    from workflows.chunk_models import ChunkInput, ChunkReport, SlotGrant
    from workflows.messaging import Delivery, deliver
    from workflows.shielded import complete

EVENTS_PER_CHUNK = 4
"""A chunk's events in the run that starts it: start initiated, started, completed, last report."""
PASS_BYTES = 1_000_000
"""Chunk input started in one workflow task at most: the task's commands stay far below the
server's 4 MB message limit (one chunk's input is at most 1 MB, see sortie/batches.py)."""
STARTS_AT_ONCE = 50
"""Chunks started in one workflow task at most, so a run checks its length between passes."""
REPORTS_PER_S = 4.0
"""Progress reports a batch takes from all its chunks together, per second at most. Every
report takes the batch's lock on the server; at about 20 a second a dev server throttled the
batch as a busy workflow (BusyWorkflow), its chunk starts waited 10 s each in the server's
queue and the batch never got to continue-as-new (docs/benchmarks.md, 20,000 jobs)."""
REPORT_EVERY_S = 5.0
"""A chunk's progress reaches its batch at most this late when few chunks run."""


@workflow.defn
class BatchWorkflow:
    """Runs a whole batch; pause, resume, cancel, set_max_machines, set_max_cost and
    set_failure_limit steer it."""

    @workflow.init
    def __init__(self, input: BatchInput) -> None:
        self._input = input
        self._state = input.state or _plan(input)
        self._changed = False
        self._grants: list[asyncio.Future[Delivery]] = []

    @workflow.run
    async def run(self, input: BatchInput) -> BatchOutput:
        """Drive the chunks until every job is done or cancelled."""
        if input.state is None:
            await self._check_batch(input)
        while not self._all_done():
            try:
                await self._drive()
            except asyncio.CancelledError:
                self._cancel(workflow.cancellation_reason() or "cancelled through Temporal")
        if self._state.prompt_jobs:
            await complete(self._release_sessions())
        await asyncio.gather(*self._grants)
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._update_details()
        return self._output()

    # ------------------------------------------------------------ signals and queries

    @workflow.signal
    def chunk_report(self, report: ChunkReport) -> None:
        """A chunk gave back slots, or told how far it is, or that it is done."""
        chunk = self._state.chunks[report.index]
        chunk.slots -= report.released
        chunk.owed = max(0, chunk.owed - report.released)
        if report.seq >= chunk.report_seq:
            chunk.report_seq = report.seq
            chunk.counts = report.counts
            chunk.wants_more = report.wants_more
        if report.errors:
            chunk.errors_seq = max(chunk.errors_seq, report.seq)
        if report.done:
            chunk.status = ChunkStatus.DONE
            chunk.wants_more = False
        self._check_budget()
        self._check_failures()
        self._check_storm(report.errors)
        self._changed = True

    @workflow.signal
    def pause(self, request: PauseRequest | None = None) -> None:
        """Create no new machines; running jobs finish."""
        self._state.paused = True
        self._state.pause_reason = (request or PauseRequest()).reason
        self._state.paused_by = None  # the operator's pause now: no timer resumes it
        self._state.auto_resume_at = None
        self._changed = True

    @workflow.signal
    def resume(self) -> None:
        """Start creating machines again (not while the budget is spent or the failures are
        over their limit: raise it first)."""
        self._resume()

    @workflow.signal
    def set_max_cost(self, request: MaxCostRequest) -> None:
        """Change the budget; a batch paused at its budget then continues on `resume`."""
        self._state.max_cost_usd = request.max_cost_usd
        if self._state.over_budget and self._counts().cost_usd < request.max_cost_usd:
            self._state.pause_reason = (
                f"budget raised to ${request.max_cost_usd:.2f}: send resume to continue"
            )
        self._check_budget()  # a budget lowered below what was spent pauses at once
        self._changed = True

    @workflow.signal
    def set_failure_limit(self, request: FailureLimitRequest) -> None:
        """Change the failure thresholds; a batch paused by them continues on `resume`."""
        state = self._state
        state.failure_limit = guards.changed_limit(state.failure_limit, request)
        if state.paused_by is PausedBy.FAILURES:
            why = guards.too_many_failures(state.failure_limit, self._counts())
            state.pause_reason = (
                "failure limit raised: send resume to continue" if why is None else _failed(why)
            )
        else:
            self._check_failures()  # a limit lowered below what failed acts at once
        self._changed = True

    @workflow.signal
    def cancel(self, request: CancelRequest | None = None) -> None:
        """Create nothing more, destroy running machines, finish with partial results."""
        self._cancel((request or CancelRequest()).reason)

    @workflow.signal
    def set_max_machines(self, request: MaxMachinesRequest) -> None:
        """Change the concurrency cap; lowering it takes effect as running jobs finish."""
        self._state.max_machines = request.max_machines
        self._changed = True

    @workflow.query
    def progress(self) -> Progress:
        """Counts by state, per chunk, and live machines."""
        return Progress(
            batch_id=self._input.batch_id,
            status=self._status(),
            paused=self._state.paused,
            pause_reason=self._state.pause_reason,
            cancelled=self._state.cancelled,
            max_machines=self._state.max_machines,
            max_cost_usd=self._state.max_cost_usd,
            failure_limit=self._state.failure_limit,
            cancel_reason=self._state.cancel_reason,
            counts=self._counts(),
            chunks=[chunk.progress() for chunk in self._state.chunks],
            apps=self._input.apps or [self._input.app],
        )

    # ------------------------------------------------------------ the story

    async def _check_batch(self, input: BatchInput) -> None:
        """Refuse the batch before any machine exists: no such Fly app, or a missing secret."""
        names = input.secrets
        apps = input.apps or [input.app]
        try:
            await workflow.execute_activity_method(
                MachineActivities.check_batch,
                CheckBatchInput(apps=apps, names=names, needs_claude=self._state.prompt_jobs),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=policies.FLY_RETRY,
                summary=f"check Fly app{'s' * (len(apps) > 1)} {', '.join(apps)} "
                "and the batch's secrets",
            )
        except ActivityError as error:
            cause = error.cause if error.cause is not None else error
            raise ApplicationError(f"batch rejected: {cause}", non_retryable=True) from None

    async def _drive(self) -> None:
        """Apply every change (reports, signals) until done, continuing-as-new when long."""
        while not self._all_done():
            self._changed = False
            await complete(self._steer())
            if self._all_done():
                return
            if self._run_is_long():
                await asyncio.gather(*self._grants)
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._input.model_copy(update={"state": self._state}))
            self._update_details()
            await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        """Wait for a report or a signal; a storm pause with `auto_resume_after` ends on a timer."""
        at = self._state.auto_resume_at
        try:
            if at is not None and at <= workflow.now():
                raise TimeoutError
            await workflow.wait_condition(
                lambda: self._changed,
                timeout=None if at is None else at - workflow.now(),
                timeout_summary="resume after the storm pause",
            )
        except TimeoutError:
            workflow.logger.info("the storm pause is over: resuming")
            self._resume()

    async def _steer(self) -> None:
        """Pass on pause, resume and cancel; move slots where they are needed; start chunks."""
        state = self._state
        await self._pass_on_pause_and_cancel()
        running = self._running()
        for chunk in running:  # judged, and paused first if it must: the chunk may go on
            if chunk.errors_seq > chunk.heard_seq:
                chunk.heard_seq = chunk.errors_seq
                self._grant(chunk, SlotGrant(heard=chunk.heard_seq))
        asks = slots.take_back(state.max_machines, running)
        if asks:
            await asyncio.gather(*self._grants)  # no grant may arrive after its take-back
            for chunk in running:
                if ask := asks.get(chunk.index, 0):
                    chunk.owed += ask
                    self._grant(chunk, SlotGrant(give_back=ask))
        if state.cancelled or state.paused:
            return
        while state.pending and not self._run_is_long() and self._may_open():
            await self._start_chunks(self._next_pass())
        running = self._running()
        for index, give in slots.lend(
            slots.free_slots(state.max_machines, running), running
        ).items():
            state.chunks[index].slots += give
            self._grant(state.chunks[index], SlotGrant(grant=give))

    async def _pass_on_pause_and_cancel(self) -> None:
        """Tell every running chunk, in the order they were given, and wait until they heard."""
        state = self._state
        sends: list[Awaitable[Delivery]] = []
        if state.cancelled and not state.told_cancelled:
            state.told_cancelled = True
            request = CancelRequest(reason=state.cancel_reason or "cancelled")
            sends = [self._signal(c, ChunkWorkflow.cancel, request) for c in self._running()]
        elif not state.cancelled and state.told_paused != state.paused:
            state.told_paused = state.paused
            if state.paused:
                pause = PauseRequest(reason=state.pause_reason or "paused")
                sends = [self._signal(c, ChunkWorkflow.pause, pause) for c in self._running()]
            else:
                sends = [self._signal(c, ChunkWorkflow.resume) for c in self._running()]
        await asyncio.gather(*sends)

    def _may_open(self) -> bool:
        state = self._state
        return slots.free_slots(state.max_machines, self._running()) > 0 and slots.may_open(
            state.max_machines, len(self._running()), self._unfinished_chunks()
        )

    def _next_pass(self) -> list[tuple[ChunkPlan, ChunkInput]]:
        """Chunks to start in one workflow task: while one may open, within PASS_BYTES."""
        state = self._state
        starts: list[tuple[ChunkPlan, ChunkInput]] = []
        size = 0
        while (
            state.pending
            and size < PASS_BYTES
            and len(starts) < self._starts_fitting()
            and self._may_open()
        ):
            chunk = state.chunks[state.pending[0].index]
            chunk.slots = slots.opening_window(
                state.max_machines,
                self._unfinished_chunks(),
                slots.free_slots(state.max_machines, self._running()),
                chunk.size,
            )
            plan = state.pending.pop(0)
            chunk.wants_more = chunk.slots < chunk.size
            chunk.status = ChunkStatus.RUNNING
            chunk_input = self._chunk_input(plan, chunk.slots)
            starts.append((plan, chunk_input))
            size += len(chunk_input.model_dump_json())
        return starts

    async def _start_chunks(self, starts: list[tuple[ChunkPlan, ChunkInput]]) -> None:
        """Start chunk children with the windows `_next_pass` gave them."""
        await asyncio.gather(*(self._start_chunk(plan, chunk) for plan, chunk in starts))

    async def _start_chunk(self, plan: ChunkPlan, chunk: ChunkInput) -> None:
        last = plan.first_job + plan.size - 1
        try:
            await workflow.start_child_workflow(
                ChunkWorkflow.run,
                chunk,
                id=self._state.chunks[plan.index].workflow_id,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                priority=batch_priority(self._input.priority, self._input.batch_id),
                search_attributes=TypedSearchAttributes(
                    [SearchAttributePair(BATCH_ID, self._input.batch_id)]
                ),
                static_summary=(
                    f"chunk {plan.index} of batch {self._input.name}: jobs {plan.first_job}-{last}"
                ),
            )
        except WorkflowAlreadyStartedError:
            workflow.logger.info("chunk %s was already started", plan.index)

    def _chunk_input(self, plan: ChunkPlan, window: int) -> ChunkInput:
        """What a chunk starts with: where its jobs are in the store, and its window."""
        return ChunkInput(
            batch_id=self._input.batch_id,
            index=plan.index,
            app=self._input.app,
            apps=self._input.apps,
            claim=self._input.jobs.slice(plan.index),
            slots=window,
            budgeted=self._state.max_cost_usd is not None,
            guarded=self._state.failure_limit.is_set,
            report_every_s=report_every(self._state.max_machines, len(self._state.chunks)),
            tuning=self._input.tuning,
        )

    def _starts_fitting(self) -> int:
        """Chunks one pass may start without taking the run far past its bound of events."""
        room = self._input.tuning.run_events - workflow.info().get_current_history_length()
        return max(1, min(STARTS_AT_ONCE, room // EVENTS_PER_CHUNK))

    def _run_is_long(self) -> bool:
        """Time to continue-as-new: Temporal suggests it, or this run passed its own bound."""
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() > self._input.tuning.run_events
        )

    def _check_budget(self) -> None:
        """Pause the batch once what its jobs spent reaches its budget."""
        state = self._state
        if state.max_cost_usd is None or state.over_budget:
            return
        spent = self._counts().cost_usd
        if spent < state.max_cost_usd:
            return
        state.over_budget = True
        self._pause_itself(f"budget reached: spent ${spent:.4f} of ${state.max_cost_usd:.2f}")

    def _check_failures(self) -> None:
        """Pause (or cancel) the batch once its failed jobs reach its failure limit."""
        state, limit = self._state, self._state.failure_limit
        if not limit.is_set or state.cancelled or state.paused_by is PausedBy.FAILURES:
            return
        why = guards.too_many_failures(limit, self._counts())
        if why is None:
            return
        if limit.on_too_many is OnTooManyFailures.CANCEL:
            self._cancel(f"too many failures: {why}")
        elif not state.paused:
            self._pause_itself(_failed(why), PausedBy.FAILURES)

    def _check_storm(self, errors: dict[str, int]) -> None:
        """Pause the batch when storm errors pass their threshold within the window."""
        state, guard = self._state, self._input.storm
        if guard is None or not errors or state.paused or state.cancelled:
            return
        now = workflow.now()
        marks = [StormMark(at=now, kind=kind, count=n) for kind, n in sorted(errors.items())]
        state.storm_marks = guards.recent([*state.storm_marks, *marks], now, guard)
        why = guards.storm(state.storm_marks, guard)
        if why is None:
            return
        if guard.auto_resume_after is not None:
            state.auto_resume_at = now + timedelta(seconds=guard.auto_resume_after)
            why += f"; resumes by itself at {state.auto_resume_at:%H:%M:%S} UTC, or send resume"
        else:
            why += "; send resume to continue"
        self._pause_itself(why, PausedBy.STORM)

    def _pause_itself(self, reason: str, by: PausedBy | None = None) -> None:
        """The batch pauses on its own: the budget is spent, or a guard tripped."""
        state = self._state
        state.paused, state.pause_reason, state.paused_by = True, reason, by
        if by is not PausedBy.STORM:
            state.auto_resume_at = None

    def _resume(self) -> None:
        """Resume: the storm window starts afresh; the budget and the failure limit still hold."""
        state = self._state
        state.paused, state.pause_reason, state.paused_by = False, None, None
        state.over_budget = False
        state.storm_marks, state.auto_resume_at = [], None
        self._check_budget()
        self._check_failures()
        self._changed = True

    async def _release_sessions(self) -> None:
        """Session archives live as long as the batch, or `keep_sessions` longer."""
        await workflow.execute_activity_method(
            MachineActivities.release_sessions,
            ReleaseSessionsInput(batch_id=self._input.batch_id, keep_s=self._input.keep_sessions_s),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=policies.FLY_RETRY,
            summary="release the batch's session archives",
        )

    def _cancel(self, reason: str) -> None:
        """Mark the batch cancelled; chunks not started yet are skipped."""
        state = self._state
        if state.cancelled:
            return
        state.cancelled = True
        state.cancel_reason = reason
        for plan in state.pending:
            chunk = state.chunks[plan.index]
            chunk.status = ChunkStatus.SKIPPED
            chunk.counts = Counts(total=chunk.size, cancelled=chunk.size)
        state.pending = []
        self._changed = True

    # ------------------------------------------------------------ bookkeeping

    def _grant(self, chunk: ChunkState, grant: SlotGrant) -> None:
        """Send a grant or a take-back without waiting: they add up in any order."""
        self._grants = [g for g in self._grants if not g.done()]
        self._grants.append(asyncio.ensure_future(self._signal(chunk, ChunkWorkflow.grant, grant)))

    def _signal(self, chunk: ChunkState, signal: Any, *arg: Any) -> Awaitable[Delivery]:
        """Signal a chunk; one that has just finished cannot be told, and need not be."""
        handle = workflow.get_external_workflow_handle(chunk.workflow_id)
        return deliver(handle.signal(signal, *arg))

    def _running(self) -> list[ChunkState]:
        return [c for c in self._state.chunks if c.status is ChunkStatus.RUNNING]

    def _unfinished_chunks(self) -> int:
        return len(self._state.pending) + len(self._running())

    def _all_done(self) -> bool:
        return not self._state.pending and not self._running()

    def _counts(self) -> Counts:
        return Counts.total_of([chunk.counts for chunk in self._state.chunks])

    def _status(self) -> str:
        if self._all_done():
            return "cancelled" if self._state.cancelled else "completed"
        if self._state.cancelled:
            return "cancelling"
        return "paused" if self._state.paused else "running"

    def _output(self) -> BatchOutput:
        counts = self._counts()
        return BatchOutput(
            batch_id=self._input.batch_id,
            name=self._input.name,
            status=self._status(),
            total=counts.total,
            succeeded=counts.succeeded,
            failed=counts.failed + counts.timed_out,
            timed_out=counts.timed_out,
            cancelled=counts.cancelled,
            cost_usd=round(counts.cost_usd, 6),
            num_turns=counts.num_turns,
            chunks=[chunk.progress() for chunk in self._state.chunks],
            cancel_reason=self._state.cancel_reason,
        )

    def _update_details(self) -> None:
        """Keep the Web UI's current details in step with the batch."""
        state = self._state
        c = self._counts()
        status = self._status()
        if state.paused and state.pause_reason:
            status += f" ({state.pause_reason})"
        elif state.cancelled and state.cancel_reason:
            status += f" ({state.cancel_reason})"
        budget = f" of ${state.max_cost_usd:.2f}" if state.max_cost_usd else ""
        limit = guards.limit_text(state.failure_limit)
        workflow.set_current_details(
            f"**{c.done}/{c.total} jobs done**, {status}\n\n"
            f"- machines: {c.live_machines} live, cap {state.max_machines}, "
            f"Fly {', '.join(self._input.apps or [self._input.app])}\n"
            f"- spent: ${c.cost_usd:.4f}{budget}, {c.num_turns} Claude turns\n"
            f"- jobs: {c.running} running, {c.pending} pending, {c.succeeded} succeeded, "
            f"{c.failed} failed, {c.timed_out} timed out, {c.cancelled} cancelled"
            + (f" (limit: {limit})" if limit else "")
            + "\n"
            f"- chunks: {len(self._running())} running, {len(state.pending)} not started, "
            f"{len(state.chunks)} in all"
        )


def report_every(max_machines: int, chunks: int) -> float:
    """Seconds between a chunk's progress reports: the chunks that may run at once share
    REPORTS_PER_S between them."""
    return max(REPORT_EVERY_S, min(max_machines, chunks) / REPORTS_PER_S)


def _failed(why: str) -> str:
    """The pause reason of a batch whose failures reached their limit."""
    return f"too many failures: {why}; raise it with set-failure-limit, then resume"


def _plan(input: BatchInput) -> BatchState:
    """Split the jobs into chunks of `chunk_size`, as the starter stored them."""
    plans: list[ChunkPlan] = []
    chunks: list[ChunkState] = []
    claim = input.jobs
    for index, first in enumerate(range(0, claim.total, claim.chunk_size)):
        size = min(claim.chunk_size, claim.total - first)
        plans.append(ChunkPlan(index=index, first_job=first, size=size))
        chunks.append(
            ChunkState(
                index=index,
                workflow_id=chunk_workflow_id(input.batch_id, index),
                first_job=first,
                size=size,
                counts=Counts(total=size, pending=size),
            )
        )
    return BatchState(
        max_machines=input.max_machines,
        max_cost_usd=input.max_cost_usd,
        failure_limit=input.failure_limit,
        prompt_jobs=input.prompt_jobs,
        chunks=chunks,
        pending=plans,
    )
