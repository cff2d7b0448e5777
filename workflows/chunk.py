"""ChunkWorkflow: run a slice of a batch's jobs, at most its window of them at once.

A chunk is a child workflow of its batch. It reads its own jobs from the object store first
(`load_jobs`, digest checked), then starts a job whenever fewer jobs run than its window of
machine slots holds. A job is: create its machine through the app's create queue, then
`finish_job` (wait, collect, destroy), then the shielded destroy whenever `finish_job` did not
destroy it (workflows/job_steps.py); a new machine after each infrastructure failure, up to the
job's retries (with twice the memory after an OOM kill, by the job's `on_oom`); a job that finds
every Claude credential resting waits, with no machine, until the earliest rest is over. With
`reuse_machines` a machine whose job ended cleanly stays, stopped, with its slot, for the next
job of its app; waiting machines go back to the batch with their slots, in a report or, at the
chunk's end, in its result (workflows/pool.py). Under
a budget, what a running job's verify loop spends reaches the chunk as it happens (`spent`, from
`finish_job`) and the batch at once, in the chunk's counts beside what finished jobs spent. The
batch widens the window (a grant) or asks slots back (when its cap is lowered); the chunk gives
slots back as soon as it has nothing left to start, so another chunk can use them, and reports
how far it is (workflows/reports.py). Once every job is final, the chunk leaves its rows in the
object store and returns its counts and where the rows are: its end reaches the batch as its
result, not as a signal.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.chunk_models import ChunkOutput
    from activities.machine_models import Spend
    from activities.metrics import JOBS_FINISHED, JOBS_STARTED
    from sortie.models import CREDENTIALS_RESTING, Counts, Followup, JobResult, JobState, MachineRef
    from sortie.spec import Job
    from workflows import chunk_models as models
    from workflows import guards, job_steps
    from workflows.batch_models import CancelRequest, PauseRequest
    from workflows.chunk_models import ChunkInput, SlotGrant
    from workflows.chunk_store import load_jobs, store_rows
    from workflows.job_steps import CredentialsRest, InfrastructureFailure
    from workflows.outcomes import is_cancellation, record_outcome, why
    from workflows.pool import Pool, retire_idle
    from workflows.reports import Reporter
    from workflows.shielded import complete, evicting


@workflow.defn
class ChunkWorkflow:
    """Runs its jobs within the machine slots the batch grants it."""

    @workflow.init
    def __init__(self, input: ChunkInput) -> None:
        self._input = input
        self._results: list[JobResult] = []
        self._queue: deque[Job] = deque()
        self._loaded = False
        self._continues: dict[str, Followup] = {}
        self._slots, self._owed, self._running, self._live = input.slots, 0, 0, 0
        self._pool, self._handing, self._created = Pool(), list[MachineRef](), 0
        self._pool.put(input.machines, workflow.now())
        self._closing, self._retiring = False, 0
        self._claims: dict[int, job_steps.Claim] = {}
        """What a job started took from the waiting machines, until its first attempt."""
        self._paused = input.paused
        self._cancel_reason: str | None = None
        self._jobs: list[asyncio.Task[None]] = []
        self._spending: dict[int, Spend] = {}
        """What running attempts' verify loops have spent so far, by job index."""
        self._heard, self._released = 0, 0
        self._reports = Reporter(
            input.index, input.report_every_s, input.report_phase_s, self._now, self._cancel
        )
        meter = workflow.metric_meter()
        self._jobs_started = meter.create_counter(JOBS_STARTED, "jobs started")
        self._jobs_finished = meter.create_counter(JOBS_FINISHED, "jobs in a final state")

    @workflow.run
    async def run(self, input: ChunkInput) -> ChunkOutput:
        """Start each job as a slot frees up, wait for all of them, leave the rows in the store."""
        idle = retire_idle(self._pool, input.reuse_idle_s, self._idling, self._destroy_all)
        idling = asyncio.create_task(idle)
        try:
            await complete(self._load_jobs())
            self._update_details()
            while await self._next_start():
                self._start(self._queue.popleft())
            self._give_back_idle()
            await asyncio.gather(*self._jobs)
        except asyncio.CancelledError:
            if evicting():
                raise
            self._cancel(workflow.cancellation_reason() or "chunk cancelled through Temporal")
            await asyncio.gather(*self._jobs)
        self._closing = True
        for claimed in self._claims.values():  # jobs cancelled before their first attempt
            self._pool.put(claimed.machines(), workflow.now())
        await complete(idling)
        for result in self._results:
            if not result.state.final:
                result.state, result.error = JobState.CANCELLED, self._cancel_reason
        await complete(self._reports.close())  # no more reports: the end is the result
        rows = await complete(store_rows(input.batch_id, self._results, input.tuning))
        self._released, self._slots = self._released + self._slots, 0
        if self._cancelled or workflow.info().parent is None:  # no batch takes them back
            await complete(self._destroy_all(self._pool.drain()))
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._update_details()
        machines = [*self._handing, *self._pool.drain()]  # with any a late grant brought
        return ChunkOutput(index=input.index, counts=self._counts(), rows=rows, machines=machines)

    # ------------------------------------------------------------ signals and queries

    @workflow.signal
    def grant(self, grant: SlotGrant) -> None:
        """The batch adds slots, or asks for some back as jobs finish."""
        self._slots += grant.grant
        self._pool.put(grant.machines, workflow.now())
        self._owed += grant.give_back
        self._heard = max(self._heard, grant.heard)
        self._give_back_idle()

    @workflow.signal
    def spent(self, spend: Spend) -> None:
        """A running job's verify loop spent more: the batch's budget counts it at once."""
        first = self._results[0].index if self._results else 0
        if not 0 <= spend.index - first < len(self._results):
            return
        result = self._results[spend.index - first]
        known = self._spending.get(spend.index)
        if result.state is not JobState.RUNNING or result.attempts != spend.attempt:
            return  # an attempt that ended already: its report counts
        if known is not None and known.cost_usd >= spend.cost_usd:
            return
        self._spending[spend.index] = spend
        self._reports.send()

    @workflow.signal
    def pause(self, request: PauseRequest) -> None:
        """Create no new machines; running jobs finish."""
        self._paused = True
        self._update_details()

    @workflow.signal
    def resume(self) -> None:
        """Start creating machines again."""
        self._paused = False
        self._update_details()

    @workflow.signal
    def cancel(self, request: CancelRequest) -> None:
        """Start nothing more and destroy running machines."""
        self._cancel(request.reason)

    @workflow.query
    def progress(self) -> Counts:
        """Job counts by state, and machines alive now."""
        return self._counts()

    @workflow.query
    def results(self) -> list[JobResult]:
        """Every job's result so far, in input order."""
        return self._results

    # ------------------------------------------------------------ the jobs

    async def _load_jobs(self) -> None:
        """Read this chunk's jobs from the store (a follow-up carries its one job itself)."""
        jobs, claim = self._input.jobs, self._input.claim
        turn = self._input.followup.turn if self._input.followup else 1
        if claim is not None:
            try:
                loaded = await load_jobs(claim, self._input.tuning)
                jobs, self._continues = loaded.jobs, loaded.continues
            except ActivityError as error:
                self._results, self._loaded = models.unread(claim, turn, why(error)), True
                return
        self._results = [  # a job's turn: the one its session continues with, else 1
            JobResult(job_id=j.id, index=j.index, turn=f.turn if (f := self._followup(j)) else 1)
            for j in jobs
        ]
        self._queue.extend(jobs)
        self._loaded = True

    async def _next_start(self) -> bool:
        """Wait until a queued job may start (True) or nothing is left to start (False)."""
        await workflow.wait_condition(
            lambda: (
                self._done_starting()
                or (not self._paused and self._running + self._retiring < self._slots)
            )
        )
        return not self._done_starting()

    def _start(self, job: Job) -> None:
        """Run the job in a slot of its own."""
        self._running += 1
        room = self._slots - self._running - len(self._pool)
        self._claims[job.index] = job_steps.claim(self._pool, self._input.app_of(job), room)
        self._jobs.append(asyncio.create_task(self._run_job(job)))

    async def _run_job(self, job: Job) -> None:
        """Run a job to a final state, on a new machine after each infrastructure failure.

        No `finally` here or below: a workflow evicted from the worker's cache has its tasks
        cancelled, and its replay redoes the bookkeeping; only the chunk's cancel is caught.
        """
        result = self._results[job.index - self._results[0].index]
        result.started_at = workflow.now()
        self._jobs_started.add(1, {"batch": self._input.batch_id})
        memory, attempt = job.guest.memory_mb, 1
        try:
            while True:
                await workflow.wait_condition(lambda: self._cancelled or not self._paused)
                if self._cancelled:
                    raise asyncio.CancelledError
                result.attempts, result.memory_mb = attempt, memory
                try:
                    await self._attempt(job.sized(memory), attempt, result)
                    await self._judged(result)
                    break
                except CredentialsRest as rest:  # the same attempt, once a credential is back
                    await self._judged(result, rest.until)
                    await job_steps.wait_for_credential(rest.until, lambda: self._cancelled)
                except InfrastructureFailure as failure:
                    # Pending its next attempt, not failed: the batch's failure limit counts jobs.
                    last = attempt > job.retries
                    result.state = JobState.FAILED if last else JobState.PENDING
                    result.error = f"{failure} (attempt {attempt} of {job.retries + 1})"
                    await self._judged(result)
                    if last:
                        break
                    attempt += 1
                    if failure.oom:
                        memory = job.memory_after_oom(memory)
        except asyncio.CancelledError:
            if not self._cancelled:  # evicted: only `_cancel` cancels a job
                raise
            if not result.state.final:
                result.state, result.error = JobState.CANCELLED, self._cancel_reason
        result.finished_at = workflow.now()
        result.duration_s = (result.finished_at - result.started_at).total_seconds()
        labels = {"batch": self._input.batch_id, "state": result.state.value}
        self._jobs_finished.add(1, labels)  # a workflow's metrics: replays count nothing
        self._running -= 1
        failed = result.state in (JobState.FAILED, JobState.TIMED_OUT)
        self._slot_freed(spent=bool(result.cost_usd), failed=failed)

    async def _attempt(self, job: Job, attempt: int, result: JobResult) -> None:
        """Get a machine; finish the job on it; keep it for the next job when its job ended
        cleanly and the batch reuses machines, else make sure it is gone."""
        result.state, result.error_kind = JobState.STARTING, None
        self._update_details()
        room = self._slots - self._running - len(self._pool)
        claimed = self._claims.pop(job.index, None)
        claimed = claimed or job_steps.claim(self._pool, self._input.app_of(job), room)
        try:
            created, reused = await job_steps.machine_for(
                self._input, job, attempt, self._followup(job), claimed
            )
        except ActivityError as error:
            result.error_kind = guards.create_failure_kind(error)
            if result.error_kind == CREDENTIALS_RESTING:
                result.state, result.error = JobState.PENDING, f"waiting: {why(error)}"
                raise CredentialsRest(guards.rest_end(error)) from None
            result.state = JobState.FAILED
            result.error = f"could not create a machine: {why(error)}"
            return
        machine = created.machine
        self._live, self._created = self._live + 1, self._created + (not reused)
        result.app, result.machine_id = machine.app, machine.machine_id
        result.machine_reused = reused
        result.credential = created.credential
        result.state = JobState.RUNNING
        self._update_details()
        destroyed, kept, cancelled, failure, oom = False, False, False, None, False
        try:
            finished = await job_steps.finish_job(self._input, job, machine, attempt, result)
            answer = finished.collected.answer if finished.collected else None
            reported = answer is not None and answer.error_kind != "no_report"
            self._settle_spend(job, result, reported=reported)
            destroyed, kept = finished.destroyed, finished.kept
            failure = record_outcome(job, result, finished.waited, finished.collected)
            oom = bool(finished.collected and finished.collected.oom_killed)
            if finished.artifacts is not None:
                result.artifacts = finished.artifacts
        except ActivityError as error:
            self._settle_spend(job, result, reported=False)
            cancelled = is_cancellation(error)
            if not cancelled:
                result.state, result.error = JobState.FAILED, why(error)
        except asyncio.CancelledError:
            if not self._cancelled:  # evicted: only `_cancel` cancels a job
                raise
            self._settle_spend(job, result, reported=False)
            cancelled = True
        if kept and not self._cancelled:
            self._pool.put([machine], workflow.now())
        elif not destroyed:
            await complete(job_steps.destroy(machine, self._input.tuning))
        self._live -= 1
        self._update_details()
        if cancelled:
            raise asyncio.CancelledError
        if failure is not None:
            raise InfrastructureFailure(failure, oom=oom)

    def _settle_spend(self, job: Job, result: JobResult, *, reported: bool) -> None:
        """The attempt is over: its report now counts what its verify loop spent; without one
        (cancelled, timed out, lost), the last spend it told is what the job spent."""
        spend = self._spending.pop(job.index, None)
        if spend is None or reported:
            return
        result.cost_usd = round((result.cost_usd or 0.0) + spend.cost_usd, 6)
        result.num_turns = (result.num_turns or 0) + spend.num_turns

    async def _destroy_all(self, machines: list[MachineRef]) -> None:
        """Destroy waiting machines; each holds its slot until it is gone."""
        self._retiring += len(machines)
        await asyncio.gather(*(job_steps.destroy(m, self._input.tuning) for m in machines))
        self._retiring -= len(machines)

    def _idling(self) -> bool | None:
        """Whether waiting machines sit idle (the chunk is paused); None once it closes."""
        return None if self._closing else self._paused

    def _followup(self, job: Job) -> Followup | None:
        """The session the job continues: a follow-up turn's, or a retry's, or none."""
        return self._input.followup or self._continues.get(job.id)

    # ------------------------------------------------------------ the window

    def _done_starting(self) -> bool:
        """Cancelled, or every job started."""
        return self._cancelled or not self._queue

    def _slot_freed(self, spent: bool, failed: bool) -> None:
        """A machine is gone: keep its slot for the next job, or give it back.

        Progress is reported at the chunk's times (workflows/reports.py); a job the batch must
        judge at once (one that spent money under a budget, or failed under a failure limit)
        and a storm error are reported as they happen. Under a budget a job that spent money
        gives its slot back with its report, and the batch lends it again only while money is
        left, so no job starts on money already spent; under a failure limit a failed job's
        slot goes back the same way, so no job starts past the limit.
        """
        judged = (spent and self._input.budgeted) or (failed and self._input.guarded)
        if judged and self._queue and not self._cancelled:
            self._owed += 1
        if self._give_back_idle():
            return
        if judged:
            self._reports.send()
        else:
            self._reports.soon()

    async def _judged(self, result: JobResult, resting_until: datetime | None = None) -> None:
        """After an attempt that met a storm error, keep its slot until the batch judged it.

        The batch hears of the error at once, and says so only after it paused if the error
        made a storm: no other attempt starts on the slot before that, so a storm pauses the
        batch within its threshold plus the attempts already under way.
        """
        kind = result.error_kind
        if kind is None or not guards.is_storm(kind):
            return
        self._reports.errors[kind] = self._reports.errors.get(kind, 0) + 1
        self._reports.rested(resting_until)
        seq = self._reports.send()
        if seq is not None:
            await workflow.wait_condition(lambda: self._heard >= seq or self._cancelled)

    def _give_back_idle(self) -> bool:
        """Give back the slots this chunk owes or can no longer use; whether any went back."""
        idle = self._slots - self._running
        more_to_start = (self._queue or not self._loaded) and not self._cancelled
        give = min(idle, self._owed) if more_to_start else idle
        if give <= 0:
            return False
        if not (more_to_start or self._running):
            return True  # the chunk is done: its result gives back every slot
        owed = min(give, self._owed)
        self._owed, self._slots = self._owed - owed, self._slots - give
        self._released += give
        surplus = len(self._pool) - max(self._slots - self._running, 0)
        self._handing += self._pool.oldest(surplus)  # each goes back with the slot it held
        if owed:
            self._reports.send()  # the batch asked for them back: it hears at once
        else:
            self._reports.soon()  # with the next report: chunks ending together send fewer
        return True

    def _now(self) -> tuple[Counts, bool, int, list[MachineRef]]:
        """What a report tells: the counts, whether more jobs wait than free slots, and the
        slots (and the waiting machines they held) given back since the last report."""
        self._update_details()
        free = max(self._slots - self._running, 0)
        released, self._released = self._released, 0
        handing, self._handing = self._handing, []
        return self._counts(), len(self._queue) > free and not self._cancelled, released, handing

    def _cancel(self, reason: str) -> None:
        if self._cancelled:
            return
        self._cancel_reason = reason
        for job in self._jobs:
            if not job.done() and not job.cancelling():
                job.cancel()
        self._update_details()

    @property
    def _cancelled(self) -> bool:
        return self._cancel_reason is not None

    def _counts(self) -> Counts:
        claim = self._input.claim
        if not self._loaded and claim is not None:  # its jobs not read yet: all pending
            return Counts(total=claim.size, pending=claim.size)
        live = self._live + len(self._pool)
        counts = Counts.of(self._results, live_machines=live, machines_created=self._created)
        for spend in self._spending.values():  # running verify loops: spent, not yet reported
            counts.cost_usd += spend.cost_usd
            counts.num_turns += spend.num_turns
        return counts

    def _update_details(self) -> None:
        """Keep the Web UI's current details in step with the chunk."""
        state = "cancelling" if self._cancelled else "paused" if self._paused else "running"
        workflow.set_current_details(
            models.details(self._counts(), state, self._slots, self._results)
        )
