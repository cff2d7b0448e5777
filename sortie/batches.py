"""Client-side operations on batches: submit, steer, and read results of any size.

A batch's per-job results live with its chunks (the batch itself only keeps counts), so
reading results means reading each chunk: the rows it left in the object store once closed
(no worker needed), its `results` query while it runs. Nothing here needs a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.job_models import JobsClaim, LoadedJobs, StoredRows, jobs_key, rows_key
from sortie.claude import PREVIEW_CHARS, ErrorKind
from sortie.labels import BATCH_ID, followup_workflow_id
from sortie.models import Counts, Followup, JobResult, JobState, Tuning
from sortie.pacing import APPS_MEMO, batch_priority
from sortie.settings import Settings
from sortie.spec import (
    DEFAULT_PRIORITY,
    BatchFileError,
    BatchSpec,
    Job,
    resolve_job,
)
from sortie.store import ObjectStore, StoreSettings, shared_store
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    BatchInput,
    BatchOutput,
    ChunkProgress,
    ChunkStatus,
    FailureLimit,
    Progress,
)
from workflows.chunk import ChunkWorkflow
from workflows.chunk_models import ChunkInput, ChunkOutput
from workflows.guards import limit_text

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


async def _status(client: Client, workflow_id: str) -> str | None:
    """The workflow's status in lower case, or None when there is no such workflow."""
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as error:
        if error.status is RPCStatusCode.NOT_FOUND:
            return None
        raise
    return description.status.name.lower() if description.status else "unknown"


def batch_handle(client: Client, batch_id: str) -> WorkflowHandle[BatchWorkflow, BatchOutput]:
    """A typed handle on a batch workflow."""
    return client.get_workflow_handle_for(BatchWorkflow.run, batch_id)


def chunk_handle(client: Client, workflow_id: str) -> WorkflowHandle[ChunkWorkflow, ChunkOutput]:
    """A typed handle on a chunk workflow (a follow-up turn is one too)."""
    return client.get_workflow_handle_for(ChunkWorkflow.run, workflow_id)


async def is_closed(client: Client, batch_id: str) -> tuple[bool, WorkflowExecutionStatus | None]:
    """Whether the batch's latest run has closed, and its status."""
    description = await client.get_workflow_handle(batch_id).describe()
    status = description.status
    return status not in (None, WorkflowExecutionStatus.RUNNING), status


async def progress(client: Client, batch_id: str) -> Progress:
    """The batch's progress: from its query while running, from its result once closed."""
    closed, status = await is_closed(client, batch_id)
    if not closed:
        return await _live(
            client, await batch_handle(client, batch_id).query(BatchWorkflow.progress)
        )
    output = await _closed_output(client, batch_id, status)
    counts = Counts.total_of([chunk.counts for chunk in output.chunks])
    return Progress(
        batch_id=batch_id,
        status=output.status,
        paused=False,
        pause_reason=None,
        cancelled=output.status == "cancelled",
        max_machines=0,
        cancel_reason=output.cancel_reason,
        counts=counts,
        chunks=output.chunks,
    )


async def _live(client: Client, progress: Progress) -> Progress:
    """Running chunks' counts asked of the chunks themselves: the batch hears of them in
    batches (every few seconds, or when a slot changes hands), the chunks know them now."""

    async def ask(chunk: ChunkProgress) -> None:
        if chunk.status is not ChunkStatus.RUNNING:
            return
        with contextlib.suppress(RPCError):  # unanswered: the counts it last reported stand
            chunk.counts = await chunk_handle(client, chunk.workflow_id).query(
                ChunkWorkflow.progress
            )

    await asyncio.gather(*(ask(chunk) for chunk in progress.chunks))
    total = Counts.total_of([chunk.counts for chunk in progress.chunks])
    return progress.model_copy(update={"counts": total})


