"""The machine lifecycle of one job: create, then wait, collect and destroy.

Every step is idempotent so Temporal may retry it after a crash or a lost response: create finds
the machine an earlier attempt made (deterministic name, metadata), wait resumes on the same
machine, destroy treats "already gone" as done. Fly errors become ApplicationErrors that say
whether a retry can help and, for 429s, when to retry.

A prompt job's report and session archive travel by the object store, never by Fly's logs
(best-effort, lagging, lossy): create mints presigned PUT URLs for the attempt's keys into the
machine's env, the agent uploads there, and collect reads the objects. Logs carry only the tail
shown to people.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.machine_models import (
    CREDENTIAL_FAULTS,
    CREDENTIALS_RESTING_ERROR,
    CheckBatchInput,
    CheckBatchOutput,
    CollectResultInput,
    CollectResultOutput,
    CreateMachineInput,
    CreateMachineOutput,
    DestroyMachineInput,
    DestroyMachineOutput,
    FinishJobInput,
    FinishJobOutput,
    JobAnswer,
    ReadLogsInput,
    ReadLogsOutput,
    ReleaseSessionsInput,
    ReleaseSessionsOutput,
    Spend,
    WaitMachineInput,
    WaitMachineOutput,
    WaitOutcome,
)
from fly import (
    ExitEvent,
    FlyClient,
    FlyConflict,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyUnauthorized,
    FlyWaitTimeout,
    GuestConfig,
    InitConfig,
    Machine,
    MachineConfig,
    RestartConfig,
    WaitResult,
)
from sortie.claude import CLI_ENV, PREVIEW_CHARS, AgentReport, ErrorKind, job_document
from sortie.credentials import Credential, CredentialsResting, NoCredential
from sortie.labels import (
    META_ATTEMPT,
    META_BATCH,
    META_JOB,
    META_TURN,
    machine_metadata,
    machine_name,
)
from sortie.models import Iteration, MachineRef
from sortie.secrets import SecretStore, redact_presigned
from sortie.spec import LogTail
from sortie.store import (
    KEEP_UNTIL,
    ObjectStore,
    answer_key,
    changes_key,
    finished_key,
    log_key,
    report_key,
    session_key,
    session_prefix,
    spend_key,
)

SETTLED_STATES = ["stopped", "failed", "destroyed"]
GONE_STATES = {"destroyed", "destroying"}
BOOTING_STATES = {"created", "creating", "starting"}
RESTORE_PATH = "/sortie/restore.tar.gz"
"""Where a follow-up's machine puts the workspace and session archive of the turn before."""
REPORT_URL = "SORTIE_REPORT_URL"
ARCHIVE_URL = "SORTIE_ARCHIVE_URL"
RESTORE_URL = "SORTIE_RESTORE_URL"
CHANGES_URL = "SORTIE_CHANGES_URL"
SPEND_URL = "SORTIE_SPEND_URL"
"""The machine's env: presigned URLs for this attempt's report, archive, changes and a verify
loop's running spend (PUT) and the turn before's archive (GET). Secrets: they go to Fly in the
create request and nowhere else."""
URL_SLACK_S = 3600
"""How long a presigned URL outlives the job's own boot and run time: creates queued behind
Fly's rate limits, a slow upload at the very end."""
URL_MOST_S = 7 * 24 * 3600
"""SigV4 presigned URLs expire after seven days at most."""
CALL_TRIES = 4
"""Tries of one Fly call within `finish_job` before a transient error fails the activity."""
RETRY_AFTER_MOST_S = 5.0
"""The longest pause between tries of one Fly call inside an activity (Retry-After or backoff)."""
ERROR_CHARS = 800
"""How much of the agent's own failure (a failing check's output tail) a result keeps: it rides
in the chunk's history with the row (the agent's whole report stays in the store)."""
T = TypeVar("T")
_OUTCOMES = {
    "stopped": WaitOutcome.EXITED,
    "failed": WaitOutcome.FAILED,
    "destroyed": WaitOutcome.GONE,
}


@contextmanager
def fly_errors(action: str, *, always_retry: bool = False) -> Iterator[None]:
    """Translate Fly errors into ApplicationErrors that carry their retry advice."""
    try:
        yield
    except FlyError as error:
        delay = timedelta(seconds=error.retry_after) if error.retry_after else None
        raise ApplicationError(
            redact_presigned(f"{action}: {error}"),  # a Fly error may echo the config back
            type=type(error).__name__,
            non_retryable=not (error.retryable or always_retry),
            next_retry_delay=delay,
        ) from None


