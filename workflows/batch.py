"""BatchWorkflow: split a batch into chunk child workflows and keep at most `max_machines` busy.

The story: check the batch's apps and secrets; start chunks as children, each with a window of
machine slots (workflows/slots.py has every rule), one pass of starts at a time beside the
story, so pause and cancel never wait for starts; as chunks report back by signal (to the
batch's workflow id: whichever run is current hears it), lend freed slots, start waiting
chunks, pass on pause, resume and cancel, and pause or cancel the batch when its budget,
failures or a storm of platform errors say so (workflows/guards.py); continue-as-new whenever
the run grows long; when every chunk is done, release the batch's sessions, tell the batch's
webhook (`notify`: its end, and each pause as it happens; workflows/batch_calls.py) and return
counts.
Chunks are abandoned children (continue-as-new closes the run) that leave their rows in the
object store: only their counts reach the batch's history, in their result, never a signal
(workflows/chunk_ends.py). With `reuse_machines` waiting machines travel with slots, and the
batch destroys those no job will take (workflows/retiring.py). A terminated batch's chunks stop
themselves at their next report, and the reaper destroys what they leave.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.chunk_models import ChunkEnd
    from sortie.models import Counts
    from sortie.notify import NotifyEvent
    from workflows import batch_calls, chunk_ends, chunk_starts, guards, slots
    from workflows.batch_models import (
        BatchInput,
        BatchOutput,
        CancelRequest,
        ChunkPlan,
        ChunkStatus,
        FailureLimitRequest,
        MaxCostRequest,
        MaxMachinesRequest,
        PauseRequest,
        Progress,
        Steering,
        output,
        plan,
        progress,
    )
    from workflows.chunk import ChunkWorkflow
    from workflows.chunk_models import ChunkInput, ChunkReport, SlotGrant
    from workflows.messaging import deliver
    from workflows.retiring import Retiring
    from workflows.shielded import complete, evicting

END_ROOM = 20
"""A run keeps 1/20 of `run_events` free for what lands as it gets ready to continue-as-new."""


@workflow.defn
class BatchWorkflow:
    """Runs a whole batch; pause, resume, cancel, set_max_machines, set_max_cost and
    set_failure_limit steer it."""

    @workflow.init
    def __init__(self, input: BatchInput) -> None:
        self._input = input
        self._state = input.state or plan(input)
        self._changed = False
        self._machines = Retiring(input, self._state, self._change)
        self._starting: set[int] = set()
        """Chunks whose start is in flight: they cannot be told anything yet."""
        self._pass: asyncio.Task[None] | None = None
        self._notices: list[asyncio.Task[None]] = []
        self._ends: list[asyncio.Task[None]] = []
        self._inherited = {c.index for c in self._state.running()}
        """Chunks a run before this one started: this run cannot hear their results."""

    @workflow.run
    async def run(self, input: BatchInput) -> BatchOutput:
        """Drive the chunks until every job is done or cancelled."""
        if input.state is None:
            await batch_calls.check_batch(input, self._state)
        watching = asyncio.create_task(self._watch_inherited())
        while not self._state.all_done():
            try:
                await self._drive()
            except asyncio.CancelledError:
                if evicting():
                    raise
                self._cancel(workflow.cancellation_reason() or "cancelled through Temporal")
        self._machines.retire(self._state.pool.drain())
        await complete(self._machines.quiet())
        if self._state.prompt_jobs:
            await complete(batch_calls.release_sessions(input))
        await asyncio.gather(*self._notices, watching)
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.set_current_details(guards.details(self._state, self._input.every_app()))
        ended = NotifyEvent.CANCELLED if self._state.cancelled else NotifyEvent.COMPLETED
        await complete(batch_calls.notify(input, self._state, ended, self._state.cancel_reason))
        return output(self._input, self._state)

    # ------------------------------------------------------------ signals and queries

    @workflow.signal
    def chunk_report(self, report: ChunkReport) -> None:
        """A chunk gave back slots, or told how far it is."""
        chunk = self._state.chunks[report.index]
        self._state.pool.put(report.machines, workflow.now())
        chunk.slots -= report.released
        chunk.owed = max(0, chunk.owed - report.released)
        if report.seq >= chunk.report_seq:
            chunk.report_seq = report.seq
            chunk.counts = report.counts
            chunk.wants_more = report.wants_more
        if report.errors:
            chunk.errors_seq = max(chunk.errors_seq, report.seq)
        self._check_guards()
        guards.check_storm(self._state, self._input.storm, report.errors, report.resting_until)
        self._changed = True

    @workflow.signal
    def pause(self, request: PauseRequest | None = None) -> None:
        """Create no new machines; running jobs finish."""
        guards.pause(self._state, (request or PauseRequest()).reason)  # no timer resumes it
        self._changed = True

    @workflow.signal
    def resume(self) -> None:
        """Start creating machines again (not while the budget is spent or the failures are
        over their limit: raise it first)."""
        guards.resume(self._state)
        self._check_guards()
        self._changed = True

    @workflow.signal
    def set_max_cost(self, request: MaxCostRequest) -> None:
        """Change the budget; a batch paused at its budget then continues on `resume`."""
        guards.set_max_cost(self._state, request.max_cost_usd)
        self._changed = True

    @workflow.signal
    def set_failure_limit(self, request: FailureLimitRequest) -> None:
        """Change the failure thresholds; a batch paused by them continues on `resume`."""
        if not guards.set_failure_limit(self._state, request):
            self._check_guards()  # a limit lowered below what failed acts at once
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
        return progress(self._input, self._state)

    # ------------------------------------------------------------ the story

    async def _drive(self) -> None:
        """Apply every change (reports, signals, starts landed) until done, continuing-as-new
        when long once no start is in flight."""
        while not self._state.all_done():
            self._changed = False
            await complete(self._steer())
            if self._state.all_done():
                return
            if self._state.pauses > self._state.pauses_told:
                self._state.pauses_told = self._state.pauses
                paused = batch_calls.notify(self._input, self._state, NotifyEvent.PAUSED)
                self._notices.append(asyncio.create_task(paused))
            if self._run_is_long() and not self._starting:
                await asyncio.gather(self._machines.quiet(), *self._notices)
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._input.model_copy(update={"state": self._state}))
            workflow.set_current_details(guards.details(self._state, self._input.every_app()))
            await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        """Wait for a report or a signal; a storm pause ends on a timer (at the earliest end of a
        credential rest when every credential rests, else after `auto_resume_after`), and a
        waiting machine goes once it waited `reuse_idle`."""
        resume_at, expiry = self._state.auto_resume_at, self._machines.expiry()
        at = min((t for t in (resume_at, expiry) if t is not None), default=None)
        try:
            if at is not None and at <= workflow.now():
                raise TimeoutError
            await workflow.wait_condition(
                lambda: self._changed,
                timeout=None if at is None else at - workflow.now(),
                timeout_summary="resume after the storm pause, or destroy idle machines",
            )
        except TimeoutError:
            if expiry is not None and expiry <= workflow.now():
                self._machines.retire_expired()
            if resume_at is not None and resume_at <= workflow.now():
                workflow.logger.info("the storm pause is over: resuming")
                self.resume()

    async def _steer(self) -> None:
        """Pass on pause, resume and cancel; move slots where they are needed; start chunks."""
        state = self._state
        await self._tell_chunks()
        told = [c for c in state.running() if c.index not in self._starting]
        for chunk in told:  # judged, and paused first if it must: the chunk may go on
            if chunk.errors_seq > chunk.heard_seq:
                chunk.heard_seq = chunk.errors_seq
                self._machines.grant(chunk, SlotGrant(heard=chunk.heard_seq))
        self._machines.retire_unneeded()
        asks = slots.take_back(state.max_machines, state.running())
        if any(asks.get(chunk.index) for chunk in told):
            await asyncio.gather(*self._machines.grants)  # no grant may arrive after its take-back
            for chunk in told:
                if ask := asks.get(chunk.index, 0):
                    chunk.owed += ask
                    self._machines.grant(chunk, SlotGrant(give_back=ask))
        if state.cancelled or state.paused:
            return
        if (self._pass is None or self._pass.done()) and self._may_open():
            self._pass = asyncio.create_task(self._start_pass(self._next_pass()))
        if self._may_open():
            return  # the next pass takes the free slots
        for index, give in slots.lend(self._machines.free(), told).items():
            state.chunks[index].slots += give
            grant = SlotGrant(grant=give, machines=state.pool.take_many(give))
            self._machines.grant(state.chunks[index], grant)

    async def _tell_chunks(self) -> None:
        """Tell each started chunk to run, pause or cancel when it has not heard it yet, in the
        order they were given, and wait until they heard."""
        state, sends = self._state, []
        for chunk in state.running():
            if chunk.index in self._starting or chunk.told in (state.steering, Steering.CANCEL):
                continue
            chunk.told = state.steering
            handle = workflow.get_external_workflow_handle(chunk.workflow_id)
            if chunk.told is Steering.CANCEL:
                request = CancelRequest(reason=state.cancel_reason or "cancelled")
                sends.append(deliver(handle.signal(ChunkWorkflow.cancel, request)))
            elif chunk.told is Steering.PAUSE:
                pause = PauseRequest(reason=state.pause_reason or "paused")
                sends.append(deliver(handle.signal(ChunkWorkflow.pause, pause)))
            else:
                sends.append(deliver(handle.signal(ChunkWorkflow.resume)))
        await asyncio.gather(*sends)

    def _may_open(self) -> bool:
        """Another chunk may start: the run has room, and a slot and a chunk wait."""
        state = self._state
        return (
            bool(state.pending)
            and not self._run_is_long()
            and self._machines.free() > 0
            and slots.may_open(state.max_machines, len(state.running()), state.unfinished())
        )

    def _next_pass(self) -> list[tuple[ChunkPlan, ChunkInput]]:
        """Chunks to start in one workflow task: while one may open, within PASS_BYTES."""
        state = self._state
        room = self._run_bound() - workflow.info().get_current_history_length()
        most = chunk_starts.pass_size(room)
        starts: list[tuple[ChunkPlan, ChunkInput]] = []
        size = 0
        while size < chunk_starts.PASS_BYTES and len(starts) < most and self._may_open():
            chunk = state.chunks[state.pending[0].index]
            free = self._machines.free()
            chunk.slots = slots.opening_window(
                state.max_machines, state.unfinished(), free, chunk.size
            )
            chunk.wants_more = chunk.slots < chunk.size
            chunk.status = ChunkStatus.RUNNING
            self._starting.add(chunk.index)
            starts.append(
                (state.pending.pop(0), chunk_starts.chunk_input(self._input, state, chunk))
            )
            size += len(starts[-1][1].model_dump_json())
        return starts

    async def _start_pass(self, starts: list[tuple[ChunkPlan, ChunkInput]]) -> None:
        """Start a pass's chunks; each one can be told things once its start has landed."""
        await asyncio.gather(*(self._start_chunk(plan, chunk) for plan, chunk in starts))
        self._changed = True

    async def _start_chunk(self, plan: ChunkPlan, chunk: ChunkInput) -> None:
        workflow_id = self._state.chunks[plan.index].workflow_id
        try:
            started = await chunk_starts.start(self._input, plan, chunk, workflow_id)
        except WorkflowAlreadyStartedError:
            workflow.logger.info("chunk %s was already started", plan.index)
            self._machines.retire(chunk.machines)  # the chunk never had them
            self._inherited.add(plan.index)  # not this run's child: watched
        else:
            self._ends.append(asyncio.create_task(self._hear_end(plan.index, started)))
        self._starting.discard(plan.index)
        self._changed = True

    async def _hear_end(self, index: int, chunk: workflow.ChildWorkflowHandle[Any, Any]) -> None:
        self._ended(index, await chunk_ends.result_of(chunk))

    async def _watch_inherited(self) -> None:
        """Hear the end of the chunks a run before this one started, a few at a time."""
        while watched := [c for c in self._state.running() if c.index in self._inherited]:
            ids = {c.workflow_id: c.index for c in watched}
            for end in await chunk_ends.watch(list(ids), self._input.tuning):
                self._ended(ids[end.workflow_id], end)

    def _ended(self, index: int, end: ChunkEnd) -> None:
        """A chunk closed: its counts are final (workflows/chunk_ends.py)."""
        if chunk_ends.record(self._state, index, end):
            self._check_guards()
            self._changed = True

    def _run_is_long(self) -> bool:
        """Time to continue-as-new: Temporal suggests it, or this run passed its own bound."""
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() > self._run_bound()
        )

    def _run_bound(self) -> int:
        """Events after which the run continues-as-new, the room for what comes meanwhile kept."""
        return self._input.tuning.run_events - self._input.tuning.run_events // END_ROOM

    def _check_guards(self) -> None:
        """Pause at the budget or the failure limit; cancel if the limit says so."""
        guards.check_budget(self._state)
        if (why := guards.check_failures(self._state)) is not None:
            self._cancel(why)

    def _cancel(self, reason: str) -> None:
        """Mark the batch cancelled; chunks not started yet are skipped."""
        state = self._state
        if state.cancelled:
            return
        state.cancelled, state.cancel_reason = True, reason
        for plan in state.pending:
            chunk = state.chunks[plan.index]
            chunk.status = ChunkStatus.SKIPPED
            chunk.counts = Counts(total=chunk.size, cancelled=chunk.size)
        state.pending = []
        self._changed = True

    def _change(self) -> None:
        self._changed = True