async def _closed_output(
    client: Client, batch_id: str, status: WorkflowExecutionStatus | None
) -> BatchOutput:
    if status is WorkflowExecutionStatus.FAILED:
        reason = await _failure(client, batch_id)
        if reason is not None and REJECTED in reason:
            raise BatchRejected(f"batch {batch_id} was refused by the worker: {reason}")
    if status is not WorkflowExecutionStatus.COMPLETED:
        name = status.name.lower() if status else "unknown"
        raise BatchNotReadable(f"batch {batch_id} ended {name}: it has no results to read")
    return await batch_handle(client, batch_id).result()


REJECTED = "batch rejected:"
"""How the batch workflow's failure begins when the worker refuses its secrets or apps."""


async def _failure(client: Client, batch_id: str) -> str | None:
    """The failed batch's failure message, its causes joined, or None if it did not fail."""
    try:
        await batch_handle(client, batch_id).result()
    except WorkflowFailureError as error:
        messages: list[str] = []
        cause: BaseException | None = error.cause
        while cause is not None:
            messages.append(str(cause))
            cause = cause.__cause__
        return ": ".join(messages)
    return None


class BatchNotReadable(RuntimeError):
    """The batch failed or was terminated, so it has no result document."""


class BatchRejected(BatchNotReadable):
    """The worker refused the batch before any machine (an unknown secret, no credential)."""


@dataclass(frozen=True)
class ChunkView:
    """One chunk's progress in plain values, for the terminal."""

    index: int
    total: int
    done: int
    failed: int
    running: int
    slots: int
    active: bool


@dataclass(frozen=True)
class ProgressView:
    """A batch's progress in plain values, for the terminal: the renderer's whole input."""

    batch_id: str
    status: str
    paused: bool
    pause_reason: str | None
    cancel_reason: str | None
    failure_limit: str | None
    max_machines: int
    max_cost_usd: float | None
    total: int
    done: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int
    running: int
    pending: int
    live_machines: int
    cost_usd: float
    chunks: tuple[ChunkView, ...]
    apps: tuple[str, ...] = ()


def view(p: Progress) -> ProgressView:
    """The `progress` query's answer as plain values (the one place that reads its model)."""
    c = p.counts
    return ProgressView(
        batch_id=p.batch_id,
        status=p.status,
        paused=p.paused,
        pause_reason=p.pause_reason,
        cancel_reason=p.cancel_reason,
        failure_limit=limit_text(p.failure_limit),
        max_machines=p.max_machines,
        max_cost_usd=p.max_cost_usd,
        total=c.total,
        done=c.done,
        succeeded=c.succeeded,
        failed=c.failed,
        timed_out=c.timed_out,
        cancelled=c.cancelled,
        running=c.running,
        pending=c.pending,
        live_machines=c.live_machines,
        cost_usd=c.cost_usd,
        chunks=tuple(
            ChunkView(
                index=chunk.index,
                total=chunk.size,
                done=chunk.counts.done,
                failed=chunk.counts.failed + chunk.counts.timed_out,
                running=chunk.counts.running,
                slots=chunk.slots,
                active=chunk.status is ChunkStatus.RUNNING,
            )
            for chunk in p.chunks
        ),
        apps=tuple(p.apps),
    )


async def progress_view(client: Client, batch_id: str) -> ProgressView:
    """The batch's progress now, as plain values."""
    return view(await progress(client, batch_id))


async def results(
    client: Client, batch_id: str, *, store: ObjectStore | None = None, parallel: int = 16
) -> BatchReport:
    """Every job's result in input order, for a running or closed batch of any size.

    Rows are compact: with `store`, their log tails and answers are read back from it.
    """
    head, chunks, followups = await _head(client, batch_id)
    limit = asyncio.Semaphore(parallel)

    async def read(chunk: ChunkProgress) -> list[JobResult]:
        async with limit:
            return await _chunk_results(client, batch_id, chunk, store)

    per_chunk = await asyncio.gather(*(read(c) for c in chunks))
    flat = [r for rs in per_chunk for r in rs]
    for result in flat:
        _attach_followups(result, followups)
    if store is not None:

        async def expand_one(result: JobResult) -> None:
            async with limit:
                await _expand_turns(result, store)

        await asyncio.gather(*(expand_one(result) for result in flat))
    return head.model_copy(update={"results": flat})


