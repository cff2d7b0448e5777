"""When a batch stops itself: too many failed jobs, or a storm of errors that blame the platform.

Every rule is here, as workflows/slots.py holds the window rules:
- Failures are jobs that ended failed or timed out, as the chunks report them. A job that
  succeeded on a retry is a success, and Fly calls retried inside an activity never show. The
  batch stops once they reach `max_failures`, or `max_failure_rate` percent of the finished
  jobs once FAILURE_RATE_AFTER jobs have finished.
- A storm error is an attempt that ended with one of STORM_KINDS, whatever became of its job
  afterwards: the platform, not the job, is to blame, and another machine would meet it again.
  `errors` of them within `within` pause the batch; one of AT_ONCE pauses it at once, until
  the earliest credential rest is over when the chunk's report says when.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.endings import seconds
    from sortie.fields import FAILURE_RATE_AFTER
    from sortie.models import Counts
    from sortie.spec import OnTooManyFailures, StormGuard
    from workflows.batch_models import (
        BatchState,
        FailureLimit,
        FailureLimitRequest,
        PausedBy,
        StormMark,
    )

STORM_KINDS = {
    "rate_limit": "Claude rate limit",
    "overloaded": "Claude API overloaded",
    "auth": "Claude authentication",
    "credentials_resting": "every Claude credential resting",
    "fly_rate_limit": "Fly 429",
    "fly_unavailable": "Fly 5xx or unreachable",
}
"""Job error kinds that count towards a storm, and how the pause reason names them."""
AT_ONCE = frozenset({"credentials_resting"})
"""Kinds that pause the batch the first time: no credential left to try is a storm already."""
_CREATE_KINDS = {
    "FlyRateLimited": "fly_rate_limit",
    "FlyServerError": "fly_unavailable",
    "FlyTransportError": "fly_unavailable",
    "CredentialsResting": "credentials_resting",
}
"""A create's failure by its ApplicationError type: activities/machines.py names Fly's errors
after their class; a pool that has no credential left to hand out refuses as CredentialsResting."""


def check_budget(state: BatchState) -> None:
    """Pause the batch once what its jobs spent reaches its budget."""
    spent = state.counts().cost_usd
    if state.max_cost_usd is None or state.over_budget or spent < state.max_cost_usd:
        return
    state.over_budget = True
    pause(state, f"budget reached: spent ${spent:.4f} of ${state.max_cost_usd:.2f}")


def check_failures(state: BatchState) -> str | None:
    """Pause the batch once its failed jobs reach its limit; why to cancel it, if the limit
    says to cancel instead."""
    limit = state.failure_limit
    if not limit.is_set or state.cancelled or state.paused_by is PausedBy.FAILURES:
        return None
    why = too_many_failures(limit, state.counts())
    if why is None:
        return None
    if limit.on_too_many is OnTooManyFailures.CANCEL:
        return f"too many failures: {why}"
    if not state.paused:
        pause(state, failed(why), PausedBy.FAILURES)
    return None


def check_storm(
    state: BatchState,
    guard: StormGuard | None,
    errors: dict[str, int],
    resting_until: datetime | None = None,
) -> None:
    """Pause the batch when storm errors pass their threshold within the window; a pause
    because every credential rests ends by itself when the earliest rest does."""
    if guard is None or not errors or state.paused or state.cancelled:
        return
    now = workflow.now()
    marks = [StormMark(at=now, kind=kind, count=n) for kind, n in sorted(errors.items())]
    state.storm_marks = recent([*state.storm_marks, *marks], now, guard)
    why = storm(state.storm_marks, guard)
    if why is None:
        return
    if resting_until is not None and any(kind in AT_ONCE for kind in errors):
        state.auto_resume_at = max(resting_until, now)
        why += f" until {when(state.auto_resume_at, now)}; resumes by itself then, or send resume"
    elif guard.auto_resume_after is not None:
        state.auto_resume_at = now + timedelta(seconds=guard.auto_resume_after)
        why += f"; resumes by itself at {when(state.auto_resume_at, now)}, or send resume"
    else:
        why += "; send resume to continue"
    pause(state, why, PausedBy.STORM)


def set_max_cost(state: BatchState, max_cost_usd: float) -> None:
    """A new budget: a batch paused at its budget says to resume; one lowered below what was
    spent pauses at once."""
    state.max_cost_usd = max_cost_usd
    if state.over_budget and state.counts().cost_usd < max_cost_usd:
        state.pause_reason = f"budget raised to ${max_cost_usd:.2f}: send resume to continue"
    check_budget(state)


def set_failure_limit(state: BatchState, request: FailureLimitRequest) -> bool:
    """New failure thresholds; whether the batch was paused by them (then the reason says
    whether to resume, else the batch checks the new limit at once)."""
    state.failure_limit = changed_limit(state.failure_limit, request)
    if state.paused_by is not PausedBy.FAILURES:
        return False
    why = too_many_failures(state.failure_limit, state.counts())
    state.pause_reason = (
        "failure limit raised: send resume to continue" if why is None else failed(why)
    )
    return True


def when(at: datetime, now: datetime) -> str:
    """A moment for a pause reason: its time in UTC, and its date when not today."""
    return f"{at:%H:%M:%S} UTC" if at.date() == now.date() else f"{at:%Y-%m-%d %H:%M:%S} UTC"


def rest_end(error: BaseException) -> datetime | None:
    """Until when every credential rests, as a create refused for it says (its details)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type == "CredentialsResting":
            try:
                return datetime.fromisoformat(str(cause.details[0]))
            except (IndexError, ValueError):
                return None
        cause = cause.__cause__
    return None


