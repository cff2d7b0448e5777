"""ChunkWorkflow: run a slice of a batch's jobs, one Fly machine per job.

The chunk starts a job whenever it holds a free machine slot, so a finished job's slot is used
at once. Slots come from the batch: when the chunk has nothing left to start, it hands each
freed slot back so another chunk can use it. Every machine is destroyed in a cleanup that still
runs when the job or the batch is cancelled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.machines import MachineActivities
    from sortie.models import (
        CREDENTIAL_FAULTS,
        MAY_START_MEMO,
        CancelRequest,
        ChunkInput,
        ChunkOutput,
        ChunkReport,
        CollectResultInput,
        CollectResultOutput,
        Counts,
        CreateMachineInput,
        CreateMachineOutput,
        DestroyMachineInput,
        DestroyNamedMachineInput,
        FinishJobInput,
        FinishJobOutput,
        JobAnswer,
        JobResult,
        JobState,
        MachineRef,
        PauseRequest,
        SlotGrant,
        WaitMachineInput,
        WaitMachineOutput,
        WaitOutcome,
    )
    from sortie.spec import Job
    from workflows import policies
    from workflows.messaging import tell
    from workflows.shielded import finish, settle

REPORT_EVERY = timedelta(seconds=5)
FINISH_IN_ONE_ACTIVITY = "finish-job-in-one-activity"
"""Chunks started before this patch waited, collected and destroyed in three activities."""
HAND_OVER_GRACE = timedelta(seconds=90)
"""Longest a dropped hand-over's create can still take (Fly client read timeout, and more)."""
HAND_OVER_SLOTS = "hand-over-slots-in-finish-job"
"""Chunks started before this patch created every job's machine in an activity of its own."""


class InfrastructureFailure(Exception):
    """The machine, not the job, failed: worth another attempt on a new machine."""


