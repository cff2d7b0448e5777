"""How a job's machine ended, turned into the job's state: the one rule for "run it again?".

Both sides need the verdict: the chunk workflow, to retry a job on a new machine, and the
`finish_job` activity, which hands a slot to the next job only when the job that held it ended
for good. Both call `machine_failure` (activities/endings.py), so they can never disagree.
"""

from __future__ import annotations

from activities.endings import machine_failure, seconds
from activities.machine_models import (
    CollectResultOutput,
    JobAnswer,
    WaitMachineOutput,
    WaitOutcome,
)
from sortie.models import JobResult, JobState
from sortie.spec import Job


def succeeded(waited: WaitMachineOutput, collected: CollectResultOutput | None) -> bool:
    """Whether the job succeeded: it exited 0 on its own in time, with its report if it had one
    and that report names no error (an answer that misses its json_schema is one).

    `record_outcome` gives a job this verdict.
    """
    answer = collected.answer if collected else None
    return (
        machine_failure(waited, collected) is None
        and waited.outcome is not WaitOutcome.TIMED_OUT
        and collected is not None
        and collected.exit_code == 0
        and not (answer is not None and answer.error_kind is not None)
    )


def record_outcome(
    job: Job, result: JobResult, waited: WaitMachineOutput, collected: CollectResultOutput | None
) -> str | None:
    """Write how the job ended into `result`; return why its machine failed, if it did."""
    result.machine_state = collected.state if collected else waited.state
    if collected:
        result.exit_code = collected.exit_code
        result.log_tail = collected.log_tail
        result.log_ref = collected.log_ref
    answer = collected.answer if collected else None
    if answer is not None:
        _record_answer(result, answer)
    failure = machine_failure(
        waited, collected, boot_timeout_s=job.boot_timeout_s, credential=result.credential
    )
    if failure is not None:
        return failure
    code = collected.exit_code if collected else None
    if succeeded(waited, collected):
        result.state, result.error = JobState.SUCCEEDED, None
    elif waited.outcome is WaitOutcome.TIMED_OUT:
        result.state, result.error = (
            JobState.TIMED_OUT,
            f"exceeded its timeout of {seconds(job.timeout_s)}",
        )
    elif collected is None or code is None:
        # The job ran; running it again could do its work twice. Report, don't retry.
        result.state, result.error = (
            JobState.FAILED,
            "machine stopped but Fly recorded no exit code",
        )
    elif answer is not None and answer.error_kind == "no_report":
        # Whatever the exit code, an answer that never arrived is no success (claude-code#85040).
        result.state, result.error = JobState.FAILED, f"no report from the agent: {answer.result}"
    elif answer is not None and answer.failure:
        result.state, result.error = JobState.FAILED, answer.failure
    elif answer is not None and answer.error_kind:
        result.state = JobState.FAILED
        result.error = f"Claude failed ({answer.error_kind}): {(answer.result or '')[:200]}"
    else:
        result.state, result.error = JobState.FAILED, f"exited with code {code}"
    return None


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
    result.structured = answer.structured
    result.archive_ref = answer.archive_ref
    result.commits = answer.commits
    result.iterations = answer.iterations
    result.changes = answer.changes
    result.pushed = answer.pushed


def why(error: BaseException) -> str:
    """The innermost failure message of an activity's error: what actually went wrong."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return str(cause) or type(cause).__name__


def is_cancellation(error: BaseException) -> bool:
    """Whether an activity's error is its cancellation."""
    cause: BaseException | None = error
    while cause is not None:
        if type(cause).__name__ == "CancelledError":
            return True
        cause = cause.__cause__
    return False
