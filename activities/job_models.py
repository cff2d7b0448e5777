"""The claim check for a batch's jobs: where they wait in the object store, and their digests.

The starter stores the validated jobs (defaults applied) as one object per chunk; workflow
inputs carry only these references, so a batch of any size starts with a small input.
"""

from __future__ import annotations

from sortie.models import Followup, JobResult, StrictModel
from sortie.spec import Job


class JobsClaim(StrictModel):
    """A batch's jobs in the store: `total` jobs in chunks of `chunk_size`, one digest each."""

    batch_id: str
    total: int
    chunk_size: int
    digests: list[str]
    """The sha256 of each chunk's object, in chunk order."""

    def slice(self, index: int) -> JobSlice:
        """Chunk `index`'s reference."""
        first = index * self.chunk_size
        return JobSlice(
            key=jobs_key(self.batch_id, index),
            digest=self.digests[index],
            first_job=first,
            size=min(self.chunk_size, self.total - first),
        )


class JobSlice(StrictModel):
    """One chunk's jobs in the store: read them with the `load_jobs` activity."""

    key: str
    digest: str
    first_job: int
    size: int


class LoadedJobs(StrictModel):
    """A chunk's jobs, as the starter stored them."""

    jobs: list[Job]
    continues: dict[str, Followup] = {}
    """A retry's jobs among these that continue their Claude session (ran out of turns or
    budget), by id: kept with the jobs, off history."""


def jobs_key(batch_id: str, index: int) -> str:
    """Where chunk `index` of a batch keeps its jobs."""
    return f"{JOBS}/{batch_id}/chunk-{index:05d}.json"


JOBS = "jobs"


class StoredRows(StrictModel):
    """A closed chunk's per-job rows, in input order, as it left them in the store."""

    rows: list[JobResult]


class StoreRowsInput(StrictModel):
    """Write a closed chunk's rows to the store, under `key`."""

    key: str
    rows: list[JobResult]


def rows_key(batch_id: str, workflow_id: str) -> str:
    """Where a chunk (or a follow-up turn) leaves its rows when it closes."""
    return f"{ROWS}/{batch_id}/{workflow_id}.json"


ROWS = "rows"
