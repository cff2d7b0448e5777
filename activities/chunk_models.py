"""Input and output of `watch_chunks`: which chunks to watch, and how each ended."""

from __future__ import annotations

from sortie.models import StrictModel
from workflows.chunk_models import ChunkOutput


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
