"""BatchWorkflow: split a batch into chunks and keep at most `max_machines` machines busy.

The batch owns the machine slots. It starts a ChunkWorkflow per chunk with the slots it can
spare, tops up chunks that can use more, and takes slots back as chunks hand them in, so a
freed slot goes to whoever can use it at once. Chunks are started by an activity, not as child
workflows, and report by signal: the batch's history holds counts, never a chunk's results, and
it can continue-as-new to stay bounded for any batch size.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.chunks import start_chunk, start_chunks
    from activities.machines import MachineActivities
    from sortie.labels import BATCH_ID, chunk_workflow_id
    from sortie.models import (
        BatchInput,
        BatchOutput,
        BatchState,
        CancelRequest,
        CheckSecretsInput,
        ChunkInput,
        ChunkPlan,
        ChunkReport,
        ChunkState,
        ChunkStatus,
        Counts,
        MaxCostRequest,
        MaxMachinesRequest,
        PauseRequest,
        Progress,
        ReleaseSessionsInput,
        SlotGrant,
        StartChunkInput,
        StartChunksInput,
    )
    from sortie.spec import resolve_job
    from workflows import policies
    from workflows.chunk import ChunkWorkflow
    from workflows.messaging import tell
    from workflows.shielded import finish


RUN_EVENTS = 2_000
RUN_BYTES = 1_500_000
BOUNDED_RUNS = "bounded-runs"
"""Runs of batches started before this patch continue-as-new only when Temporal suggests it."""
SLOT_SHARE = 4
"""While chunks wait to start, a chunk holds at most 1/SLOT_SHARE of its jobs' worth of slots."""
SLOTS_REUSED_IN_CHUNKS = "slots-reused-in-chunks"
"""Batches started before this patch lent a chunk a slot for each of its jobs."""
CONTINUE_WHILE_STARTING = "continue-as-new-while-starting-chunks"
"""Runs of batches started before this patch kept starting chunks past their bound."""
FAIR_SHARES = "fair-shares-of-slots"
"""Before this patch chunks started one at a time, each with up to a quarter of its jobs' worth
of slots, freed slots went to the oldest chunks first, and the batch could close while a chunk's
last reports were still on their way."""
REPORTS_GRACE = timedelta(seconds=60)
"""How long a finished batch waits for chunk reports still on their way before it closes."""
STARTS_AT_ONCE = 50
"""Chunks one activity starts at once, so a large batch has all its machines busy quickly."""
PASS_BYTES = 400_000
"""...and no more than about this much chunk input in that activity's input, in history: under
the 512 KB at which the server warns of large payloads, so a batch's first machines usually
start from a single pass."""
LARGER_PASSES = "passes-of-400-kb"
"""Batches started before this patch put at most SMALL_PASS_BYTES of chunk input in a pass; a
replay must start the same chunks in each pass, or it would count chunks started that never were."""
SMALL_PASS_BYTES = 256_000
CHUNKS_STARTED_BY_ACTIVITY = "chunks-started-by-activity"
"""A chunk's whole result landed in the batch's history when it was a child; now it is not."""