async def _head(
    client: Client, batch_id: str
) -> tuple[BatchReport, list[ChunkProgress], dict[str, list[JobResult]]]:
    """The batch's totals (no rows yet), its chunks, and its follow-up turns by job id."""
    closed, status = await is_closed(client, batch_id)
    if closed:
        output = await _closed_output(client, batch_id, status)
        chunks, name, state = output.chunks, output.name, output.status
        paused, pause_reason, cancel_reason = False, None, output.cancel_reason
    else:
        now = await _live(
            client, await batch_handle(client, batch_id).query(BatchWorkflow.progress)
        )
        chunks, name, state = now.chunks, None, now.status
        paused, pause_reason, cancel_reason = now.paused, now.pause_reason, None
    followups = await _followups_by_job(client, batch_id)
    turns = [turn for job in followups.values() for turn in job]
    counts = Counts.total_of([chunk.counts for chunk in chunks])
    head = BatchReport(
        batch_id=batch_id,
        name=name,
        status=state,
        total=counts.total,
        succeeded=counts.succeeded,
        failed=counts.failed + counts.timed_out,
        timed_out=counts.timed_out,
        cancelled=counts.cancelled,
        pending=counts.pending,
        running=counts.running,
        live_machines=counts.live_machines,
        cost_usd=round(counts.cost_usd + sum(t.cost_usd or 0 for t in turns), 6),
        num_turns=counts.num_turns + sum(t.num_turns or 0 for t in turns),
        paused=paused,
        pause_reason=pause_reason,
        cancel_reason=cancel_reason,
        results=[],
    )
    return head, chunks, followups


async def _chunk_results(
    client: Client, batch_id: str, chunk: ChunkProgress, store: ObjectStore | None
) -> list[JobResult]:
    """One chunk's job results: final, so far, skipped, or not started yet.

    A skipped chunk never read its jobs: their ids come from the store (`#index` without it).
    """
    if chunk.status is ChunkStatus.SKIPPED:
        ids = [f"#{chunk.first_job + i}" for i in range(chunk.size)]
        data = await store.get(jobs_key(batch_id, chunk.index)) if store is not None else None
        if data is not None:
            ids = [job.id for job in LoadedJobs.model_validate_json(data).jobs]
        return [
            JobResult(
                job_id=job_id,
                index=chunk.first_job + i,
                state=JobState.CANCELLED,
                error="batch cancelled before the job started",
            )
            for i, job_id in enumerate(ids)
        ]
    if chunk.status is ChunkStatus.PENDING:
        return []
    if chunk.status is ChunkStatus.DONE:
        return await stored_rows(rows_key(batch_id, chunk.workflow_id), store)
    return await chunk_handle(client, chunk.workflow_id).query(ChunkWorkflow.results)


async def stored_rows(key: str, store: ObjectStore | None = None) -> list[JobResult]:
    """The rows a closed chunk (or follow-up turn) left in the object store under `key`."""
    store = store if store is not None else shared_store(StoreSettings.from_env())
    data = await store.get(key)
    if data is None:
        raise BatchNotReadable(f"a closed chunk's rows are not in the object store ({key})")
    return StoredRows.model_validate_json(data).rows


async def turn_rows(
    client: Client, workflow_id: str, store: ObjectStore | None = None
) -> list[JobResult]:
    """A follow-up turn's rows once it has closed (waits for it)."""
    output = await chunk_handle(client, workflow_id).result()
    return await stored_rows(output.rows, store)


def _attach_followups(result: JobResult, by_job: dict[str, list[JobResult]]) -> None:
    """Add the job's follow-up turns (their own chunk workflows) to its result, in turn order."""
    result.followups = sorted(by_job.get(result.job_id, []), key=lambda turn: turn.turn)


class UnknownJob(LookupError):
    """The batch has no job of that id."""


