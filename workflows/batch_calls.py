"""What a batch asks of activities besides its chunks: check its apps and secrets before any
machine exists, release its session archives at its end, and tell its webhook (`notify`)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.machine_models import CheckBatchInput, ReleaseSessionsInput
    from activities.machines import MachineActivities
    from activities.notify import NotifyActivities
    from activities.notify_models import NoticeInput
    from sortie.notify import NotifyEvent
    from workflows import policies
    from workflows.batch_models import BatchInput, BatchState


async def check_batch(input: BatchInput, state: BatchState) -> None:
    """Refuse the batch before any machine exists: no such Fly app, or a missing secret."""
    apps = input.every_app()
    try:
        await workflow.execute_activity_method(
            MachineActivities.check_batch,
            CheckBatchInput(apps=apps, names=input.secrets, needs_claude=input.prompt_jobs),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=policies.FLY_RETRY,
            summary=f"check Fly app{'s' * (len(apps) > 1)} {', '.join(apps)} "
            "and the batch's secrets",
        )
    except ActivityError as error:
        cause = error.cause if error.cause is not None else error
        await notify(input, state, NotifyEvent.FAILED, f"batch rejected: {cause}")
        raise ApplicationError(f"batch rejected: {cause}", non_retryable=True) from None


async def release_sessions(input: BatchInput) -> None:
    """Let the batch's session archives go, after `keep_sessions` (they live as long as the
    batch, or longer)."""
    await workflow.execute_activity_method(
        MachineActivities.release_sessions,
        ReleaseSessionsInput(batch_id=input.batch_id, keep_s=input.keep_sessions_s),
        start_to_close_timeout=timedelta(seconds=60),
        retry_policy=policies.FLY_RETRY,
        summary="release the batch's session archives",
    )


async def notify(
    input: BatchInput, state: BatchState, event: NotifyEvent, reason: str | None = None
) -> None:
    """Tell the batch's webhook of the event, if it asked for it; one that never answers
    is logged, and the batch goes on."""
    if input.notify is None or event not in input.notify.events:
        return
    delivery = f"{input.batch_id}/{event.value}"
    if event is NotifyEvent.PAUSED:
        delivery += f"-{state.pauses}"
        reason = state.pause_reason
    notice = NoticeInput(
        batch_id=input.batch_id,
        name=input.name,
        event=event,
        delivery=delivery,
        notify=input.notify,
        status=state.status() if event is not NotifyEvent.FAILED else "rejected",
        counts=state.counts(),
        chunks=len(input.jobs.digests),
        reason=reason,
    )
    try:
        await workflow.execute_activity_method(
            NotifyActivities.notify,
            notice,
            start_to_close_timeout=timedelta(seconds=input.tuning.call_timeout_s),
            schedule_to_close_timeout=policies.NOTIFY_DEADLINE,
            retry_policy=policies.NOTIFY_RETRY,
            summary=f"tell the webhook: batch {event.value}",
        )
    except ActivityError as error:
        workflow.logger.warning("the webhook was not told of %s: %s", delivery, error.cause)
