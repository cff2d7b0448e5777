"""The machine activities' collect step: a machine's exit, report and logs read into an answer."""

from __future__ import annotations

import json

from temporalio import activity

from activities.exit_reads import ExitReads
from activities.fly_calls import fly_errors, patiently
from activities.machine_models import (
    CREDENTIAL_FAULTS,
    CollectResultInput,
    CollectResultOutput,
    JobAnswer,
)
from activities.machine_wait import MachineWait
from activities.secrets import SecretStore
from fly import (
    ExitEvent,
    FlyNotFound,
    Machine,
)
from sortie.claude import PREVIEW_CHARS, AgentReport, ErrorKind
from sortie.models import Iteration, MachineRef
from sortie.spec import LogTail
from sortie.store import (
    ObjectStore,
    answer_key,
    changes_key,
    log_key,
    report_key,
    session_key,
)

ERROR_CHARS = 800
"""How much of the agent's own failure (a failing check's output tail) a result keeps: it rides
in the chunk's history with the row (the agent's whole report stays in the store)."""


class MachineCollect(MachineWait):
    """The collect step: what a machine left (exit, report, logs) read into the job's answer."""

    _exits: ExitReads
    _secrets: SecretStore
    _store: ObjectStore
    _task_queue: str

    async def _collect(
        self, input: CollectResultInput, *, listed: bool = False
    ) -> CollectResultOutput:
        """Read the exit event and the tail of the machine's logs, secrets scrubbed; `listed`:
        the exit from the app's shared list when it shows it (reused machines, see `_ended`)."""
        ref = input.machine
        key = _attempt_key(input)
        exit_code: int | None = None
        with fly_errors(f"collect result of machine {ref.machine_id}"):
            try:
                machine: Machine | None = await (self._ended(ref) if listed else self._get(ref))
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

    async def _ended(self, ref: MachineRef) -> Machine:
        """The machine whose wait just ended: as the app's next list shows it when that shows
        its job's own ending (one list for many jobs), else as Fly's get does.

        Only for batches that reuse machines: their jobs end many a second on few machines, so a
        list saves gets; a job may wait up to a second for the next list, which a batch of one
        machine per job, bound by creates, would pay on every job for no call saved.
        """
        return await self._exits.read(ref) or await self._get(ref)

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
            resets_at=report.resets_at if kind and kind.credential_fault else None,
        )
        if text:  # kept whole off history; the chunk's result carries only the key
            answer.result_ref = await self._store.put(
                answer_key(*key), text.encode(), _about(input)
            )
        if report.session_archive and await self._store.metadata(session_key(*key)) is not None:
            answer.archive_ref = session_key(*key)
        return answer

    async def _rest_if_refused(self, input: CollectResultInput, answer: JobAnswer) -> None:
        """Claude refused the job's credential: rest it for every worker, by name, until its
        usage limit resets when Claude said when."""
        if not (answer.error_kind in CREDENTIAL_FAULTS and input.credential):
            return
        reason = f"{answer.error_kind} error in job {input.job_id}"
        await self._secrets.claude.rest(
            activity.client(), self._task_queue, input.credential, reason, answer.resets_at
        )
        activity.logger.warning(
            "set credential %s aside after a %s error", input.credential, answer.error_kind
        )


def _attempt_key(input: CollectResultInput) -> tuple[str, str, int, int]:
    """The job attempt whose objects these are: one machine's."""
    return (input.batch_id, input.job_id, input.turn, input.attempt)


def _about(input: CollectResultInput) -> dict[str, str]:
    """An object's metadata: whose it is, never anything secret."""
    return {"batch": input.batch_id, "job": input.job_id, "attempt": str(input.attempt)}


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