async def find_job(
    client: Client,
    batch_id: str,
    job_id: str,
    *,
    store: ObjectStore | None = None,
    window: int = 16,
) -> tuple[ChunkProgress, JobResult]:
    """One job's result with its follow-up turns, and its chunk: reads chunks only until found."""
    closed, status = await is_closed(client, batch_id)
    if closed:
        chunks = (await _closed_output(client, batch_id, status)).chunks
    else:
        chunks = (await batch_handle(client, batch_id).query(BatchWorkflow.progress)).chunks
    for start in range(0, len(chunks), window):
        some = chunks[start : start + window]
        read = await asyncio.gather(
            *(_chunk_results(client, batch_id, chunk, store) for chunk in some)
        )
        for chunk, found in zip(some, read, strict=True):
            for result in found:
                if result.job_id == job_id:
                    result.followups = await _followup_turns(client, batch_id, job_id)
                    if store is not None:
                        await _expand_turns(result, store)
                    return chunk, result
    raise UnknownJob(f"batch {batch_id} has no job {job_id!r}")


async def _followup_turns(client: Client, batch_id: str, job_id: str) -> list[JobResult]:
    """A job's follow-up turns, found by their workflow ids (turn 2, 3, … until one is missing)."""
    turns: list[JobResult] = []
    turn = 2
    while True:
        handle = chunk_handle(client, followup_workflow_id(batch_id, job_id, turn))
        try:
            status = (await handle.describe()).status
        except RPCError as error:
            if error.status is RPCStatusCode.NOT_FOUND:
                return turns
            raise
        if status is WorkflowExecutionStatus.RUNNING:
            turns += await handle.query(ChunkWorkflow.results)
        elif status is WorkflowExecutionStatus.COMPLETED:
            turns += await stored_rows(rows_key(batch_id, handle.id))
        turn += 1


class FollowupRefused(ValueError):
    """A follow-up that cannot run: no such job, no session yet, or one still running."""


async def followup(
    client: Client, settings: Settings, batch_id: str, job_id: str, prompt: str
) -> str:
    """Continue a finished prompt job's Claude session on a new machine; return the workflow id."""
    store = settings.blob_store()
    try:
        chunk, result = await find_job(client, batch_id, job_id, store=store)
    except UnknownJob as error:
        raise FollowupRefused(str(error)) from None
    latest = result.followups[-1] if result.followups else result
    if not latest.state.final:
        raise FollowupRefused(f"job {job_id} turn {latest.turn} is still {latest.state.value}")
    if not latest.session_id:
        raise FollowupRefused(f"job {job_id} has no Claude session to continue (not a prompt job?)")
    chunk_input = await _chunk_input(client, chunk)
    job = next(j for j in await _chunk_jobs(chunk_input, store) if j.id == job_id)
    turn = latest.turn + 1
    workflow_id = followup_workflow_id(batch_id, job_id, turn)
    await client.start_workflow(
        ChunkWorkflow.run,
        chunk_input.model_copy(
            update={
                "jobs": [job],
                "claim": None,
                "slots": 1,
                "paused": False,
                "followup": Followup(
                    turn=turn,
                    prompt=prompt,
                    session_id=latest.session_id,
                    archive_ref=latest.archive_ref,
                    commits=latest.commits or result.commits,
                ),
            }
        ),
        id=workflow_id,
        task_queue=settings.task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=TypedSearchAttributes([SearchAttributePair(BATCH_ID, batch_id)]),
        static_summary=f"follow-up turn {turn} of job {job_id}",
        memo={APPS_MEMO: [chunk_input.app_of(job)]},
        priority=batch_priority(DEFAULT_PRIORITY, batch_id),
        static_details=f"Continues Claude session `{latest.session_id}`.\n\n{prompt[:2000]}",
    )
    return workflow_id


