"""A chunk's jobs and rows in the object store: read when it starts, written when it closes,
each by an activity, not a local one, so a slow store never holds the chunk's task open."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.job_models import JobSlice, LoadedJobs, StoreRowsInput, rows_key
    from activities.jobs import JobActivities
    from sortie.models import JobResult, Tuning
    from workflows import policies


async def load_jobs(claim: JobSlice, tuning: Tuning) -> LoadedJobs:
    """The chunk's jobs, as the starter stored them (digest checked)."""
    return await workflow.execute_activity_method(
        JobActivities.load_jobs,
        claim,
        start_to_close_timeout=timedelta(seconds=tuning.call_timeout_s),
        retry_policy=policies.FLY_RETRY,
        summary=f"read jobs {claim.first_job}-{claim.first_job + claim.size - 1}",
    )


async def store_rows(batch_id: str, results: list[JobResult], tuning: Tuning) -> str:
    """Leave every job's row in the object store, where readers find it once closed; the key."""
    return await workflow.execute_activity_method(
        JobActivities.store_rows,
        StoreRowsInput(
            key=rows_key(batch_id, workflow.info().workflow_id),
            rows=[result.compact() for result in results],
        ),
        start_to_close_timeout=timedelta(seconds=tuning.call_timeout_s),
        retry_policy=policies.STORE_RETRY,
        summary="store the chunk's rows",
    )
