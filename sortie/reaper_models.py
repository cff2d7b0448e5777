"""Input and output of the orphan reaper."""

from __future__ import annotations

from sortie.models import StrictModel

REAPER_WORKFLOW = "ReaperWorkflow"
"""The reaper workflow's type: the starter and the worker's schedules start it by name."""


class ReapInput(StrictModel):
    """Find, and unless dry_run destroy, Sortie machines no running workflow owns."""

    app: str
    dry_run: bool = False


class Orphan(StrictModel):
    """A machine with Sortie's metadata whose batch or chunk is closed or unknown."""

    machine_id: str
    name: str | None
    state: str | None
    batch_id: str | None
    job_id: str | None
    chunk: int | None = None
    reason: str


class ReapOutput(StrictModel):
    """What the reaper found and did."""

    app: str
    checked: int
    orphans: list[Orphan]
    destroyed: int
    cancelled_chunks: list[str] = []
    expired_sessions: list[str] = []
    stale_reports: int = 0
    """Agent reports of closed batches, read long ago, deleted from the store."""
    dry_run: bool = False
