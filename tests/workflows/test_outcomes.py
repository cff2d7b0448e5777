"""The one verdict on how a job's machine ended: what the chunk retries and what it records."""

from __future__ import annotations

import pytest

from activities.endings import machine_failure, reusable
from activities.machine_models import (
    STALLED,
    CollectResultOutput,
    JobAnswer,
    WaitMachineOutput,
    WaitOutcome,
)
from sortie.models import JobResult, JobState
from sortie.spec import Job
from workflows.outcomes import record_outcome


def _ended(
    outcome: WaitOutcome, *, exit_code: int | None = 1, oom: bool = False, error_kind: str = ""
) -> tuple[WaitMachineOutput, CollectResultOutput | None]:
    collected = None
    if outcome in (WaitOutcome.EXITED, WaitOutcome.FAILED):
        answer = JobAnswer(error_kind=error_kind, result="why") if error_kind else None
        collected = CollectResultOutput(
            state="stopped", exit_code=exit_code, oom_killed=oom, answer=answer
        )
    return WaitMachineOutput(outcome=outcome), collected


@pytest.mark.parametrize(
    ("ended", "retried"),
    [
        (_ended(WaitOutcome.EXITED), False),
        (_ended(WaitOutcome.TIMED_OUT), False),
        (_ended(WaitOutcome.EXITED, error_kind="max_turns"), False),
        (_ended(WaitOutcome.EXITED, oom=True), True),
        (_ended(WaitOutcome.EXITED, error_kind="rate_limit"), True),
        (_ended(WaitOutcome.EXITED, error_kind="auth"), True),
        (_ended(WaitOutcome.EXITED, error_kind="stalled"), True),
        (_ended(WaitOutcome.EXITED, error_kind="overloaded"), False),
        (_ended(WaitOutcome.EXITED, error_kind="invalid_request"), False),
        (_ended(WaitOutcome.EXITED, exit_code=0, error_kind="invalid_output"), False),
        (_ended(WaitOutcome.FAILED), True),
        (_ended(WaitOutcome.BOOT_TIMEOUT), True),
        (_ended(WaitOutcome.GONE), True),
    ],
)
def test_only_the_machines_failures_are_retried_and_recorded_as_such(
    ended: tuple[WaitMachineOutput, CollectResultOutput | None], retried: bool
) -> None:
    waited, collected = ended
    result = JobResult(job_id="j", index=0)
    failure = record_outcome(Job(id="j", index=0), result, waited, collected)
    assert (failure is not None) is retried
    assert (machine_failure(waited, collected) is not None) is retried
    if not retried:
        assert result.state.final and result.state is not JobState.SUCCEEDED, result


@pytest.mark.parametrize("exit_code", [0, 1])
def test_a_prompt_job_without_its_report_is_never_a_success(exit_code: int) -> None:
    # claude-code#85040: Claude itself can exit 0 with no result; a lost report is the same.
    waited, collected = _ended(WaitOutcome.EXITED, exit_code=exit_code, error_kind="no_report")
    result = JobResult(job_id="j", index=0)
    assert record_outcome(Job(id="j", index=0, prompt="p"), result, waited, collected) is None
    assert result.state is JobState.FAILED
    assert result.error is not None and "no report" in result.error


def test_an_exit_of_zero_succeeds_and_a_timeout_says_how_long() -> None:
    job = Job(id="j", index=0, timeout_s=1800)
    result = JobResult(job_id="j", index=0)
    assert record_outcome(job, result, *_ended(WaitOutcome.EXITED, exit_code=0)) is None
    assert result.state is JobState.SUCCEEDED and result.error is None
    timed_out = JobResult(job_id="j", index=0)
    assert record_outcome(job, timed_out, *_ended(WaitOutcome.TIMED_OUT)) is None
    assert timed_out.state is JobState.TIMED_OUT
    assert timed_out.error == "exceeded its timeout of 30m"


def test_only_a_machine_whose_job_ended_by_itself_is_reusable() -> None:
    """`reuse_machines`: a clean exit (any code) keeps the machine; nothing else does."""
    exited = WaitMachineOutput(outcome=WaitOutcome.EXITED, state="stopped")

    def collected(**fields: object) -> CollectResultOutput:
        return CollectResultOutput.model_validate({"state": "stopped", "exit_code": 0, **fields})

    assert reusable(exited, collected())
    assert reusable(exited, collected(exit_code=3))
    assert not reusable(exited, collected(oom_killed=True))
    assert not reusable(exited, collected(exit_code=137, signal=9))
    assert not reusable(exited, None)
    for outcome in (WaitOutcome.TIMED_OUT, WaitOutcome.FAILED, WaitOutcome.GONE):
        assert not reusable(WaitMachineOutput(outcome=outcome, state="stopped"), collected())
    stalled = JobAnswer(is_error=True, error_kind=STALLED)
    assert not reusable(exited, collected(answer=stalled))
