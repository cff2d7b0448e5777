"""A chunk's jobs and rows in the object store: it reads the jobs the starter put there (the
claim check), and leaves its rows there when it closes, off its batch's history."""

from __future__ import annotations

import hashlib

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.job_models import JobSlice, LoadedJobs, StoredRows, StoreRowsInput
from sortie.store import ObjectStore


class JobActivities:
    """Owns the object store the batch's jobs and rows are kept in."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @activity.defn(name="load_jobs")
    async def load_jobs(self, input: JobSlice) -> LoadedJobs:
        """A chunk's jobs, refused unless they are exactly what the starter stored."""
        data = await self._store.get(input.key)
        if data is None:
            raise ApplicationError(
                f"the batch's jobs are gone from the object store ({input.key}): was the "
                "bucket emptied, or does this worker use another one than the starter?",
                type="JobsGone",
                non_retryable=True,
            )
        if hashlib.sha256(data).hexdigest() != input.digest:
            raise ApplicationError(
                f"the batch's jobs at {input.key} do not match their digest: changed since "
                "they were submitted",
                type="JobsChanged",
                non_retryable=True,
            )
        loaded = LoadedJobs.model_validate_json(data)
        if len(loaded.jobs) != input.size or loaded.jobs[0].index != input.first_job:
            raise ApplicationError(
                f"{input.key} holds other jobs than the chunk's",
                type="JobsChanged",
                non_retryable=True,
            )
        return loaded

    @activity.defn(name="store_rows")
    async def store_rows(self, input: StoreRowsInput) -> str:
        """Write a closed chunk's rows; a retry rewrites the same object. Returns its key."""
        return await self._store.put(
            input.key, StoredRows(rows=input.rows).model_dump_json().encode()
        )
