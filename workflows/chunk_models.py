"""The chunk workflow's input and output, and what it and its batch tell each other."""

from __future__ import annotations

from pydantic import Field

from activities.job_models import JobSlice
from sortie.models import Counts, Followup, JobResult, StrictModel, Tuning
from sortie.spec import Job


class ChunkInput(StrictModel):
    """Start a chunk: where its jobs are (a claim on the object store) and its machine slots.

    A chunk is a child of its batch and reports to it; a follow-up turn runs as a chunk of one
    job with no parent, and reports to nobody: its one job travels in `jobs` itself.
    """

    batch_id: str
    index: int
    app: str
    claim: JobSlice | None = None
    jobs: list[Job] = []
    slots: int
    paused: bool = False
    budgeted: bool = False
    tuning: Tuning = Tuning()
    followup: Followup | None = None


class ChunkOutput(StrictModel):
    """A finished chunk: every job's result in input order."""

    index: int
    counts: Counts
    results: list[JobResult]


class ChunkReport(StrictModel):
    """A chunk tells the batch what it has released and how far it is.

    Signals between workflows may arrive out of order: `seq` lets the batch keep only the newest
    counts, while `released` (a delta) counts whatever order it arrives in.
    """

    index: int
    seq: int = 0
    released: int = 0
    wants_more: bool = True
    counts: Counts
    done: bool = False


class SlotGrant(StrictModel):
    """The batch gives a chunk more machine slots, or asks for some back as jobs finish."""

    grant: int = Field(default=0, ge=0)
    give_back: int = Field(default=0, ge=0)