@workflow.defn
class ChunkWorkflow:
    """Runs its jobs within the machine slots the batch grants it."""

    @workflow.init
    def __init__(self, input: ChunkInput) -> None:
        self._input = input
        turn = input.followup.turn if input.followup else 1
        self._results = [JobResult(job_id=j.id, index=j.index, turn=turn) for j in input.jobs]
        self._slots = input.slots
        self._owed = 0
        self._running = 0
        self._live = 0
        self._unstarted = deque(input.jobs)
        self._claimed: set[str] = set()
        self._hands_over = not input.budgeted and workflow.patched(HAND_OVER_SLOTS)
        self._gate_open = True
        self._paused = input.paused
        self._cancelled = False
        self._cancel_reason: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reports: list[asyncio.Future[None]] = []
        self._last_report = workflow.now()
        self._report_seq = 0

    @workflow.run
    async def run(self, input: ChunkInput) -> ChunkOutput:
        """Start each job as a slot frees up, then wait for all of them."""
        self._publish_gate()
        self._show()
        try:
            while True:
                await workflow.wait_condition(self._can_start)
                if self._done_starting():
                    break
                self._start(self._unstarted.popleft())
            self._release_idle()
            await self._join_jobs()
        except asyncio.CancelledError:
            self._cancel("chunk cancelled through Temporal")
            await self._join_jobs()
        self._release_idle()
        for result in self._results:
            if result.state is JobState.PENDING:
                result.state = JobState.CANCELLED
                result.error = self._cancel_reason
        self._report(released=self._slots, done=True)
        self._slots = 0
        await asyncio.gather(*self._reports)
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._show()
        return ChunkOutput(index=input.index, counts=self._counts(), results=self._results)

    # ------------------------------------------------------------ signals and queries

    @workflow.signal
    def grant(self, grant: SlotGrant) -> None:
        """The batch adds slots, or asks for some back as jobs finish."""
        self._slots += grant.grant
        self._owed += grant.give_back
        self._release_idle()
        self._publish_gate()

    @workflow.signal
    def pause(self, request: PauseRequest) -> None:
        """Create no new machines; running jobs finish."""
        self._paused = True
        self._publish_gate()
        self._show()

    @workflow.signal
    def resume(self) -> None:
        """Start creating machines again."""
        self._paused = False
        self._publish_gate()
        self._show()

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

    # ------------------------------------------------------------ one job

    def _start(self, job: Job, handed: CreateMachineOutput | None = None) -> None:
        """Run the job in a slot of its own, on the machine handed to it if there is one."""
        self._running += 1
        self._tasks.append(asyncio.create_task(self._run_job(job, handed)))

    async def _run_job(self, job: Job, handed: CreateMachineOutput | None = None) -> None:
        """Run a job to a final state, on a new machine after each infrastructure failure."""
        result = self._results[job.index - self._input.jobs[0].index]
        result.started_at = workflow.now()
        try:
            for attempt in range(1, job.retries + 2):
                if handed is None:
                    await workflow.wait_condition(lambda: self._cancelled or not self._paused)
                    if self._cancelled:
                        raise asyncio.CancelledError
                result.attempts = attempt
                try:
                    await self._attempt(job, attempt, result, handed)
                    break
                except InfrastructureFailure as failure:
                    result.state = JobState.FAILED
                    result.error = f"{failure} (attempt {attempt} of {job.retries + 1})"
                handed = None
        except asyncio.CancelledError:
            if not result.state.final:
                result.state = JobState.CANCELLED
                result.error = self._cancel_reason
        finally:
            result.finished_at = workflow.now()
            result.duration_s = (result.finished_at - result.started_at).total_seconds()
            self._running -= 1
            self._job_finished(spent=bool(result.cost_usd))

    async def _attempt(
        self, job: Job, attempt: int, result: JobResult, handed: CreateMachineOutput | None
    ) -> None:
        """Create a machine (unless handed one); wait for it, collect its result, destroy it."""
        result.state = JobState.STARTING
        self._show()
        try:
            created = handed or await self._create(job, attempt)
        except ActivityError as error:
            result.state = JobState.FAILED
            result.error = f"could not create a machine: {_describe(error)}"
            return
        machine = created.machine
        self._live += 1
        result.machine_id = machine.machine_id
        result.credential = created.credential
        result.state = JobState.RUNNING
        self._show()
        destroyed = False
        try:
            if self._cancelled:  # a machine handed over just as the chunk was cancelled
                raise asyncio.CancelledError
            if workflow.patched(FINISH_IN_ONE_ACTIVITY):
                finished = await self._finish_and_hand_over(job, machine, attempt, result)
                destroyed = finished.destroyed
                record_outcome(job, result, finished.waited, finished.collected)
            else:
                outcome, collected = await self._wait_and_collect(job, machine, attempt, result)
                record_outcome(job, result, outcome, collected)
        except ActivityError as error:
            if _is_cancellation(error):
                raise asyncio.CancelledError from error
            result.state = JobState.FAILED
            result.error = _describe(error)
        finally:
            if not destroyed:
                await finish(self._destroy(machine))
            self._live -= 1
            self._show()

    async def _create(self, job: Job, attempt: int) -> CreateMachineOutput:
        """Create the machine; if cancelled meanwhile, let the create land and destroy it."""
        create = asyncio.ensure_future(
            workflow.execute_activity_method(
                MachineActivities.create_machine,
                self._create_input(job, attempt),
                start_to_close_timeout=timedelta(seconds=self._input.tuning.create_timeout_s),
                schedule_to_close_timeout=policies.CREATE_DEADLINE,
                retry_policy=policies.FLY_RETRY,
                summary=f"create machine for job {job.id} (attempt {attempt})",
            )
        )
        settled, interrupted = await settle(create)
        if interrupted:
            if settled.exception() is None:
                await finish(self._destroy(settled.result().machine))
            raise asyncio.CancelledError
        return settled.result()

    def _create_input(self, job: Job, attempt: int) -> CreateMachineInput:
        return CreateMachineInput(
            batch_id=self._input.batch_id,
            chunk_index=self._input.index,
            app=self._input.app,
            job=job,
            attempt=attempt,
            owner=workflow.info().workflow_id,
            followup=self._input.followup,
        )

    async def _finish_and_hand_over(
        self, job: Job, machine: MachineRef, attempt: int, result: JobResult
    ) -> FinishJobOutput:
        """Finish the job; the activity may start the claimed next job on the freed slot.

        Until the activity answers, the next job is claimed: no other slot starts it. Without
        a machine for it the claim lapses and the job waits for a slot like any other.
        Cancelled meanwhile, the chunk destroys this job's machine at once, which ends the
        activity soon (a machine gone hands nothing over), then whatever it still made.
        """
        claim = self._claim_next()
        if claim is None:
            return await self._finish_job(job, machine, attempt, result, None)
        finishing = asyncio.ensure_future(self._finish_job(job, machine, attempt, result, claim))
        try:
            finished = await asyncio.shield(finishing)
        except asyncio.CancelledError:
            await finish(self._drop_claim(claim, finishing, destroy_now=machine))
            raise
        except ActivityError:
            await finish(self._drop_claim(claim, finishing))
            raise
        if finished.next is None:
            self._lapse(claim)
        else:
            self._claimed.discard(claim.job.id)
            self._start(claim.job, finished.next)
        return finished

    async def _drop_claim(
        self,
        claim: CreateMachineInput,
        finishing: asyncio.Future[FinishJobOutput],
        destroy_now: MachineRef | None = None,
    ) -> None:
        """Once the activity has ended, destroy any machine it made for the claimed job.

        Cancelled, the chunk destroys the finishing job's machine (`destroy_now`) meanwhile,
        which ends the activity soon. The gate is closed by then, so an activity still running
        can create a machine only if it read the gate before: within HAND_OVER_GRACE that create
        has landed or failed.
        """
        destroying = asyncio.ensure_future(self._destroy(destroy_now)) if destroy_now else None
        await workflow.wait([finishing], timeout=HAND_OVER_GRACE.total_seconds())
        if not finishing.done() or finishing.cancelled() or finishing.exception() is not None:
            await self._destroy_named(claim)  # it may have created one and lost the answer
        elif (handed := finishing.result().next) is not None:
            await self._destroy(handed.machine)
        if destroying is not None:
            await destroying
        self._lapse(claim)

    async def _join_jobs(self) -> None:
        """Wait for every job's task, those started by a hand-over meanwhile too."""
        joined = 0
        while joined < len(self._tasks):
            tasks = self._tasks[joined:]
            await asyncio.gather(*tasks)
            joined += len(tasks)

    def _claim_next(self) -> CreateMachineInput | None:
        """Claim the next job for this job's slot, when the slot would go to it anyway."""
        if not (self._hands_over and self._unstarted and self._may_hand_over()):
            return None
        job = self._unstarted.popleft()
        self._claimed.add(job.id)
        return self._create_input(job, 1)

    def _lapse(self, claim: CreateMachineInput) -> None:
        """The claimed job got no machine: it goes back to the front of the queue."""
        self._claimed.discard(claim.job.id)
        self._unstarted.appendleft(claim.job)

    def _may_hand_over(self) -> bool:
        return not (self._cancelled or self._paused) and self._owed == 0

    def _publish_gate(self) -> None:
        """Keep the memo a finishing job's activity reads before it hands its slot over.

        A memo, not a query: the server answers it without a round trip to a busy worker.
        Unset means open, so a chunk that never pauses writes no event for it.
        """
        if not self._hands_over or self._may_hand_over() == self._gate_open:
            return
        self._gate_open = self._may_hand_over()
        workflow.upsert_memo({MAY_START_MEMO: self._gate_open})

    async def _finish_job(
        self,
        job: Job,
        machine: MachineRef,
        attempt: int,
        result: JobResult,
        claim: CreateMachineInput | None,
    ) -> FinishJobOutput:
        """Wait until the machine settles or the job's deadline passes, read it, destroy it."""
        wait = self._wait_input(job, machine)
        collect = self._collect_input(job, machine, attempt, result)
        create_s = self._input.tuning.create_timeout_s if claim else 0.0
        return await workflow.execute_activity_method(
            MachineActivities.finish_job,
            FinishJobInput(wait=wait, collect=collect, next=claim),
            start_to_close_timeout=timedelta(seconds=job.timeout_s + job.boot_timeout_s + create_s)
            + policies.WAIT_MARGIN,
            heartbeat_timeout=timedelta(seconds=self._input.tuning.heartbeat_timeout_s),
            retry_policy=policies.FLY_RETRY,
            summary=f"run job {job.id} on machine {machine.machine_id}, collect, destroy",
        )

    def _wait_input(self, job: Job, machine: MachineRef) -> WaitMachineInput:
        """The job's deadlines, counted from now (the machine was just created)."""
        now = workflow.now()
        return WaitMachineInput(
            machine=machine,
            job_id=job.id,
            deadline=now + timedelta(seconds=job.timeout_s),
            boot_deadline=now + timedelta(seconds=job.boot_timeout_s),
            heartbeat_every_s=self._input.tuning.heartbeat_every_s,
        )

    def _collect_input(
        self, job: Job, machine: MachineRef, attempt: int, result: JobResult
    ) -> CollectResultInput:
        """What to read from the machine once it settles, and how much of its logs."""
        tuning = self._input.tuning
        return CollectResultInput(
            machine=machine,
            job_id=job.id,
            secrets=job.secrets,
            tail_lines=tuning.log_tail_lines,
            tail_bytes=tuning.log_tail_bytes,
            batch_id=self._input.batch_id,
            prompt_job=job.prompt is not None,
            turn=result.turn,
            attempt=attempt,
            credential=result.credential,
            log_grace_s=tuning.log_grace_s,
            log_tail=job.log_tail,
        )

    async def _wait_and_collect(
        self, job: Job, machine: MachineRef, attempt: int, result: JobResult
    ) -> tuple[WaitMachineOutput, CollectResultOutput | None]:
        """Before FINISH_IN_ONE_ACTIVITY: wait, then collect, as two activities."""
        waited = await workflow.execute_activity_method(
            MachineActivities.wait_machine,
            self._wait_input(job, machine),
            start_to_close_timeout=timedelta(seconds=job.timeout_s + job.boot_timeout_s)
            + policies.WAIT_MARGIN,
            heartbeat_timeout=timedelta(seconds=self._input.tuning.heartbeat_timeout_s),
            retry_policy=policies.FLY_RETRY,
            summary=f"wait for job {job.id} on machine {machine.machine_id}",
        )
        if waited.outcome not in (WaitOutcome.EXITED, WaitOutcome.FAILED):
            return waited, None
        collected = await workflow.execute_activity_method(
            MachineActivities.collect_result,
            self._collect_input(job, machine, attempt, result),
            start_to_close_timeout=timedelta(seconds=self._input.tuning.call_timeout_s),
            schedule_to_close_timeout=policies.COLLECT_DEADLINE,
            retry_policy=policies.FLY_RETRY,
            summary=f"collect result of job {job.id}",
        )
        return waited, collected

    async def _destroy_named(self, claim: CreateMachineInput) -> None:
        """Destroy the machine a hand-over may have created; retried until it is gone."""
        await workflow.execute_activity_method(
            MachineActivities.destroy_named_machine,
            DestroyNamedMachineInput(
                app=claim.app,
                batch_id=claim.batch_id,
                job_id=claim.job.id,
                attempt=claim.attempt,
                turn=claim.followup.turn if claim.followup else 1,
            ),
            start_to_close_timeout=timedelta(seconds=self._input.tuning.call_timeout_s),
            retry_policy=policies.DESTROY_RETRY,
            summary=f"destroy any machine made for job {claim.job.id}",
        )

    async def _destroy(self, machine: MachineRef) -> None:
        """Destroy the machine; retried until it is gone."""
        await workflow.execute_activity_method(
            MachineActivities.destroy_machine,
            DestroyMachineInput(machine=machine),
            start_to_close_timeout=timedelta(seconds=self._input.tuning.call_timeout_s),
            retry_policy=policies.DESTROY_RETRY,
            summary=f"destroy machine {machine.machine_id}",
        )

    # ------------------------------------------------------------ slots

    def _can_start(self) -> bool:
        """Done starting, or a job waits and a slot is free."""
        if self._done_starting():
            return True
        return bool(self._unstarted) and not self._paused and self._running < self._slots

    def _done_starting(self) -> bool:
        """Cancelled, or every job started for good (none waits, none is claimed)."""
        return self._cancelled or not (self._unstarted or self._claimed)

    def _has_unstarted(self) -> bool:
        return not self._cancelled and bool(self._unstarted)

    def _job_finished(self, spent: bool = False) -> None:
        """A machine is gone: pay back an owed slot, keep it for the next job, or return it.

        A job that spent money is reported at once, so the batch's budget sees it; under a
        budget its slot goes back with the report, and the batch lends it again only while the
        budget lasts, so no job starts on money already spent.
        """
        if spent and self._input.budgeted and self._has_unstarted():
            self._owed += 1
        if not self._release_idle() and (
            spent or workflow.now() - self._last_report >= REPORT_EVERY
        ):
            self._report()

    def _release_idle(self) -> bool:
        """Hand back slots this chunk cannot use or owes; return whether any were handed back."""
        idle = self._slots - self._running
        give = min(idle, self._owed) if self._has_unstarted() else idle
        if give <= 0:
            return False
        self._owed = max(0, self._owed - give)
        self._publish_gate()
        self._slots -= give
        self._report(released=give)
        return True

    def _report(self, released: int = 0, done: bool = False) -> None:
        """Tell the batch about released slots and progress (fire and forget)."""
        self._show()
        if self._input.batch_workflow_id is None:
            return
        self._last_report = workflow.now()
        self._report_seq += 1
        report = ChunkReport(
            index=self._input.index,
            seq=self._report_seq,
            released=released,
            wants_more=max(self._slots - self._running, 0) < len(self._unstarted)
            and not self._cancelled,
            counts=self._counts(),
            done=done,
        )
        batch = workflow.get_external_workflow_handle(self._input.batch_workflow_id)
        send = tell(batch.signal("chunk_report", report), self._input.batch_workflow_id)
        self._reports.append(asyncio.ensure_future(send))

    def _cancel(self, reason: str) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._cancel_reason = reason
        self._publish_gate()
        for task in self._tasks:
            if not task.done() and not task.cancelling():
                task.cancel()
        self._show()

    # ------------------------------------------------------------ progress

    def _counts(self) -> Counts:
        counts = Counts(total=len(self._results), live_machines=self._live)
        for result in self._results:
            counts.cost_usd += result.cost_usd or 0.0
            counts.num_turns += result.num_turns or 0
            match result.state:
                case JobState.PENDING:
                    counts.pending += 1
                case JobState.STARTING | JobState.RUNNING:
                    counts.running += 1
                case JobState.SUCCEEDED:
                    counts.succeeded += 1
                case JobState.FAILED:
                    counts.failed += 1
                case JobState.TIMED_OUT:
                    counts.timed_out += 1
                case JobState.CANCELLED:
                    counts.cancelled += 1
        return counts

    def _show(self) -> None:
        """Keep the Web UI's current details in step with the chunk."""
        c = self._counts()
        done = c.succeeded + c.failed + c.timed_out + c.cancelled
        state = "cancelling" if self._cancelled else "paused" if self._paused else "running"
        workflow.set_current_details(
            f"**{done}/{c.total} jobs done** ({state})\n\n"
            f"- running: {c.running}, live machines: {c.live_machines}, slots: {self._slots}\n"
            f"- succeeded: {c.succeeded}, failed: {c.failed}, timed out: {c.timed_out}, "
            f"cancelled: {c.cancelled}"
        )


