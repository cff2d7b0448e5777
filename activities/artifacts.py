"""A job's artifacts on the worker: what its machine is told to collect, and what it left.

The presigned URLs are minted here, inside `create_machine`, and go only into the machine's
config (to Fly): never into a workflow's input or result. The machine (agent/artifacts.py)
uploads the files, then their index; `finish_job` reads the index into the job's result.
"""

from __future__ import annotations

import json
import time

from sortie.artifacts import Artifacts, artifacts_key, from_index, grace_s, index_key
from sortie.spec import Job
from sortie.store import ObjectStore

ARTIFACTS = "SORTIE_ARTIFACTS"
ARTIFACTS_URL = "SORTIE_ARTIFACTS_URL"
INDEX_URL = "SORTIE_ARTIFACTS_INDEX_URL"

Attempt = tuple[str, str, int, int]
"""(batch, job, turn, attempt): whose objects these are."""


async def machine_env(
    store: ObjectStore, job: Job, attempt: Attempt, valid_s: int
) -> dict[str, str]:
    """What the machine needs to collect the job's artifacts: the request and two PUT URLs.

    `collect_at` comes a little before the deadline the worker will hold the job to (that
    deadline starts once this create has returned, so it is no earlier than now + timeout).
    """
    if not job.artifacts:
        return {}
    request = {
        "globs": job.artifacts,
        "max_bytes": job.artifacts_max_bytes,
        "collect_at": round(time.time() + job.timeout_s - grace_s(job.timeout_s), 3),
    }
    return {
        ARTIFACTS: json.dumps(request),
        ARTIFACTS_URL: await store.presign_put(artifacts_key(*attempt), valid_s),
        INDEX_URL: await store.presign_put(index_key(*attempt), valid_s),
    }


async def left(store: ObjectStore, attempt: Attempt) -> Artifacts | None:
    """The artifacts a job attempt's machine uploaded, as its result keeps them; None if none."""
    payload = await store.get(index_key(*attempt))
    if payload is None:
        return None
    return from_index(payload, artifacts_key(*attempt), index_key(*attempt))