async def _chunk_input(client: Client, chunk: ChunkProgress) -> ChunkInput:
    """The input the job's chunk was started with: the job as it ran, defaults applied."""
    handle = client.get_workflow_handle(chunk.workflow_id)
    async for first in handle.fetch_history_events(page_size=1):
        started = first.workflow_execution_started_event_attributes
        break
    [decoded] = await client.data_converter.decode(started.input.payloads, [ChunkInput])
    assert isinstance(decoded, ChunkInput)
    return decoded


async def _chunk_jobs(chunk: ChunkInput, store: ObjectStore) -> list[Job]:
    """The jobs a chunk ran: in its input (a follow-up's), or where its claim points."""
    if chunk.claim is None:
        return chunk.jobs
    data = await store.get(chunk.claim.key)
    if data is None:
        raise FollowupRefused(
            f"the batch's jobs are no longer in the object store ({chunk.claim.key})"
        )
    return LoadedJobs.model_validate_json(data).jobs


async def expand(result: JobResult, store: ObjectStore) -> JobResult:
    """Read a compact row's log tail and answer preview back from the object store."""
    if result.log_ref and not result.log_tail:
        data = await store.get(result.log_ref)
        result.log_tail = data.decode().splitlines() if data else []
    if result.result_ref and result.result is None:
        data = await store.get(result.result_ref)
        result.result = data.decode()[:PREVIEW_CHARS] if data else None
    return result


async def _expand_turns(result: JobResult, store: ObjectStore) -> None:
    """Expand a job's row and each of its follow-up turns."""
    for turn in (result, *result.followups):
        await expand(turn, store)


async def full_answer(settings: Settings, result: JobResult) -> str | None:
    """A job's whole answer: from the object store when history keeps only its beginning."""
    if result.result_ref is None:
        return result.result
    data = await settings.blob_store().get(result.result_ref)
    return data.decode() if data is not None else None


async def list_batches(client: Client, limit: int = 50) -> list[tuple[str, str, datetime | None]]:
    """Recent batches: id, status and start time."""
    found: list[tuple[str, str, datetime | None]] = []
    async for execution in client.list_workflows('WorkflowType="BatchWorkflow"', limit=limit):
        status = execution.status.name.lower() if execution.status else "unknown"
        found.append((execution.id, status, execution.start_time))
    return found


# ---------------------------------------------------------------- retries

RETRY_INFIX = "-retry-"
"""A retry's id is its family's first batch's id, this, and a hash of what it retries."""
RETRY_OF = "retry_of"
RETRY_ROOT = "retry_root"
DEFAULT_CONTINUE_PROMPT = "Continue where you stopped and finish the task."
CONTINUABLE = {ErrorKind.MAX_TURNS.value, ErrorKind.BUDGET.value}
"""Why a prompt job stopped that continuing its session can mend: it ran out of turns or money."""


class RetryRefused(ValueError):
    """A retry that cannot start: the batch is open, or no job matches, or a job is unknown."""


class Retried(Submitted):
    """What `retry` did: the retry batch, the jobs it runs, those that continue a session."""

    retry_of: str
    jobs: list[str]
    continued: list[str] = []


async def submitted_input(client: Client, batch_id: str) -> BatchInput:
    """The batch as it was submitted (its jobs and settings): the first run's input in history.

    Later runs (continue-as-new) carry state instead of jobs, so the first run is read.
    """
    description = await client.get_workflow_handle(batch_id).describe()
    first_run = description.raw_description.workflow_execution_info.first_run_id
    handle = client.get_workflow_handle(batch_id, run_id=first_run or description.run_id)
    async for event in handle.fetch_history_events(page_size=1):
        started = event.workflow_execution_started_event_attributes
        break
    [decoded] = await client.data_converter.decode(started.input.payloads, [BatchInput])
    assert isinstance(decoded, BatchInput)
    return decoded


async def _memo_id(client: Client, batch_id: str, key: str) -> str | None:
    memo = await (await client.get_workflow_handle(batch_id).describe()).memo()
    value = memo.get(key)
    return value if isinstance(value, str) else None


