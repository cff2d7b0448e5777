"""Submit a batch: its jobs to the store, its workflow started once under its id."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.job_models import JobsClaim, LoadedJobs, jobs_key
from client.batches.status import _status
from sortie.fields import BatchFileError
from sortie.labels import BATCH_ID
from sortie.models import Followup, JobResult, Tuning
from sortie.pacing import APPS_MEMO, batch_priority
from sortie.settings import Settings
from sortie.spec import BatchSpec, Job, resolve_job
from sortie.store import ObjectStore
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    BatchInput,
    FailureLimit,
)

PAYLOAD_BYTES = 512 * 1024
"""Most any workflow or activity input or result may take: the jobs travel by the store."""
CHUNK_INPUT_BYTES = 400_000
"""Most a chunk's jobs may take with the defaults applied: `load_jobs` returns them all, and
its result stays below PAYLOAD_BYTES."""
STORE_AT_ONCE = 16
"""Chunk objects the starter uploads at once."""
BATCH_TASK_TIMEOUT = timedelta(seconds=60)
DETAILS_LIMIT = 18_000


class Submitted(BaseModel):
    """What `submit` did."""

    batch_id: str
    created: bool
    status: str


class BatchReport(BaseModel):
    """A batch's totals and per-job results in input order: the `--json` document."""

    batch_id: str
    name: str | None
    status: str
    total: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int
    pending: int
    running: int
    live_machines: int
    machines_created: int = 0
    """Machines the batch created: one per job attempt, fewer with `reuse_machines`."""
    cost_usd: float = 0.0
    num_turns: int = 0
    paused: bool = False
    pause_reason: str | None = None
    cancel_reason: str | None = None
    results: list[JobResult]
    retries: list[str] = []
    """With `--latest`: the retries whose outcomes the rows include, oldest first."""
    latest_from: dict[str, str] = {}
    """With `--latest`: job id → the retry its row comes from (the others are the batch's own)."""


@dataclass(frozen=True)
class ClaimedBatch:
    """A batch's workflow input and the objects its claim check names (key to bytes)."""

    input: BatchInput
    objects: dict[str, bytes]
    jobs: list[Job]


def batch_input(spec: BatchSpec, batch_id: str, tuning: Tuning | None = None) -> ClaimedBatch:
    """The workflow input for a validated batch file, and its jobs as one object per chunk."""
    jobs = resolved_jobs(spec)
    return claimed_batch(
        batch_id,
        jobs,
        chunk_size(spec, jobs),
        name=spec.name,
        app=spec.app,
        apps=spec.fly_apps if spec.apps else [],
        priority=spec.priority,
        max_machines=spec.max_machines,
        max_cost_usd=spec.max_cost_usd,
        keep_sessions_s=spec.keep_sessions,
        reuse_idle_s=spec.reuse_idle if spec.reuse_machines else None,
        failure_limit=FailureLimit(
            max_failures=spec.max_failures,
            max_failure_rate=spec.max_failure_rate,
            on_too_many=spec.on_too_many_failures,
        ),
        storm=spec.storm,
        notify=spec.notify,
        tuning=tuning or Tuning(),
    )


def claimed_batch(
    batch_id: str,
    jobs: list[Job],
    size: int,
    continues: dict[str, Followup] | None = None,
    **fields: Any,
) -> ClaimedBatch:
    """The workflow input for these jobs (defaults applied) in chunks of `size`, and the jobs
    as one object per chunk, with the sessions a retry's jobs continue (`continues`, by id);
    `fields` are the batch's other settings (BatchInput's).

    The same jobs give the same objects and digests, so submitting them again is harmless.
    """
    objects: dict[str, bytes] = {}
    digests: list[str] = []
    for index, first in enumerate(range(0, len(jobs), size)):
        some = jobs[first : first + size]
        going_on = {job.id: f for job in some if (f := (continues or {}).get(job.id))}
        data = LoadedJobs(jobs=some, continues=going_on).model_dump_json().encode()
        objects[jobs_key(batch_id, index)] = data
        digests.append(hashlib.sha256(data).hexdigest())
    claimed = BatchInput(
        batch_id=batch_id,
        **fields,
        jobs=JobsClaim(batch_id=batch_id, total=len(jobs), chunk_size=size, digests=digests),
        secrets=sorted(
            {name for job in jobs for name in job.secrets}
            | set(notify.secret_names() if (notify := fields.get("notify")) else [])
        ),
        prompt_jobs=any(job.prompt is not None for job in jobs),
    )
    encoded = len(claimed.model_dump_json())
    if encoded > PAYLOAD_BYTES:
        raise BatchFileError(
            claimed.name,
            [
                f"the batch's input is {encoded:,} bytes once encoded, over {PAYLOAD_BYTES:,} "
                f"({len(digests):,} chunks): split it into several batches"
            ],
        )
    return ClaimedBatch(claimed, objects, jobs)


