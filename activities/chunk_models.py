"""Input and output of `watch_chunks`: which chunks to watch, and how each ended."""

from __future__ import annotations

from typing import Any

from sortie.models import StrictModel


class WatchChunksInput(StrictModel):
    """Chunks (their workflow ids) whose end a batch run cannot hear as their parent."""

    workflow_ids: list[str]
    wait_s: float
    heartbeat_every_s: float


class ClosedChunk(StrictModel):
    """A chunk that closed: its output as it was stored (the workflow reads it as its own
    model), or the reason it has none (failed, terminated)."""

    workflow_id: str
    output: dict[str, Any] | None = None
    error: str | None = None