async def retry_root(client: Client, batch_id: str) -> str:
    """The first batch of the batch's family: itself, unless it is a retry."""
    return await _memo_id(client, batch_id, RETRY_ROOT) or batch_id


async def retry_of(client: Client, batch_id: str) -> str | None:
    """The batch this one retries, or None when it is no retry."""
    return await _memo_id(client, batch_id, RETRY_OF)


OPEN = {"running", "paused", "cancelling"}


def _latest_turn(result: JobResult) -> JobResult:
    return result.followups[-1] if result.followups else result


async def retry(
    client: Client,
    settings: Settings,
    batch_id: str,
    *,
    states: set[JobState],
    job_ids: list[str] | None = None,
    continue_prompt: str | None = None,
) -> Retried:
    """Start a batch of the closed batch's jobs in `states` (and `job_ids`), its settings kept.

    The retry's id hashes what it retries, so asking twice finds the first retry. Jobs that ran
    out of turns or budget continue their Claude session when `continue_prompt` is given.
    """
    closed, _ = await is_closed(client, batch_id)
    if not closed:
        raise RetryRefused(
            f"batch {batch_id} is still running: retry it once it has closed (or cancel it first)"
        )
    try:
        report = await results(client, batch_id)
    except BatchNotReadable as error:
        raise RetryRefused(str(error)) from None
    by_id = {r.job_id: r for r in report.results}
    unknown = sorted(set(job_ids or []) - by_id.keys())
    if unknown:
        raise RetryRefused(f"batch {batch_id} has no job {', '.join(map(repr, unknown))}")
    wanted = set(job_ids or [])
    chosen = [r for r in report.results if _latest_turn(r).state in states or r.job_id in wanted]
    if not chosen:
        which = " or ".join(sorted(s.value for s in states)) or "chosen"
        raise RetryRefused(f"batch {batch_id} has no {which} jobs: nothing to retry")
    root = await retry_root(client, batch_id)
    ids = {r.job_id for r in chosen}
    key = json.dumps([batch_id, sorted(ids), continue_prompt], separators=(",", ":"))
    retry_id = f"{root}{RETRY_INFIX}{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    existing = await _status(client, retry_id)
    if existing is not None:
        return Retried(
            batch_id=retry_id,
            created=False,
            status=existing,
            retry_of=batch_id,
            jobs=[r.job_id for r in chosen],
        )
    continues = await _continues(settings, chosen, continue_prompt) if continue_prompt else {}
    original = await submitted_input(client, batch_id)
    ids = {r.job_id for r in chosen}
    again = [job for job in await submitted_jobs(client, settings, batch_id) if job.id in ids]
    claimed = claimed_batch(
        retry_id,
        [job.model_copy(update={"index": i}) for i, job in enumerate(again)],
        original.jobs.chunk_size,
        **original.model_dump(include=RETRY_KEEPS),
        continues=continues,
    )
    states_named = sorted({_latest_turn(r).state.value for r in chosen})
    details = (
        f"**Retry** of [{batch_id}]({settings.workflow_url(batch_id)}): {len(chosen)} jobs "
        f"({', '.join(states_named)}), {len(continues)} continuing their Claude session.\n\n"
        f'The family\'s retries: `WorkflowId STARTS_WITH "{root}{RETRY_INFIX}"`.\n\n'
        + _details(claimed)
    )
    apps = original.apps or [original.app]
    started = await _start_batch(
        client,
        settings,
        claimed,
        summary=f"retry of {batch_id}: {len(chosen)} jobs on " + ", ".join(apps),
        details=details,
        memo={RETRY_OF: batch_id, RETRY_ROOT: root},
    )
    return Retried(
        **started.model_dump(),
        retry_of=batch_id,
        jobs=[job.id for job in again],
        continued=sorted(continues),
    )


RETRY_KEEPS = {
    "name",
    "app",
    "apps",
    "priority",
    "max_machines",
    "max_cost_usd",
    "keep_sessions_s",
    "failure_limit",
    "storm",
    "tuning",
}
"""What a retry keeps of the batch it retries: every setting, none of its jobs or state."""