def resolved_jobs(spec: BatchSpec) -> list[Job]:
    """Every job with the batch's defaults applied, as its chunk will run it."""
    return [resolve_job(spec.defaults, job, i) for i, job in enumerate(spec.jobs)]


async def store_jobs(store: ObjectStore, objects: dict[str, bytes]) -> None:
    """Upload a batch's chunk objects, a few at once."""
    limit = asyncio.Semaphore(STORE_AT_ONCE)

    async def put(key: str, data: bytes) -> None:
        async with limit:
            await store.put(key, data)

    await asyncio.gather(*(put(key, data) for key, data in objects.items()))


def chunk_size(spec: BatchSpec, jobs: list[Job] | None = None) -> int:
    """Jobs per chunk: balanced over the machines, and few enough that a chunk's jobs fit in
    the one activity result that reads them.

    Each job reaches its chunk with the batch's defaults applied, so a long default prompt is
    repeated in every job; a chunk of such jobs gets fewer of them.
    """
    resolved = resolved_jobs(spec) if jobs is None else jobs
    largest, job_id = max((len(job.model_dump_json()), job.id) for job in resolved)
    if largest > CHUNK_INPUT_BYTES:
        raise BatchFileError(
            spec.name,
            [
                f"job {job_id!r} is {largest:,} bytes with the defaults applied; a job may take "
                f"at most {CHUNK_INPUT_BYTES:,}: shorten its prompt or env"
            ],
        )
    return spec.balanced_chunk_size(most=CHUNK_INPUT_BYTES // largest)


def _details(claimed: ClaimedBatch) -> str:
    """Markdown for the Web UI: the batch's shape and its first jobs."""
    data = claimed.input
    apps = data.apps or [data.app]
    where = f"app `{apps[0]}`" if len(apps) == 1 else "apps " + ", ".join(f"`{a}`" for a in apps)
    lines = [
        f"**{data.name}** on Fly {where}: {data.jobs.total} jobs, "
        f"at most {data.max_machines} machines, chunks of {data.jobs.chunk_size}",
        "",
        "| job | kind | what |",
        "|---|---|---|",
    ]
    for job in claimed.jobs:
        what = " ".join(job.command) if job.command else (job.prompt or "")
        kind = "command" if job.command else "prompt"
        lines.append(f"| {job.id} | {kind} | {what[:80].replace('|', '/')} |")
        if sum(len(line) for line in lines) > DETAILS_LIMIT:
            lines.append(f"| … | | {data.jobs.total} jobs in all |")
            break
    return "\n".join(lines)


async def submit(
    client: Client,
    settings: Settings,
    spec: BatchSpec,
    *,
    suffix: str | None = None,
    tuning: Tuning | None = None,
    details: str | None = None,
    memo: dict[str, object] | None = None,
) -> Submitted:
    """Start the batch; the same file submitted twice is the same batch."""
    batch_id = spec.batch_id(suffix)
    claimed = batch_input(spec, batch_id, tuning)
    return await _start_batch(
        client,
        settings,
        claimed,
        summary=f"batch {spec.name}: {len(spec.jobs)} jobs on " + ", ".join(spec.fly_apps),
        details=details or _details(claimed),
        memo=memo,
    )


async def _start_batch(
    client: Client,
    settings: Settings,
    claimed: ClaimedBatch,
    *,
    summary: str,
    details: str,
    memo: dict[str, object] | None,
) -> Submitted:
    """Store the jobs and start the batch, unless a batch of that id exists: submit and retry
    are idempotent."""
    data = claimed.input
    batch_id = data.batch_id
    existing = await _status(client, batch_id)
    if existing is not None:
        return Submitted(batch_id=batch_id, created=False, status=existing)
    await store_jobs(settings.blob_store(), claimed.objects)
    try:
        await client.start_workflow(
            BatchWorkflow.run,
            data,
            id=batch_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes([SearchAttributePair(BATCH_ID, batch_id)]),
            static_summary=summary,
            static_details=details,
            # The workers read which apps' create queues to poll from this memo (sortie/pacing).
            memo={**(memo or {}), APPS_MEMO: data.apps or [data.app]},
            priority=batch_priority(data.priority, batch_id),
            # A large batch's workflow task may take seconds on a loaded worker; a task that
            # times out is replayed from scratch, which only takes longer.
            task_timeout=BATCH_TASK_TIMEOUT,
        )
    except WorkflowAlreadyStartedError:
        return Submitted(
            batch_id=batch_id, created=False, status=await _status(client, batch_id) or "unknown"
        )
    return Submitted(batch_id=batch_id, created=True, status="running")
