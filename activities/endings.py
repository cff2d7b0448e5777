"""How a job's machine ended, judged where both sides can read it: the workflows' rule for "run
it again?" (workflows/outcomes.py) and `finish_job`'s for "keep the machine for the next job?"
(`reuse_machines`) both start from `machine_failure`, so they can never disagree.
"""

from __future__ import annotations

from activities.machine_models import (
    CREDENTIAL_FAULTS,
    SANDBOX_UNAVAILABLE,
    STALLED,
    CollectResultOutput,
    WaitMachineOutput,
    WaitOutcome,
)


def machine_failure(
    waited: WaitMachineOutput,
    collected: CollectResultOutput | None,
    *,
    boot_timeout_s: float = 0,
    credential: str | None = None,
) -> str | None:
    """Why the machine, not the job, failed (the job deserves a new machine), or None."""
    answer = collected.answer if collected else None
    if answer is not None and answer.error_kind in CREDENTIAL_FAULTS:
        until = f" until {answer.resets_at:%Y-%m-%d %H:%M:%S} UTC" if answer.resets_at else ""
        return f"Claude refused credential {credential} ({answer.error_kind}){until}"
    if answer is not None and answer.error_kind == STALLED:
        # Hung API calls and tools are the platform's; the next machine may well finish.
        return f"the agent stalled: {answer.result or 'no progress within its stall_timeout'}"
    if answer is not None and answer.error_kind == SANDBOX_UNAVAILABLE:
        return f"the machine could not start the agent's sandbox: {answer.result or ''}".rstrip()
    match waited.outcome:
        case WaitOutcome.BOOT_TIMEOUT:
            return f"machine did not start within {seconds(boot_timeout_s)}"
        case WaitOutcome.FAILED:
            return "machine entered the failed state"
        case WaitOutcome.GONE:
            return "machine disappeared before the job finished"
        case WaitOutcome.EXITED if collected and collected.oom_killed:
            return "machine ran out of memory (OOM killed)"
    return None


def reusable(waited: WaitMachineOutput, collected: CollectResultOutput | None) -> bool:
    """Whether the machine may take another job: its job's process ended on its own, in time,
    and the machine did not fail (a timeout, OOM, stall, infrastructure failure or a cancel
    leaves a machine nobody should trust with the next job)."""
    return (
        waited.outcome is WaitOutcome.EXITED
        and machine_failure(waited, collected) is None
        and collected is not None
        and collected.state == "stopped"
        and collected.exit_code is not None
        and collected.signal is None
    )


def seconds(value: float) -> str:
    """A duration as a batch file would write it: 30m, 1h, 2.5s."""
    whole = int(value)
    if whole == value and whole and whole % 3600 == 0:
        return f"{whole // 3600}h"
    if whole == value and whole and whole % 60 == 0:
        return f"{whole // 60}m"
    return f"{value:g}s"