async def submitted_jobs(client: Client, settings: Settings, batch_id: str) -> list[Job]:
    """Every job of the batch as submitted (defaults applied), read from the object store."""
    claim = (await submitted_input(client, batch_id)).jobs
    store = settings.blob_store()
    limit = asyncio.Semaphore(STORE_AT_ONCE)

    async def read(index: int) -> list[Job]:
        key = jobs_key(batch_id, index)
        async with limit:
            data = await store.get(key)
        if data is None:
            raise BatchNotReadable(f"the jobs of batch {batch_id} are gone from the store ({key})")
        return LoadedJobs.model_validate_json(data).jobs

    slices = await asyncio.gather(*(read(i) for i in range(len(claim.digests))))
    return [job for jobs in slices for job in jobs]


async def _continues(
    settings: Settings, chosen: list[JobResult], prompt: str
) -> dict[str, Followup]:
    """The chosen jobs that continue their session: they ran out of turns or budget."""
    continues: dict[str, Followup] = {}
    gone: list[str] = []
    for result in chosen:
        latest = _latest_turn(result)
        if latest.error_kind not in CONTINUABLE or not (latest.session_id and latest.archive_ref):
            continue  # nothing to continue from (no session, or no archive of it was made)
        if not await session_kept(settings, latest.archive_ref):
            gone.append(result.job_id)
            continue
        continues[result.job_id] = Followup(
            turn=latest.turn + 1,
            prompt=prompt,
            session_id=latest.session_id,
            archive_ref=latest.archive_ref,
            commits=latest.commits or result.commits,
        )
    if gone:
        raise RetryRefused(
            f"the Claude sessions of {', '.join(gone)} are no longer kept (a batch keeps them "
            "while it runs, or longer with keep_sessions): retry without --continue-sessions"
        )
    return continues


async def session_kept(settings: Settings, archive_ref: str) -> bool:
    """Whether a turn's session archive is still in the store, so its session can go on."""
    return await settings.blob_store().metadata(archive_ref) is not None


async def retries_of(client: Client, batch_id: str) -> list[tuple[str, str, str | None]]:
    """The batch's family's retries, oldest first: id, status, and the batch each retried."""
    root = await retry_root(client, batch_id)
    query = f'WorkflowType="BatchWorkflow" AND WorkflowId STARTS_WITH "{root}{RETRY_INFIX}"'
    found: list[tuple[datetime, str, str, str | None]] = []
    async for execution in client.list_workflows(query):
        status = execution.status.name.lower() if execution.status else "unknown"
        parent = (await execution.memo()).get(RETRY_OF)
        started = execution.start_time or datetime.min.replace(tzinfo=UTC)
        found.append((started, execution.id, status, parent if isinstance(parent, str) else None))
    return [(batch, status, parent) for _, batch, status, parent in sorted(found)]


async def latest_results(
    client: Client, batch_id: str, *, store: ObjectStore | None = None
) -> BatchReport:
    """Each job's latest outcome across the batch's family: the first batch and its retries.

    A job's row comes from the last batch of the family, by start, that ran it; the totals
    count those rows, and the cost is what the whole family spent.
    """
    root = await retry_root(client, batch_id)
    reports = [await results(client, root, store=store)]
    for retry_id, _, _ in await retries_of(client, root):
        with contextlib.suppress(BatchNotReadable):  # refused or terminated: no outcome
            reports.append(await results(client, retry_id, store=store))
    latest = {r.job_id: r for r in reports[0].results}
    source: dict[str, str] = {}
    for report in reports[1:]:
        for row in report.results:
            if row.job_id in latest and row.state is not JobState.PENDING:
                latest[row.job_id] = row.model_copy(update={"index": latest[row.job_id].index})
                source[row.job_id] = report.batch_id
    rows = list(latest.values())
    counts = Counts.of([_latest_turn(r) for r in rows])
    first = reports[0]
    return first.model_copy(
        update={
            "status": next((r.status for r in reports if r.status in OPEN), reports[-1].status),
            "total": counts.total,
            "succeeded": counts.succeeded,
            "failed": counts.failed + counts.timed_out,
            "timed_out": counts.timed_out,
            "cancelled": counts.cancelled,
            "pending": counts.pending,
            "running": counts.running,
            "live_machines": sum(r.live_machines for r in reports),
            "cost_usd": round(sum(r.cost_usd for r in reports), 6),
            "num_turns": sum(r.num_turns for r in reports),
            "results": rows,
            "retries": [report.batch_id for report in reports[1:]],
            "latest_from": source,
        }
    )