class MachineActivities:
    """Fly machine steps; owns the shared Fly client, the worker's secrets and the object store."""

    def __init__(
        self,
        fly: FlyClient,
        secrets: SecretStore,
        store: ObjectStore,
        *,
        task_queue: str = "sortie",
    ) -> None:
        """`task_queue`: the workers' queue, whose credential pool this worker shares."""
        self._fly = fly
        self._secrets = secrets
        self._store = store
        self._task_queue = task_queue
        self.on_batch_apps: list[Callable[[str], Awaitable[None]]] = []
        """Told each app of a batch that passed its check, before any of its machines exists."""

    @activity.defn(name="check_batch")
    async def check_batch(self, input: CheckBatchInput) -> CheckBatchOutput:
        """Fail fast, before any machine exists: no such Fly app, or a secret the worker lacks."""
        for app in input.apps:
            await self._check_app(app)
        available = self._secrets.available(input.names)
        missing = sorted(set(input.names) - set(available))
        if missing:
            raise ApplicationError(
                f"unknown secrets on the worker: {', '.join(missing)} "
                "(set them in the worker's environment)",
                type="UnknownSecrets",
                non_retryable=True,
            )
        if input.needs_claude and not len(self._secrets.claude):
            raise ApplicationError(
                "the batch has prompt jobs but the worker has no Claude credential: set "
                "CLAUDE_CODE_OAUTH_TOKEN or ANTHROPIC_API_KEY in the worker's environment",
                type="UnknownSecrets",
                non_retryable=True,
            )
        for app in input.apps:  # this worker polls their create queues from now on
            for observer in self.on_batch_apps:
                await observer(app)
        return CheckBatchOutput(available=available)

    async def _check_app(self, app: str) -> None:
        """The app exists and the token may reach it."""
        try:
            await patiently(lambda: self._fly.get_app(app))
        except (FlyNotFound, FlyUnauthorized, FlyForbidden) as error:
            raise ApplicationError(
                f"the Fly app {app!r} cannot be used: {error} (create it with "
                "`fly apps create`, or check FLY_API_TOKEN may reach it)",
                type="UnknownApp",
                non_retryable=True,
            ) from None
        except FlyError as error:
            raise ApplicationError(f"checking the Fly app {app!r}: {error}") from None

    @activity.defn(name="create_machine")
    async def create_machine(self, input: CreateMachineInput) -> CreateMachineOutput:
        """Create the job attempt's machine, or find the one an earlier try already made."""
        with fly_errors(f"create machine for job {input.job.id}"):
            return await self._create(input, look_first=activity.info().attempt > 1)

    async def _create(self, input: CreateMachineInput, *, look_first: bool) -> CreateMachineOutput:
        """Create the machine; `look_first` after a try whose answer may have been lost."""
        job = input.job
        turn = input.followup.turn if input.followup else 1
        name = machine_name(input.batch_id, job.id, input.attempt, turn)
        lookup = _lookup(input.batch_id, job.id, input.attempt, turn)
        if look_first:
            found = await self._fly.find_machine(input.app, name=name, metadata=lookup)
            if found is not None:
                return self._found(input.app, found)
        credential = await self._take_credential() if job.prompt is not None else None
        config = await self._config(input, credential)
        try:
            machine = await self._fly.create_machine(
                input.app, config, name=name, region=job.region
            )
        except FlyConflict:
            found = await self._fly.find_machine(input.app, name=name, metadata=lookup)
            if found is None:
                raise ApplicationError(
                    f"machine {name} exists but is not listed yet", type="MachineNotListed"
                ) from None
            return self._found(input.app, found)
        activity.logger.info("created machine %s for job %s", machine.id, job.id)
        return CreateMachineOutput(
            machine=_ref(input.app, machine), credential=credential.name if credential else None
        )

    def _found(self, app: str, machine: Machine) -> CreateMachineOutput:
        """An earlier try's machine, and which Claude credential it was given."""
        env = machine.config.env if machine.config else {}
        return CreateMachineOutput(
            machine=_ref(app, machine),
            found_existing=True,
            credential=self._secrets.claude.which(env),
        )

    @activity.defn(name="finish_job")
    async def finish_job(self, input: FinishJobInput) -> FinishJobOutput:
        """Wait for the job's machine, collect its result and destroy it: one task per job.

        What it learned (how the machine ended, what it left) is written to the store before it
        destroys, so a retry after the destroy reads that, never Fly, which forgets a destroyed
        machine after a while nobody documents. A destroy that fails is left to the workflow's
        own destroy activity, which retries until the machine is gone.
        """
        ref = input.wait.machine
        seen: dict[str, Any] = {"machine_id": ref.machine_id, "state": None}
        async with (
            _beating(input.wait.heartbeat_every_s, seen),
            self._watching_spend(input, seen),
        ):
            finished = await self._learned(input.collect)
            if finished is None:
                finished = await self._learn(input, seen)
                await self._store.put(
                    finished_key(*_attempt_key(input.collect)),
                    finished.model_dump_json().encode(),
                    _about(input.collect),
                )
            finished.destroyed = await self._destroy_now(ref)
        return finished

    @asynccontextmanager
    async def _watching_spend(
        self, input: FinishJobInput, seen: dict[str, Any]
    ) -> AsyncIterator[None]:
        """While the block runs, pass what the job's verify loop spent to its chunk as it grows,
        so the batch's budget counts every turn when it happens, not when the job ends."""
        index, chunk_id = input.collect.spend_of, activity.info().workflow_id
        if index is None or chunk_id is None:
            yield
            return
        key = spend_key(*_attempt_key(input.collect))
        chunk = activity.client().get_workflow_handle(chunk_id)

        async def watch() -> None:
            told = 0.0
            while True:
                await asyncio.sleep(input.wait.heartbeat_every_s)
                try:
                    payload = await self._store.get(key)
                    if payload is None:
                        continue
                    spent = json.loads(payload)
                    spend = Spend(
                        index=index,
                        attempt=input.collect.attempt,
                        cost_usd=float(spent.get("cost_usd") or 0.0),
                        num_turns=int(spent.get("num_turns") or 0),
                    )
                    if spend.cost_usd <= told:
                        continue
                    await chunk.signal("spent", spend)
                    told = seen["spent_usd"] = spend.cost_usd
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # best effort: the final report is the truth
                    job = input.collect.job_id
                    activity.logger.warning("spend of job %s not passed on: %s", job, error)

        watching = asyncio.create_task(watch())
        try:
            yield
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

    async def _learned(self, input: CollectResultInput) -> FinishJobOutput | None:
        """What an earlier attempt of this activity learned before it destroyed the machine."""
        if activity.info().attempt == 1:
            return None
        payload = await self._store.get(finished_key(*_attempt_key(input)))
        return None if payload is None else FinishJobOutput.model_validate_json(payload)

    async def _learn(self, input: FinishJobInput, seen: dict[str, Any]) -> FinishJobOutput:
        """Wait for the machine to settle and collect what it left.

        A machine Fly no longer knows (404) may still have settled a prompt job: the report its
        agent uploaded says how the job ended.
        """
        waited = await self._wait_unless_shutting_down(input.wait, seen)
        collected = None
        if waited.outcome in (WaitOutcome.EXITED, WaitOutcome.FAILED):
            collected = await self._collect(input.collect)
        elif waited.outcome is WaitOutcome.GONE and input.collect.prompt_job:
            reported = await self._collect(input.collect)
            if reported.answer is not None:
                waited = WaitMachineOutput(outcome=WaitOutcome.EXITED, state=None)
                collected = reported
        return FinishJobOutput(waited=waited, collected=collected)

    async def _destroy_now(self, ref: MachineRef) -> bool:
        """Force-destroy the machine; on a Fly error report it still there, not fail."""
        try:
            await patiently(lambda: self._fly.destroy_machine(ref.app, ref.machine_id, force=True))
        except FlyError as error:
            activity.logger.warning("machine %s not destroyed yet: %s", ref.machine_id, error)
            if error.retry_after:  # the workflow's destroy comes next: no sooner than Fly asked
                await asyncio.sleep(min(error.retry_after, RETRY_AFTER_MOST_S))
            return False
        return True

    async def _wait_unless_shutting_down(
        self, input: WaitMachineInput, seen: dict[str, Any]
    ) -> WaitMachineOutput:
        """Wait for the machine; when the worker shuts down, fail so another worker takes over."""
        waiting = asyncio.create_task(self._wait(input, seen))
        shutdown = asyncio.create_task(activity.wait_for_worker_shutdown())
        try:
            await asyncio.wait({waiting, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                raise ApplicationError(
                    "worker shutting down; the wait continues on another worker",
                    type="WorkerShutdown",
                    next_retry_delay=timedelta(milliseconds=200),
                )
            with fly_errors(f"wait for machine {input.machine.machine_id}"):
                return waiting.result()
        finally:
            for task in (waiting, shutdown):
                task.cancel()
            await asyncio.gather(waiting, shutdown, return_exceptions=True)

    async def _wait(self, input: WaitMachineInput, seen: dict[str, Any]) -> WaitMachineOutput:
        """Loop Fly waits of at most 60 s until the machine settles or a deadline passes."""
        ref = input.machine
        booted = False
        while True:
            now = datetime.now(UTC)
            if now >= input.deadline:
                return await self._past_deadline(ref, seen)
            budget = (input.deadline - now).total_seconds()
            if not booted:
                budget = min(budget, max((input.boot_deadline - now).total_seconds(), 1.0))
            try:
                result = await patiently(partial(self._fly_wait, ref, budget))
            except FlyWaitTimeout:
                try:
                    machine = await patiently(
                        lambda: self._fly.get_machine(ref.app, ref.machine_id)
                    )
                except FlyNotFound:
                    return WaitMachineOutput(outcome=WaitOutcome.GONE, state=None)
                seen["state"] = machine.state
                booted = machine.state not in BOOTING_STATES
                if not booted and datetime.now(UTC) >= input.boot_deadline:
                    return WaitMachineOutput(outcome=WaitOutcome.BOOT_TIMEOUT, state=machine.state)
                continue
            except FlyNotFound:
                return WaitMachineOutput(outcome=WaitOutcome.GONE, state=None)
            state = result.state
            if state is None:
                state = (await self._get(ref)).state
            seen["state"] = state
            if state == "destroyed" and await self._exited_by_itself(ref):
                # Destroyed after its process ended, by an earlier try of this activity.
                return WaitMachineOutput(outcome=WaitOutcome.EXITED, state=state)
            return WaitMachineOutput(outcome=_OUTCOMES.get(state, WaitOutcome.EXITED), state=state)

    async def _past_deadline(self, ref: MachineRef, seen: dict[str, Any]) -> WaitMachineOutput:
        """The job's time is up; but a retry may find the machine settled before the deadline.

        A retry of this activity (after a worker crash, or Fly errors while collecting) can
        start after the deadline: the job ran in time then, and must not be called timed out.
        """
        try:
            machine = await self._get(ref)
        except FlyNotFound:
            return WaitMachineOutput(outcome=WaitOutcome.GONE, state=None)
        seen["state"] = machine.state
        exit_event = machine.latest_exit_event()
        stopped_on_request = bool(exit_event and exit_event.requested_stop)
        settled = machine.state in ("stopped", "failed") or (
            machine.state == "destroyed" and _exited_by_itself(exit_event)
        )
        if settled and not stopped_on_request:
            outcome = WaitOutcome.FAILED if machine.state == "failed" else WaitOutcome.EXITED
            return WaitMachineOutput(outcome=outcome, state=machine.state)
        return WaitMachineOutput(outcome=WaitOutcome.TIMED_OUT, state=machine.state)

    async def _exited_by_itself(self, ref: MachineRef) -> bool:
        """Whether the machine's process exited on its own, not stopped by a stop or destroy."""
        try:
            machine = await self._get(ref)
        except FlyNotFound:
            return False
        return _exited_by_itself(machine.latest_exit_event())

    async def _fly_wait(self, ref: MachineRef, timeout: float) -> WaitResult:
        """One Fly wait (at most 60 s) for the machine to settle."""
        return await self._fly.wait_machine(
            ref.app, ref.machine_id, SETTLED_STATES, version=ref.version, timeout=timeout
        )

    async def _get(self, ref: MachineRef) -> Machine:
        """The machine as Fly describes it now."""
        return await patiently(lambda: self._fly.get_machine(ref.app, ref.machine_id))

    async def _collect(self, input: CollectResultInput) -> CollectResultOutput:
        """Read the exit event and the tail of the machine's logs, secrets scrubbed."""
        ref = input.machine
        key = _attempt_key(input)
        exit_code: int | None = None
        with fly_errors(f"collect result of machine {ref.machine_id}"):
            try:
                machine: Machine | None = await self._get(ref)
            except FlyNotFound:  # forgotten by Fly: a prompt job's report may still settle it
                machine = None
            exit_event = machine.latest_exit_event() if machine else None
            messages: list[str] = []
            if machine is None:
                report = await self._store.get(report_key(*key)) if input.prompt_job else None
                if report is None:
                    return CollectResultOutput(state=None, exit_code=None)
                exit_code = AgentReport.parse(report).exit_code
            elif input.log_tail is LogTail.ALWAYS or not _succeeded(machine.state, exit_event):
                page = await patiently(lambda: self._fly.get_logs(ref.app, ref.machine_id))
                messages = [e.message for e in page.entries]
        answer = await self._answer(input, exit_event) if input.prompt_job else None
        if answer is not None:
            await self._rest_if_refused(input, answer)
        lines = [self._secrets.scrub(m, input.secrets) for m in messages]
        tail = _tail(lines, input.tail_lines, input.tail_bytes)
        log_ref = None
        if tail:
            log_ref = await self._store.put(log_key(*key), "\n".join(tail).encode(), _about(input))
        return CollectResultOutput(
            state=machine.state if machine else None,
            exit_code=exit_event.exit_code if exit_event else exit_code,
            signal=exit_event.signal if exit_event and (exit_event.signal or 0) > 0 else None,
            oom_killed=bool(exit_event and exit_event.oom_killed),
            exited_at=exit_event.exited_at if exit_event else None,
            log_tail=tail,
            log_ref=log_ref,
            answer=answer,
        )

    async def _answer(self, input: CollectResultInput, exit_event: ExitEvent | None) -> JobAnswer:
        """Read the report the agent uploaded; keep the full answer and the session off history.

        The agent uploads before it exits and the store reads its own writes, so a report that
        is not there once the machine stopped never will be: the job failed, whatever its exit
        code, and ran (it is not run again).
        """
        key = (input.batch_id, input.job_id, input.turn, input.attempt)
        payload = await self._store.get(report_key(*key))
        if payload is None:
            code = exit_event.exit_code if exit_event else None
            return JobAnswer(
                is_error=True,
                error_kind="no_report",
                result=(
                    f"the agent's report never reached the object store (exit code {code}): "
                    "its upload failed or its URL expired, or the agent died before it"
                ),
            )
        report = AgentReport.parse(payload)
        kind = report.error_kind()
        cli = report.claude
        text = self._secrets.scrub(
            (cli.result if cli else None) or report.error or "", input.secrets
        )
        cost, turns = report.cost()
        changed = None
        if report.changes_uploaded and await self._store.metadata(changes_key(*key)) is not None:
            changed = changes_key(*key)
        failure = report.error if kind in (ErrorKind.VERIFY_FAILED, ErrorKind.PUSH_FAILED) else None
        problem, structured = None, None
        if kind is None and input.json_schema is not None and cli is not None:
            problem = report.structured_problem(input.json_schema)
            if problem is not None:
                kind = ErrorKind.INVALID_OUTPUT
                text = f"{problem}\n\n{text}"
            else:  # the answer is the object: whole in the store, in the row when small
                text = json.dumps(cli.structured_output, ensure_ascii=False)
                structured = cli.structured_output if len(text) <= PREVIEW_CHARS else None
        answer = JobAnswer(
            session_id=cli.session_id if cli else report.session_id,
            result=text[:PREVIEW_CHARS],
            result_chars=len(text),
            cost_usd=cost,
            num_turns=turns,
            duration_ms=cli.duration_ms if cli else None,
            is_error=kind is not None,
            error_kind=kind.value if kind else None,
            commits={r.url: r.commit for r in report.repos if r.commit},
            iterations=[Iteration.model_validate(i.model_dump()) for i in report.iterations],
            changes=report.total_changes(changed),
            pushed=report.pushed(),
            failure=self._secrets.scrub(failure, input.secrets)[:ERROR_CHARS] if failure else None,
            structured=structured,
        )
        if text:  # kept whole off history; the chunk's result carries only the key
            answer.result_ref = await self._store.put(
                answer_key(*key), text.encode(), _about(input)
            )
        if report.session_archive and await self._store.metadata(session_key(*key)) is not None:
            answer.archive_ref = session_key(*key)
        return answer

    async def _rest_if_refused(self, input: CollectResultInput, answer: JobAnswer) -> None:
        """Claude refused the job's credential: rest it for every worker, by name."""
        if not (answer.error_kind in CREDENTIAL_FAULTS and input.credential):
            return
        reason = f"{answer.error_kind} error in job {input.job_id}"
        await self._secrets.claude.rest(
            activity.client(), self._task_queue, input.credential, reason
        )
        activity.logger.warning(
            "set credential %s aside after a %s error", input.credential, answer.error_kind
        )

    @activity.defn(name="release_sessions")
    async def release_sessions(self, input: ReleaseSessionsInput) -> ReleaseSessionsOutput:
        """A closed batch's session archives: deleted now, or marked to expire later."""
        prefix = session_prefix(input.batch_id)
        if not input.keep_s:
            return ReleaseSessionsOutput(deleted=await self._store.delete(prefix))
        until = datetime.now(UTC) + timedelta(seconds=input.keep_s)
        await self._store.put(f"{prefix}/{KEEP_UNTIL}", until.isoformat().encode())
        return ReleaseSessionsOutput(deleted=False, kept_until=until)

    @activity.defn(name="destroy_machine")
    async def destroy_machine(self, input: DestroyMachineInput) -> DestroyMachineOutput:
        """Force-destroy the machine; a machine already gone counts as destroyed."""
        ref = input.machine
        with fly_errors(f"destroy machine {ref.machine_id}", always_retry=True):
            destroyed = await self._fly.destroy_machine(ref.app, ref.machine_id, force=True)
        activity.logger.info(
            "destroyed machine %s (already gone: %s)", ref.machine_id, not destroyed
        )
        return DestroyMachineOutput(destroyed=destroyed, already_gone=not destroyed)

    @activity.defn(name="read_logs")
    async def read_logs(self, input: ReadLogsInput) -> ReadLogsOutput:
        """The machine's log lines after `next_token`, up to `max_lines`: for `starter.py logs`.

        Read here, not by the starter, so the Fly token and the secret values to scrub never
        leave the worker.
        """
        lines: list[str] = []
        token = input.next_token
        with fly_errors(f"read logs of machine {input.machine_id}"):
            while len(lines) < input.max_lines:
                page = await self._fly.get_logs(input.app, input.machine_id, next_token=token)
                lines.extend(self._secrets.scrub(e.message, input.secrets) for e in page.entries)
                caught_up = not page.entries or page.next_token in (None, token)
                token = page.next_token or token
                if caught_up:
                    break
        return ReadLogsOutput(lines=lines, next_token=token)

    async def _take_credential(self) -> Credential:
        """The Claude credential the shared pool hands out next (a job outcome when all rest)."""
        try:
            return await self._secrets.claude.take(activity.client(), self._task_queue)
        except NoCredential as error:
            raise ApplicationError(str(error), type="UnknownSecrets", non_retryable=True) from None
        except CredentialsResting as error:
            raise ApplicationError(
                str(error), type=CREDENTIALS_RESTING_ERROR, non_retryable=True
            ) from None

    async def _config(
        self, input: CreateMachineInput, credential: Credential | None
    ) -> MachineConfig:
        """The machine's config; secret values and presigned URLs enter here, and go only to Fly."""
        job = input.job
        try:
            secrets = self._secrets.resolve(job.secrets)
        except KeyError as error:
            raise ApplicationError(
                str(error.args[0]), type="UnknownSecrets", non_retryable=True
            ) from None
        env = {**job.env, "SORTIE_BATCH_ID": input.batch_id, "SORTIE_JOB_ID": job.id}
        if job.prompt is not None:
            env = {**CLI_ENV, **env}
        turn = input.followup.turn if input.followup else 1
        if credential is not None:
            followup = input.followup
            restore = None
            valid_s = min(int(job.timeout_s + job.boot_timeout_s) + URL_SLACK_S, URL_MOST_S)
            if followup is not None and followup.archive_ref:
                if await self._store.metadata(followup.archive_ref) is None:
                    raise ApplicationError(
                        f"the workspace of job {job.id} is no longer kept (sessions are kept "
                        "while the batch runs, or longer with the batch's keep_sessions)",
                        type="SessionGone",
                        non_retryable=True,
                    )
                env[RESTORE_URL] = await self._store.presign_get(followup.archive_ref, valid_s)
                restore = RESTORE_PATH
            key = (input.batch_id, job.id, turn, input.attempt)
            env[REPORT_URL] = await self._store.presign_put(report_key(*key), valid_s)
            env[ARCHIVE_URL] = await self._store.presign_put(session_key(*key), valid_s)
            env[CHANGES_URL] = await self._store.presign_put(changes_key(*key), valid_s)
            if job.verify is not None:
                env[SPEND_URL] = await self._store.presign_put(spend_key(*key), valid_s)
            document = job_document(
                job,
                batch_id=input.batch_id,
                prompt=followup.prompt if followup else None,
                resume_session_id=followup.session_id if followup else None,
                restore_file=restore,
                commits=followup.commits if followup else None,
            )
            env["SORTIE_JOB"] = json.dumps(document)
            env.update(credential.machine_env())
        env.update(secrets)
        config = MachineConfig(
            image=job.image,
            env=env,
            init=InitConfig(exec=job.command) if job.command else None,
            guest=GuestConfig(
                cpu_kind=job.guest.cpu_kind, cpus=job.guest.cpus, memory_mb=job.guest.memory_mb
            ),
            auto_destroy=False,
            restart=RestartConfig(policy="no"),
            metadata=machine_metadata(
                input.batch_id, input.chunk_index, job.id, input.attempt, input.owner, turn
            ),
        )
        return config


async def patiently(call: Callable[[], Awaitable[T]]) -> T:
    """One Fly call, tried again on a transient error before the activity gives up.

    `finish_job` makes several calls; one 429 or dropped connection among them would fail it
    and Temporal would repeat all of them after a backoff that grows to 30 s. A few quick tries
    of the one call (Retry-After honoured) keep a storm from stretching a job by minutes; a
    call that keeps failing still fails the activity, and Temporal's policy takes over.
    """
    for attempt in range(1, CALL_TRIES):
        try:
            return await call()
        except FlyWaitTimeout:
            raise  # "not yet": the caller's answer, not a fault
        except FlyError as error:
            if not error.retryable:
                raise
            delay = error.retry_after if error.retry_after is not None else 0.25 * 2**attempt
            await asyncio.sleep(min(delay, RETRY_AFTER_MOST_S))
    return await call()


def _lookup(batch_id: str, job_id: str, attempt: int, turn: int) -> dict[str, str]:
    """The metadata that tells a job attempt's machine from any other of the same name."""
    return {
        META_BATCH: batch_id,
        META_JOB: job_id,
        META_ATTEMPT: str(attempt),
        META_TURN: str(turn),
    }


def _attempt_key(input: CollectResultInput) -> tuple[str, str, int, int]:
    """The job attempt whose objects these are: one machine's."""
    return (input.batch_id, input.job_id, input.turn, input.attempt)


def _about(input: CollectResultInput) -> dict[str, str]:
    """An object's metadata: whose it is, never anything secret."""
    return {"batch": input.batch_id, "job": input.job_id, "attempt": str(input.attempt)}


def _ref(app: str, machine: Machine) -> MachineRef:
    return MachineRef(
        app=app,
        machine_id=machine.id,
        name=machine.name or "",
        version=machine.current_version,
        region=machine.region,
    )


@asynccontextmanager
async def _beating(every: float, seen: dict[str, Any]) -> AsyncIterator[None]:
    """Heartbeat `seen` while the block runs, so a dead worker is noticed and cancels arrive."""

    async def beat() -> None:
        while True:
            activity.heartbeat(dict(seen))
            await asyncio.sleep(every)

    beats = asyncio.create_task(beat())
    try:
        yield
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)


def _exited_by_itself(exit_event: ExitEvent | None) -> bool:
    """An exit with a code that no stop or destroy request caused: the job's own ending."""
    return bool(exit_event and exit_event.exit_code is not None and not exit_event.requested_stop)


def _succeeded(state: str | None, exit_event: ExitEvent | None) -> bool:
    """A process that exited 0 on its own, on a machine that did not fail."""
    return (
        state != "failed"
        and exit_event is not None
        and exit_event.exit_code == 0
        and not exit_event.oom_killed
    )


def _tail(lines: list[str], count: int, limit: int) -> list[str]:
    """The last `count` lines, each and all together within `limit` bytes."""
    kept: list[str] = []
    size = 0
    for line in reversed(lines[-count:]):
        line = line[:limit]
        size += len(line.encode()) + 1
        if size > limit:
            break
        kept.append(line)
    return kept[::-1]