def record_outcome(
    job: Job,
    result: JobResult,
    waited: WaitMachineOutput,
    collected: CollectResultOutput | None,
) -> None:
    """Turn how the machine ended into the job's state; raise for infrastructure failures.

    `FinishJobOutput.needs_new_machine` must say the same, so that `finish_job` never hands
    over the slot of a job that will run again (tests/test_hand_over.py checks both).
    """
    result.machine_state = collected.state if collected else waited.state
    if collected:
        result.exit_code = collected.exit_code
        result.log_tail = collected.log_tail
    answer = collected.answer if collected else None
    if answer is not None:
        _record_answer(result, answer)
        if answer.error_kind in CREDENTIAL_FAULTS:
            raise InfrastructureFailure(
                f"Claude refused credential {result.credential} ({answer.error_kind})"
            )
    match waited.outcome:
        case WaitOutcome.TIMED_OUT:
            result.state = JobState.TIMED_OUT
            result.error = f"exceeded its timeout of {_seconds(job.timeout_s)}"
        case WaitOutcome.BOOT_TIMEOUT:
            raise InfrastructureFailure(
                f"machine did not start within {_seconds(job.boot_timeout_s)}"
            )
        case WaitOutcome.FAILED:
            raise InfrastructureFailure("machine entered the failed state")
        case WaitOutcome.GONE:
            raise InfrastructureFailure("machine disappeared before the job finished")
        case WaitOutcome.EXITED if collected and collected.oom_killed:
            raise InfrastructureFailure("machine ran out of memory (OOM killed)")
        case WaitOutcome.EXITED if collected and collected.exit_code is None:
            # The job ran; running it again could do its work twice. Report, don't retry.
            result.state = JobState.FAILED
            result.error = "machine stopped but Fly recorded no exit code"
        case WaitOutcome.EXITED if collected and collected.exit_code == 0:
            result.state = JobState.SUCCEEDED
            result.error = None
        case WaitOutcome.EXITED if answer is not None and answer.error_kind:
            result.state = JobState.FAILED
            result.error = f"Claude failed ({answer.error_kind}): {(answer.result or '')[:200]}"
        case _:
            code = collected.exit_code if collected else None
            result.state = JobState.FAILED
            result.error = f"exited with code {code}"


def _record_answer(result: JobResult, answer: JobAnswer) -> None:
    """Keep what Claude answered; cost and turns add up over a job's attempts."""
    result.session_id = answer.session_id
    result.result = answer.result
    result.result_ref = answer.result_ref
    result.result_chars = answer.result_chars
    result.cost_usd = round((result.cost_usd or 0.0) + answer.cost_usd, 6)
    result.num_turns = (result.num_turns or 0) + answer.num_turns
    result.duration_ms = answer.duration_ms
    result.is_error = answer.is_error
    result.error_kind = answer.error_kind
    result.archive_ref = answer.archive_ref
    result.commits = answer.commits


def _is_cancellation(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if type(cause).__name__ == "CancelledError":
            return True
        cause = cause.__cause__
    return False


def _describe(error: BaseException) -> str:
    """The innermost failure message: what actually went wrong."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(cause) or type(cause).__name__


def _seconds(seconds: float) -> str:
    whole = int(seconds)
    if whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole % 60 == 0:
        return f"{whole // 60}m"
    return f"{seconds:g}s"
