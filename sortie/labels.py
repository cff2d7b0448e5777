"""How Sortie names and tags what it creates, so anything can be found again.

Machine names are deterministic per (batch, job, attempt): a create retried after a lost
response finds the machine it already made instead of making a second one. Metadata names the
batch, chunk, job and attempt, which is what the orphan reaper and the tests search by.
"""

from __future__ import annotations

import hashlib
import re

from temporalio.common import SearchAttributeKey

BATCH_ID = SearchAttributeKey.for_keyword("BatchId")

META_BATCH = "sortie_batch"
META_CHUNK = "sortie_chunk"
META_JOB = "sortie_job"
META_ATTEMPT = "sortie_attempt"
META_TURN = "sortie_turn"
META_OWNER = "sortie_owner"
META_MANAGED = "sortie"
META_REUSE = "sortie_reuse"
"""On a machine of a batch with `reuse_machines`: it outlives its job and chunk, and its batch
(META_OWNER) owns it, so the reaper asks only whether the batch still runs."""


def chunk_workflow_id(batch_id: str, index: int) -> str:
    """The workflow id of a batch's chunk, e.g. `batch-nightly-1a2b3c4d-chunk-0003`."""
    return f"{batch_id}-chunk-{index:04d}"


def followup_workflow_id(batch_id: str, job_id: str, turn: int) -> str:
    """The workflow id of a follow-up turn of a job, e.g. `batch-x-1a2b3c4d-followup-api-2`."""
    return f"{batch_id}-followup-{job_id}-{turn}"


def machine_name(batch_id: str, job_id: str, attempt: int, turn: int = 1) -> str:
    """A Fly machine name unique to one attempt of one job's turn (lowercase, <= 63 chars)."""
    digest = hashlib.sha256(f"{batch_id}\0{job_id}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", job_id.lower()).strip("-")[:32] or "job"
    step = f"a{attempt}" if turn == 1 else f"t{turn}a{attempt}"
    return f"sortie-{slug}-{digest}-{step}"


def machine_metadata(
    batch_id: str,
    chunk: int,
    job_id: str,
    attempt: int,
    owner: str,
    turn: int = 1,
    *,
    reuse: bool = False,
) -> dict[str, str]:
    """The metadata every Sortie machine carries; `owner` is the workflow that destroys it (the
    batch, for a machine that serves many jobs)."""
    metadata = {
        META_MANAGED: "1",
        META_BATCH: batch_id,
        META_CHUNK: str(chunk),
        META_JOB: job_id,
        META_ATTEMPT: str(attempt),
        META_TURN: str(turn),
        META_OWNER: batch_id if reuse else owner,
    }
    if reuse:
        metadata[META_REUSE] = "1"
    return metadata