def pause(state: BatchState, reason: str, by: PausedBy | None = None) -> None:
    """The batch pauses on its own: the budget is spent, or a guard tripped (or it is told to)."""
    state.pauses += not state.paused
    state.paused, state.pause_reason, state.paused_by = True, reason, by
    if by is not PausedBy.STORM:
        state.auto_resume_at = None


def resume(state: BatchState) -> None:
    """Resume: the storm window starts afresh; the budget and the failure limit still hold
    (the batch checks them again)."""
    state.paused, state.pause_reason, state.paused_by = False, None, None
    state.over_budget = False
    state.storm_marks, state.auto_resume_at = [], None


def failed(why: str) -> str:
    """The pause reason of a batch whose failures reached their limit."""
    return f"too many failures: {why}; raise it with set-failure-limit, then resume"


def create_failure_kind(error: BaseException) -> str | None:
    """The storm kind of a create that failed for good: a Fly 429 or 5xx past its retries, or
    no Claude credential to give the machine."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type in _CREATE_KINDS:
            return _CREATE_KINDS[cause.type]
        cause = cause.__cause__
    return None


def is_storm(kind: str | None) -> bool:
    """Whether an attempt that ended with this error kind counts towards a storm."""
    return kind in STORM_KINDS


def too_many_failures(limit: FailureLimit, counts: Counts) -> str | None:
    """Why the batch's failures reached its limit, or None while they have not."""
    failed = counts.failed + counts.timed_out
    finished = failed + counts.succeeded
    if limit.max_failures is not None and failed >= limit.max_failures:
        return f"{failed} jobs failed, max_failures is {limit.max_failures}"
    if limit.max_failure_rate is not None and finished >= FAILURE_RATE_AFTER:
        rate = 100 * failed / finished
        if rate >= limit.max_failure_rate:
            return (
                f"{failed} of {finished} finished jobs failed ({rate:.0f}%), "
                f"max_failure_rate is {limit.max_failure_rate:g}%"
            )
    return None


def changed_limit(limit: FailureLimit, request: FailureLimitRequest) -> FailureLimit:
    """The limit after a `set_failure_limit`: fields left out stay, a 0 removes that limit."""
    update: dict[str, object] = {}
    if request.max_failures is not None:
        update["max_failures"] = request.max_failures or None
    if request.max_failure_rate is not None:
        update["max_failure_rate"] = request.max_failure_rate or None
    if request.on_too_many_failures is not None:
        update["on_too_many"] = request.on_too_many_failures
    return limit.model_copy(update=update)


def details(state: BatchState, apps: list[str]) -> str:
    """The batch's current details in the Web UI: counts, machines, money, guards, chunks."""
    c, status = state.counts(), state.status()
    if state.paused and state.pause_reason:
        status += f" ({state.pause_reason})"
    elif state.cancelled and state.cancel_reason:
        status += f" ({state.cancel_reason})"
    budget = f" of ${state.max_cost_usd:.2f}" if state.max_cost_usd else ""
    limit = limit_text(state.failure_limit)
    return (
        f"**{c.done}/{c.total} jobs done**, {status}\n\n"
        f"- machines: {c.live_machines + len(state.pool)} live ({len(state.pool)} waiting for "
        f"a job), {c.machines_created} created, cap {state.max_machines}, Fly {', '.join(apps)}\n"
        f"- spent: ${c.cost_usd:.4f}{budget}, {c.num_turns} Claude turns\n"
        f"- jobs: {c.running} running, {c.pending} pending, {c.succeeded} succeeded, "
        f"{c.failed} failed, {c.timed_out} timed out, {c.cancelled} cancelled"
        + (f" (limit: {limit})" if limit else "")
        + f"\n- chunks: {len(state.running())} running, {len(state.pending)} not started, "
        f"{len(state.chunks)} in all"
    )


def limit_text(limit: FailureLimit) -> str | None:
    """The limit as the batch file writes it, or None when there is none."""
    parts: list[str] = []
    if limit.max_failures is not None:
        parts.append(f"max_failures {limit.max_failures}")
    if limit.max_failure_rate is not None:
        parts.append(f"max_failure_rate {limit.max_failure_rate:g}%")
    if not parts:
        return None
    return " or ".join(parts) + f", then {limit.on_too_many.value}"


def recent(marks: list[StormMark], now: datetime, guard: StormGuard) -> list[StormMark]:
    """The marks still inside the storm window."""
    since = now - timedelta(seconds=guard.within)
    return [mark for mark in marks if mark.at > since]


def storm(marks: list[StormMark], guard: StormGuard) -> str | None:
    """Why the errors in the window make a storm, or None while they do not."""
    if any(mark.kind in AT_ONCE for mark in marks):
        return "storm: every Claude credential is resting"
    kinds: Counter[str] = Counter()
    for mark in marks:
        kinds[mark.kind] += mark.count
    total = sum(kinds.values())
    if total < guard.errors:
        return None
    commonest = sorted(kinds.items(), key=lambda item: (-item[1], item[0]))
    named = ", ".join(f"{n} {STORM_KINDS.get(kind, kind)}" for kind, n in commonest)
    return f"storm: {total} errors within {seconds(guard.within)} ({named})"
