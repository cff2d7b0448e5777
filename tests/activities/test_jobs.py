"""Reading a chunk's jobs from the store: exactly what the starter stored, or a clear refusal."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.job_models import JobSlice, LoadedJobs
from activities.jobs import JobActivities
from sortie.spec import Job
from sortie.store import StoreSettings, shared_store


async def test_a_chunk_reads_its_jobs_only_if_they_match_their_digest() -> None:
    store = shared_store(StoreSettings.from_env())
    key = f"jobs/t-{uuid.uuid4().hex}/chunk-00000.json"
    data = LoadedJobs(jobs=[Job(id="a", index=0, command=["true"])]).model_dump_json().encode()
    await store.put(key, data)
    claim = JobSlice(key=key, digest=hashlib.sha256(data).hexdigest(), first_job=0, size=1)
    activities = JobActivities(store)
    env = ActivityEnvironment()

    loaded = await env.run(activities.load_jobs, claim)
    assert [job.id for job in loaded.jobs] == ["a"]

    await store.put(key, data.replace(b'"true"', b'"rm -rf"'))  # changed after the submit
    with pytest.raises(ApplicationError) as changed:
        await env.run(activities.load_jobs, claim)
    assert changed.value.type == "JobsChanged" and changed.value.non_retryable

    await store.delete(key)
    with pytest.raises(ApplicationError) as gone:
        await env.run(activities.load_jobs, claim)
    assert gone.value.type == "JobsGone" and key in str(gone.value)