# ---------------------------------------------------------------- streaming results


async def report_head(client: Client, batch_id: str) -> BatchReport:
    """The batch's totals without its rows (`results` is empty): what an export begins with."""
    head, _, _ = await _head(client, batch_id)
    return head


async def iter_results(
    client: Client, batch_id: str, *, store: ObjectStore | None = None, window: int = 4
) -> AsyncIterator[tuple[str, JobResult]]:
    """Every job's result in input order with the workflow it ran in, a few chunks at a time.

    At most `window` chunks' rows are held at once (and the next window is read while these
    are written), so a batch of 100,000 jobs streams in the memory of a few chunks.
    """
    closed, status = await is_closed(client, batch_id)
    if closed:
        chunks = (await _closed_output(client, batch_id, status)).chunks
    else:
        chunks = (await batch_handle(client, batch_id).query(BatchWorkflow.progress)).chunks
    followups = await _followups_by_job(client, batch_id)

    def read(some: list[ChunkProgress]) -> asyncio.Future[list[list[JobResult]]]:
        return asyncio.gather(*(_chunk_results(client, batch_id, chunk, store) for chunk in some))

    windows = [chunks[i : i + window] for i in range(0, len(chunks), window)]
    ahead = read(windows[0]) if windows else None
    for i, some in enumerate(windows):
        assert ahead is not None
        rows = await ahead
        ahead = read(windows[i + 1]) if i + 1 < len(windows) else None
        for chunk, found in zip(some, rows, strict=True):
            for result in found:
                _attach_followups(result, followups)
                if store is not None:
                    await _expand_turns(result, store)
                yield chunk.workflow_id, result


async def _followups_by_job(client: Client, batch_id: str) -> dict[str, list[JobResult]]:
    """The batch's follow-up turns by job id (there are few: one a question someone asked)."""
    by_job: dict[str, list[JobResult]] = {}
    query = f'BatchId="{batch_id}" AND WorkflowType="ChunkWorkflow"'
    async for execution in client.list_workflows(query):
        if not execution.id.startswith(f"{batch_id}-followup-"):
            continue
        if execution.status is WorkflowExecutionStatus.RUNNING:
            turns = await chunk_handle(client, execution.id).query(ChunkWorkflow.results)
        elif execution.status is WorkflowExecutionStatus.COMPLETED:
            turns = await stored_rows(rows_key(batch_id, execution.id))
        else:
            continue
        for turn in turns:
            by_job.setdefault(turn.job_id, []).append(turn)
    return by_job


# ---------------------------------------------------------------- one job, live


async def job_as_run(
    client: Client, store: ObjectStore, chunk: ChunkProgress, job_id: str
) -> tuple[str, Job]:
    """The Fly app and the job as its chunk ran it (defaults applied, secrets by name)."""
    chunk_input = await _chunk_input(client, chunk)
    job = next(job for job in await _chunk_jobs(chunk_input, store) if job.id == job_id)
    return chunk_input.app_of(job), job


async def latest_turn(
    client: Client, batch_id: str, chunk: ChunkProgress, job_id: str
) -> JobResult:
    """The job's latest turn now (its first, or its newest follow-up), read from its chunk."""
    turns = await _followup_turns(client, batch_id, job_id)
    if turns:
        return turns[-1]
    rows = await _chunk_results(client, batch_id, chunk, None)
    return next(r for r in rows if r.job_id == job_id)
