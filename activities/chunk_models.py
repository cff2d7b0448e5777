"""A chunk's output, and `watch_chunks`'s input and output: which chunks to watch, how each
ended (activities/ may not import workflows/)."""

from __future__ import annotations

from sortie.models import Counts, MachineRef, StrictModel


class ChunkOutput(StrictModel):
    """A finished chunk: its counts, and where its rows (every job's, in input order) are kept
    in the object store: they stay off its batch's history."""

    index: int
    counts: Counts
    rows: str
    machines: list[MachineRef] = []
    """Stopped machines the chunk held at its end, given back with its slots
    (`reuse_machines`): they travel in its result, as its end does."""


class WatchChunksInput(StrictModel):
    """Chunks (their workflow ids) whose end a batch run cannot hear as their parent."""

    workflow_ids: list[str]
    wait_s: float
    heartbeat_every_s: float


class ChunkEnd(StrictModel):
    """A chunk that closed: its output, or the reason it has none (failed, terminated)."""

    workflow_id: str
    output: ChunkOutput | None = None
    error: str | None = None
