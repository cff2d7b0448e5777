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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import artifacts
from activities.credentials import Credential, CredentialsResting, NoCredential
from activities.endings import reusable
from activities.exit_reads import ExitReads
from activities.fly_calls import RETRY_AFTER_MOST_S, fly_errors, patiently
from activities.machine_collect import (
    MachineCollect,
    _about,
    _attempt_key,
)
from activities.machine_models import (
    CREDENTIALS_RESTING_ERROR,
    CheckBatchInput,
    CheckBatchOutput,
    CollectResultInput,
    CreateMachineInput,
    CreateMachineOutput,
    DestroyMachineInput,
    DestroyMachineOutput,
    FinishJobInput,
    FinishJobOutput,
    ReadLogsInput,
    ReadLogsOutput,
    ReleaseSessionsInput,
    ReleaseSessionsOutput,
    ReuseMachineInput,
    WaitMachineOutput,
    WaitOutcome,
)
from activities.secrets import SecretStore
from activities.spend_watch import watching_spend
from fly import (
    FlyClient,
    FlyConflict,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyUnauthorized,
    GuestConfig,
    InitConfig,
    Machine,
    MachineConfig,
    RestartConfig,
)
from sortie.claude import CLI_ENV, job_document
from sortie.labels import (
    META_ATTEMPT,
    META_BATCH,
    META_JOB,
    META_TURN,
    machine_metadata,
    machine_name,
)
from sortie.models import MachineRef
from sortie.spec import Job
from sortie.store import (
    KEEP_UNTIL,
    ObjectStore,
    changes_key,
    finished_key,
    report_key,
    session_key,
    session_prefix,
    spend_key,
)

GONE_STATES = {"destroyed", "destroying"}
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


class MachineActivities(MachineCollect):
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
        self._exits = ExitReads(fly)
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

    @activity.defn(name="reuse_machine")
    async def reuse_machine(self, input: ReuseMachineInput) -> CreateMachineOutput:
        """Give a stopped machine the job attempt's whole config through Fly's update call,
        which starts it on a fresh root filesystem; or find an earlier try's update landed.

        The config (secrets, presigned URLs) goes from this worker to Fly only, as a create's.
        The update names the version the machine's last job ran: if an earlier try's update
        landed, Fly refuses (409) and the machine's metadata names this job attempt: it already
        serves this job, which is not started twice.
        """
        ref, job = input.machine, input.job
        turn = input.followup.turn if input.followup else 1
        lookup = _lookup(input.batch_id, job.id, input.attempt, turn)
        with fly_errors(f"reuse machine {ref.machine_id} for job {job.id}"):
            if activity.info().attempt > 1:
                found = await self._serving(ref, lookup)
                if found is not None:
                    return self._found(ref.app, found)
            credential = await self._take_credential() if job.prompt is not None else None
            config = await self._config(input, credential)
            try:
                machine = await self._fly.update_machine(
                    ref.app, ref.machine_id, config, current_version=ref.version
                )
            except FlyConflict:
                found = await self._serving(ref, lookup)
                if found is None:
                    raise
                return self._found(ref.app, found)
        activity.logger.info("reused machine %s for job %s", machine.id, job.id)
        return CreateMachineOutput(
            machine=_ref(ref.app, machine),
            credential=credential.name if credential else None,
        )

    async def _serving(self, ref: MachineRef, lookup: dict[str, str]) -> Machine | None:
        """The machine, if its config already names this job attempt (an update landed)."""
        machine = await patiently(lambda: self._fly.get_machine(ref.app, ref.machine_id))
        metadata = machine.config.metadata if machine.config else None
        serving = all((metadata or {}).get(key) == value for key, value in lookup.items())
        return machine if serving else None

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
            watching_spend(self._store, input, seen),
        ):
            finished = await self._learned(input.collect)
            if finished is None:
                finished = await self._learn(input, seen)
                if input.collect.artifacts:  # whatever the outcome: a timed-out job's too
                    finished.artifacts = await artifacts.left(
                        self._store, _attempt_key(input.collect)
                    )
                await self._store.put(
                    finished_key(*_attempt_key(input.collect)),
                    finished.model_dump_json().encode(),
                    _about(input.collect),
                )
            if input.keep and reusable(finished.waited, finished.collected):
                finished.kept = True  # stopped; its batch gives it the next job, or destroys it
            else:
                finished.destroyed = await self._destroy_now(ref)
        return finished

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
            collected = await self._collect(input.collect, listed=input.keep)
        elif waited.outcome is WaitOutcome.GONE and input.collect.prompt_job:
            reported = await self._collect(input.collect, listed=input.keep)
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
            until = error.until.isoformat() if error.until else None
            raise ApplicationError(  # the details: until when, a time for the workflow's timer
                str(error), until, type=CREDENTIALS_RESTING_ERROR, non_retryable=True
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
        valid_s = min(int(job.timeout_s + job.boot_timeout_s) + URL_SLACK_S, URL_MOST_S)
        env.update(
            await artifacts.machine_env(
                self._store, job, (input.batch_id, job.id, turn, input.attempt), valid_s
            )
        )
        if credential is not None:
            followup = input.followup
            restore = None
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
            init=_init(job),
            guest=GuestConfig(
                cpu_kind=job.guest.cpu_kind, cpus=job.guest.cpus, memory_mb=job.guest.memory_mb
            ),
            auto_destroy=False,
            restart=RestartConfig(policy="no"),
            metadata=machine_metadata(
                input.batch_id,
                input.chunk_index,
                job.id,
                input.attempt,
                input.owner,
                turn,
                reuse=input.reuse,
            ),
        )
        return config


def _init(job: Job) -> InitConfig | None:
    """A command job's command line: run as it is, or with artifacts given to the agent image's
    entrypoint, which runs it and then uploads them (agent/artifacts.py)."""
    if not job.command:
        return None
    return InitConfig(cmd=job.command) if job.artifacts else InitConfig(exec=job.command)


def _lookup(batch_id: str, job_id: str, attempt: int, turn: int) -> dict[str, str]:
    """The metadata that tells a job attempt's machine from any other of the same name."""
    return {
        META_BATCH: batch_id,
        META_JOB: job_id,
        META_ATTEMPT: str(attempt),
        META_TURN: str(turn),
    }


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