@workflow.defn
class BatchWorkflow:
    """Runs a whole batch; pause, resume, cancel and set_max_machines steer it."""

    @workflow.init
    def __init__(self, input: BatchInput) -> None:
        self._input = input
        self._state = input.state or _plan(input)
        self._changed = False
        self._capped = False
        self._fair = False
        self._pass_bytes = SMALL_PASS_BYTES
        self._grants: list[asyncio.Future[None]] = []

    @workflow.run
    async def run(self, input: BatchInput) -> BatchOutput:
        """Drive the chunks until every job is done or cancelled."""
        self._capped = workflow.patched(SLOTS_REUSED_IN_CHUNKS)
        self._fair = workflow.patched(FAIR_SHARES)
        if workflow.patched(LARGER_PASSES):
            self._pass_bytes = PASS_BYTES
        if input.state is None:
            await self._check_secrets(input)
        self._show()
        while not self._finished():
            try:
                await self._drive()
            except asyncio.CancelledError:
                self._cancel(workflow.cancellation_reason() or "cancelled through Temporal")
        await self._hear_out()
        await self._delivered()
        if self._state.prompt_jobs:
            await finish(self._release_sessions())
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._show()
        return self._output()

    # ------------------------------------------------------------ signals and queries

    @workflow.signal
    def chunk_report(self, report: ChunkReport) -> None:
        """A chunk handed back slots or reported progress."""
        chunk = self._state.chunks[report.index]
        if chunk.reports is not None:
            chunk.reports += 1
        chunk.slots -= report.released
        chunk.owed = max(0, chunk.owed - report.released)
        if report.seq >= chunk.report_seq:
            chunk.report_seq = report.seq
            chunk.counts = report.counts
            chunk.wants_more = report.wants_more
        if report.done:
            chunk.status = ChunkStatus.DONE
            chunk.wants_more = False
        self._check_budget()
        self._touch()

    @workflow.signal
    def pause(self, request: PauseRequest | None = None) -> None:
        """Create no new machines; running jobs finish."""
        self._state.paused = True
        self._state.pause_reason = (request or PauseRequest()).reason
        self._touch()

    @workflow.signal
    def resume(self) -> None:
        """Start creating machines again (not while the budget is spent: raise it first)."""
        self._state.paused = False
        self._state.pause_reason = None
        self._state.over_budget = False
        self._check_budget()
        self._touch()

    @workflow.signal
    def set_max_cost(self, request: MaxCostRequest) -> None:
        """Change the budget; a batch paused at its budget then continues on `resume`."""
        self._state.max_cost_usd = request.max_cost_usd
        if self._state.over_budget and self._counts().cost_usd < request.max_cost_usd:
            self._state.pause_reason = (
                f"budget raised to ${request.max_cost_usd:.2f}: send resume to continue"
            )
        self._check_budget()  # a budget lowered below what was spent pauses at once
        self._touch()

    @workflow.signal
    def cancel(self, request: CancelRequest | None = None) -> None:
        """Create nothing more, destroy running machines, finish with partial results."""
        self._cancel((request or CancelRequest()).reason)

    @workflow.signal
    def set_max_machines(self, request: MaxMachinesRequest) -> None:
        """Change the concurrency cap; lowering it takes effect as running jobs finish."""
        self._state.max_machines = request.max_machines
        self._touch()

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
            counts=self._counts(),
            chunks=self._state.chunks,
        )

    # ------------------------------------------------------------ the story

    async def _check_secrets(self, input: BatchInput) -> None:
        """Refuse the batch before any machine exists if the worker lacks a named secret."""
        names = sorted(
            {*(input.defaults.secrets or [])}.union(*(job.secrets or [] for job in input.jobs))
        )
        if not names and not self._state.prompt_jobs:
            return
        try:
            await workflow.execute_activity_method(
                MachineActivities.check_secrets,
                CheckSecretsInput(names=names, needs_claude=self._state.prompt_jobs),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=policies.FLY_RETRY,
                summary="check the batch's secrets exist on the worker",
            )
        except ActivityError as error:
            cause = error.cause if error.cause is not None else error
            raise ApplicationError(f"batch rejected: {cause}", non_retryable=True) from None

    async def _drive(self) -> None:
        """Apply every change (reports, signals) until done, continuing-as-new when long."""
        while not self._finished():
            self._changed = False
            await finish(self._sync())
            if self._finished():
                return
            if self._run_is_long():
                await self._delivered()
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    self._input.model_copy(update={"jobs": [], "state": self._state})
                )
            self._show()
            await workflow.wait_condition(lambda: self._changed)

    async def _sync(self) -> None:
        """Tell chunks about pause, resume and cancel; lend free slots; start chunks."""
        state = self._state
        sends: list[Awaitable[None]] = []
        running = self._running()
        for chunk in running:
            if state.cancelled and not chunk.told_cancel:
                chunk.told_cancel = True
                request = CancelRequest(reason=state.cancel_reason or "cancelled")
                sends.append(self._tell(chunk, ChunkWorkflow.cancel, request))
            elif not state.cancelled and chunk.told_paused != state.paused:
                chunk.told_paused = state.paused
                if state.paused:
                    request_p = PauseRequest(reason=state.pause_reason or "paused")
                    sends.append(self._tell(chunk, ChunkWorkflow.pause, request_p))
                else:
                    sends.append(self._tell(chunk, ChunkWorkflow.resume))
        if self._fair and sum(c.slots - c.owed for c in running) > state.max_machines:
            await self._delivered()  # a grant still on its way would be used after the take-back
        grants = self._take_back(running)
        if not state.cancelled and not state.paused:
            grants += self._lend(running)
        if self._fair:
            self._send_in_background(grants)
            grants = []
        if not state.cancelled and not state.paused:
            # Each start is an activity: while slots free up this loop could run for
            # thousands of events, so it stops as soon as the run is long enough to continue.
            while self._free() > 0 and state.pending and not self._long_while_starting():
                if not self._fair:
                    await self._start_chunk(self._prepare(state.pending.pop(0)))
                    continue
                await self._start_chunks(self._next_starts())
            if self._capped and not state.pending:
                grants += self._lend(self._running())  # no chunk waits: the others may grow
        if self._fair:
            self._send_in_background(grants)
        else:
            sends += grants
        await asyncio.gather(*sends)

    def _send_in_background(self, grants: list[Awaitable[None]]) -> None:
        """Send slot grants without waiting for their delivery: they add up in any order.

        Waiting would hold every other change (a report, a freed slot) until the server had
        delivered them, which under load takes seconds. Pause, resume and cancel are still
        awaited, so they arrive in the order they were given.
        """
        self._grants = [g for g in self._grants if not g.done()]
        self._grants += [asyncio.ensure_future(g) for g in grants]

    async def _delivered(self) -> None:
        """Wait until every grant sent in the background has been delivered."""
        await asyncio.gather(*self._grants)
        self._grants = []

    def _take_back(self, running: list[ChunkState]) -> list[Awaitable[None]]:
        """Ask the newest chunks to give slots back when the cap was lowered."""
        sends: list[Awaitable[None]] = []
        excess = sum(c.slots - c.owed for c in running) - self._state.max_machines
        for chunk in reversed(running):
            ask = min(excess, chunk.slots - chunk.owed)
            if ask > 0:
                chunk.owed += ask
                excess -= ask
                sends.append(self._tell(chunk, ChunkWorkflow.grant, SlotGrant(give_back=ask)))
        return sends

    def _lend(self, running: list[ChunkState]) -> list[Awaitable[None]]:
        """Give free slots to running chunks that still have jobs to start."""
        if self._fair:
            return self._lend_evenly(running)
        sends: list[Awaitable[None]] = []
        for chunk in running:
            give = min(self._free(), self._slot_cap(chunk.size) - chunk.slots)
            if chunk.wants_more and not chunk.owed and give > 0:
                chunk.slots += give
                sends.append(self._tell(chunk, ChunkWorkflow.grant, SlotGrant(grant=give)))
        return sends

    def _lend_evenly(self, running: list[ChunkState]) -> list[Awaitable[None]]:
        """Give each free slot to the chunk with the most unfinished jobs per slot.

        The chunk that would finish last gets the slot, so chunks finish together and no slot
        idles at the end while one chunk still works through a queue of its own.
        """
        free = self._free()
        given: dict[int, int] = {}
        queue: list[tuple[float, int, ChunkState]] = []
        for chunk in running:
            if chunk.wants_more and not chunk.owed:
                heapq.heappush(queue, (-_per_slot(chunk), chunk.index, chunk))
        while free > 0 and queue:
            _, index, chunk = heapq.heappop(queue)
            if chunk.slots >= min(self._slot_cap(chunk.size), _unfinished(chunk)):
                continue
            chunk.slots += 1
            free -= 1
            given[index] = given.get(index, 0) + 1
            heapq.heappush(queue, (-_per_slot(chunk), index, chunk))
        chunks = self._state.chunks
        return [
            self._tell(chunks[i], ChunkWorkflow.grant, SlotGrant(grant=n)) for i, n in given.items()
        ]

    def _prepare(self, plan: ChunkPlan) -> ChunkPlan:
        """Give a chunk about to start as many slots as are free, up to its share."""
        chunk = self._state.chunks[plan.index]
        chunk.slots = min(self._free(), len(plan.jobs), self._slot_cap(len(plan.jobs)))
        chunk.wants_more = chunk.slots < len(plan.jobs)
        chunk.status = ChunkStatus.RUNNING
        return plan

    def _next_starts(self) -> list[StartChunkInput]:
        """The chunks to start in one pass: while slots are free, within a pass's size."""
        state = self._state
        starts: list[StartChunkInput] = []
        size = 0
        while self._free() > 0 and state.pending and len(starts) < STARTS_AT_ONCE:
            start = self._start_input(self._prepare(state.pending[0]))  # its share counts it
            state.pending.pop(0)
            starts.append(start)
            size += len(start.model_dump_json())
            if size >= self._pass_bytes:
                break
        return starts

    async def _start_chunks(self, starts: list[StartChunkInput]) -> None:
        """Start chunk workflows with the slots `_prepare` gave them, in one activity."""
        first, last = starts[0].chunk.index, starts[-1].chunk.index
        await workflow.execute_activity(
            start_chunks,
            StartChunksInput(chunks=starts),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=policies.FLY_RETRY,
            summary=f"start chunks {first}-{last}" if last > first else f"start chunk {first}",
        )

    def _start_input(self, plan: ChunkPlan) -> StartChunkInput:
        """What starts a chunk: its resolved jobs, its slots, and what the UI shows of it."""
        chunk = self._state.chunks[plan.index]
        jobs = [
            resolve_job(self._input.defaults, job, plan.first_job + i)
            for i, job in enumerate(plan.jobs)
        ]
        last = plan.first_job + len(plan.jobs) - 1
        return StartChunkInput(
            workflow_id=chunk.workflow_id,
            chunk=ChunkInput(
                batch_id=self._input.batch_id,
                batch_workflow_id=workflow.info().workflow_id,
                index=plan.index,
                app=self._input.app,
                jobs=jobs,
                slots=chunk.slots,
                budgeted=self._state.max_cost_usd is not None,
                tuning=self._input.tuning,
            ),
            summary=f"chunk {plan.index} of batch {self._input.name}: jobs {plan.first_job}-{last}",
            details=f"Jobs: {', '.join(j.id for j in plan.jobs)}",
        )

    async def _start_chunk(self, plan: ChunkPlan) -> None:
        """Before FAIR_SHARES: start one chunk workflow with the slots `_prepare` gave it."""
        start = self._start_input(plan)
        last = plan.first_job + len(plan.jobs) - 1
        if workflow.patched(CHUNKS_STARTED_BY_ACTIVITY):
            await workflow.execute_activity(
                start_chunk,
                start,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=policies.FLY_RETRY,
                summary=f"start chunk {plan.index} (jobs {plan.first_job}-{last})",
            )
            return
        # Batches started before the patch: chunks are abandoned children.
        await workflow.start_child_workflow(
            ChunkWorkflow.run,
            start.chunk,
            id=start.workflow_id,
            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(BATCH_ID, self._input.batch_id)]
            ),
            static_summary=start.summary,
            static_details=start.details,
        )

    def _slot_cap(self, size: int) -> int:
        """Slots a chunk of `size` jobs may hold while other chunks wait: its share, or a quarter.

        A slot a chunk holds runs its next job at once; one handed back costs a signal and a
        workflow task on each side before another chunk can use it. So while chunks wait to
        start, more chunks run with fewer slots each, and each slot runs several jobs in place.
        """
        if not self._capped or not self._state.pending:
            return size
        quarter = max(1, -(-size // SLOT_SHARE))
        if not self._fair:
            return quarter
        share = self._state.max_machines // len(self._state.chunks)
        # More chunks than slots: a share of one slot would run hundreds of chunks at once,
        # each reporting to the batch; the quarter keeps them few, as before the fair shares.
        return max(1, min(quarter, share)) if share >= 1 else quarter

    def _run_is_long(self) -> bool:
        """Time to continue-as-new: Temporal suggests it, or this run passed our own bounds.

        Our bounds are well below Temporal's suggestion (4,096 events or 4 MB), so a worker that
        lost its cache replays a short history: on a loaded machine a long replay can outlast
        the workflow task timeout again and again.
        """
        info = workflow.info()
        if info.is_continue_as_new_suggested():
            return True
        long = (
            info.get_current_history_length() > RUN_EVENTS
            or info.get_current_history_size() > RUN_BYTES
        )
        return long and workflow.patched(BOUNDED_RUNS)

    def _long_while_starting(self) -> bool:
        """Stop starting chunks to continue-as-new (runs from before the patch did not)."""
        return self._run_is_long() and workflow.patched(CONTINUE_WHILE_STARTING)

    def _check_budget(self) -> None:
        """Pause the batch once what its jobs spent reaches its budget."""
        state = self._state
        if state.max_cost_usd is None or state.over_budget:
            return
        spent = sum(chunk.counts.cost_usd for chunk in state.chunks)
        if spent < state.max_cost_usd:
            return
        state.over_budget = True
        state.paused = True
        state.pause_reason = f"budget reached: spent ${spent:.4f} of ${state.max_cost_usd:.2f}"

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
            chunk.skipped_job_ids = [job.id for job in plan.jobs]
            chunk.counts = Counts(total=chunk.size, cancelled=chunk.size)
        state.pending = []
        self._touch()

    # ------------------------------------------------------------ bookkeeping

    def _tell(self, chunk: ChunkState, signal: Any, *arg: Any) -> Awaitable[None]:
        """Signal a chunk; one that has just finished cannot be told, and need not be."""
        handle = workflow.get_external_workflow_handle(chunk.workflow_id)
        return tell(handle.signal(signal, *arg), chunk.workflow_id)

    def _running(self) -> list[ChunkState]:
        return [c for c in self._state.chunks if c.status is ChunkStatus.RUNNING]

    def _free(self) -> int:
        return self._state.max_machines - sum(c.slots for c in self._running())

    def _finished(self) -> bool:
        return not self._state.pending and not self._running()

    def _heard_out(self) -> bool:
        """Every report the chunks sent has arrived (their last one says how many they sent)."""
        return all(c.reports is None or c.reports >= c.report_seq for c in self._state.chunks)

    async def _hear_out(self) -> None:
        """Close with no report on its way, which would fail the closing task; wait a while."""
        if not self._fair or self._heard_out():
            return
        try:
            await workflow.wait_condition(self._heard_out, timeout=REPORTS_GRACE)
        except TimeoutError:
            workflow.logger.warning("closing without every chunk report after %s", REPORTS_GRACE)

    def _touch(self) -> None:
        self._changed = True

    def _counts(self) -> Counts:
        """The batch's counts: every chunk's added up (one model built, not one per chunk)."""
        fields = Counts.model_fields
        total = dict.fromkeys(fields, 0)
        for chunk in self._state.chunks:
            counts = chunk.counts
            for name in fields:
                total[name] += getattr(counts, name)
        return Counts(**total)

    def _status(self) -> str:
        if self._finished():
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
            chunks=self._state.chunks,
            cancel_reason=self._state.cancel_reason,
        )

    def _show(self) -> None:
        """Keep the Web UI's current details in step with the batch."""
        c = self._counts()
        done = c.succeeded + c.failed + c.timed_out + c.cancelled
        status = self._status()
        if self._state.paused and self._state.pause_reason:
            status += f" ({self._state.pause_reason})"
        budget = f" of ${self._state.max_cost_usd:.2f}" if self._state.max_cost_usd else ""
        running = len(self._running())
        workflow.set_current_details(
            f"**{done}/{c.total} jobs done**, {status}\n\n"
            f"- machines: {c.live_machines} live, cap {self._state.max_machines}\n"
            f"- spent: ${c.cost_usd:.4f}{budget}, {c.num_turns} Claude turns\n"
            f"- jobs: {c.running} running, {c.pending} pending, {c.succeeded} succeeded, "
            f"{c.failed} failed, {c.timed_out} timed out, {c.cancelled} cancelled\n"
            f"- chunks: {running} running, {len(self._state.pending)} not started, "
            f"{len(self._state.chunks)} in all"
        )


def _plan(input: BatchInput) -> BatchState:
    """Split the jobs into chunks of `chunk_size`."""
    plans: list[ChunkPlan] = []
    chunks: list[ChunkState] = []
    for index, first in enumerate(range(0, len(input.jobs), input.chunk_size)):
        jobs = input.jobs[first : first + input.chunk_size]
        plans.append(ChunkPlan(index=index, first_job=first, jobs=jobs))
        chunks.append(
            ChunkState(
                index=index,
                workflow_id=chunk_workflow_id(input.batch_id, index),
                first_job=first,
                size=len(jobs),
                reports=0,
                counts=Counts(total=len(jobs), pending=len(jobs)),
            )
        )
    prompts = input.defaults.prompt is not None or any(j.prompt is not None for j in input.jobs)
    return BatchState(
        max_machines=input.max_machines,
        max_cost_usd=input.max_cost_usd,
        prompt_jobs=prompts,
        chunks=chunks,
        pending=plans,
    )


def _unfinished(chunk: ChunkState) -> int:
    """Jobs of the chunk not finished at its last report: the most slots it can use."""
    return chunk.counts.pending + chunk.counts.running


def _per_slot(chunk: ChunkState) -> float:
    """Unfinished jobs per slot: how long the chunk has left to run, in rounds."""
    return _unfinished(chunk) / chunk.slots if chunk.slots else float("inf")
