"""Client-side operations on batches: submit, steer, and read results of any size.

A batch's per-job results live in its chunk workflows (the batch itself only keeps counts), so
reading results means reading each chunk: its result once closed, its `results` query while it
runs. Nothing here needs a database: workflow history is the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

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

from activities.job_models import JobsClaim, LoadedJobs, jobs_key
from sortie.claude import PREVIEW_CHARS
from sortie.labels import BATCH_ID, followup_workflow_id
from sortie.models import Counts, Followup, JobResult, JobState, Tuning
from sortie.settings import Settings
from sortie.spec import BatchFileError, BatchSpec, Job, resolve_job
from sortie.store import ObjectStore
from workflows.batch import BatchWorkflow
from workflows.batch_models import BatchInput, BatchOutput, ChunkProgress, ChunkStatus, Progress
from workflows.chunk import ChunkWorkflow
from workflows.chunk_models import ChunkInput, ChunkOutput

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


@dataclass(frozen=True)
class ClaimedBatch:
    """A batch's workflow input and the objects its claim check names (key to bytes)."""

    input: BatchInput
    objects: dict[str, bytes]


def batch_input(spec: BatchSpec, batch_id: str, tuning: Tuning | None = None) -> ClaimedBatch:
    """The workflow input for a validated batch file, and its jobs as one object per chunk.

    The same file gives the same objects and digests, so submitting it again is harmless.
    """
    jobs = resolved_jobs(spec)
    size = chunk_size(spec, jobs)
    objects: dict[str, bytes] = {}
    digests: list[str] = []
    for index, first in enumerate(range(0, len(jobs), size)):
        data = LoadedJobs(jobs=jobs[first : first + size]).model_dump_json().encode()
        objects[jobs_key(batch_id, index)] = data
        digests.append(hashlib.sha256(data).hexdigest())
    claimed = BatchInput(
        batch_id=batch_id,
        name=spec.name,
        app=spec.app,
        max_machines=spec.max_machines,
        max_cost_usd=spec.max_cost_usd,
        keep_sessions_s=spec.keep_sessions,
        jobs=JobsClaim(batch_id=batch_id, total=len(jobs), chunk_size=size, digests=digests),
        secrets=spec.secret_names(),
        prompt_jobs=any(job.prompt is not None for job in jobs),
        tuning=tuning or Tuning(),
    )
    encoded = len(claimed.model_dump_json())
    if encoded > PAYLOAD_BYTES:
        raise BatchFileError(
            spec.name,
            [
                f"the batch's input is {encoded:,} bytes once encoded, over {PAYLOAD_BYTES:,} "
                f"({len(digests):,} chunks): split it into several batches"
            ],
        )
    return ClaimedBatch(claimed, objects)


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


def _details(spec: BatchSpec, chunk_size: int) -> str:
    """Markdown for the Web UI: the batch's shape and its first jobs."""
    lines = [
        f"**{spec.name}** on Fly app `{spec.app}`: {len(spec.jobs)} jobs, "
        f"at most {spec.max_machines} machines, chunks of {chunk_size}",
        "",
        "| job | kind | what |",
        "|---|---|---|",
    ]
    for job in spec.jobs:
        command = job.command or spec.defaults.command
        what = " ".join(command) if command else (job.prompt or spec.defaults.prompt or "")
        kind = "command" if command else "prompt"
        lines.append(f"| {job.id} | {kind} | {what[:80].replace('|', '/')} |")
        if sum(len(line) for line in lines) > DETAILS_LIMIT:
            lines.append(f"| … | | {len(spec.jobs)} jobs in all |")
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
    data = claimed.input
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
            static_summary=f"batch {spec.name}: {len(spec.jobs)} jobs on {spec.app}",
            static_details=details or _details(spec, data.jobs.chunk_size),
            memo=memo,
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
        counts=counts,
        chunks=output.chunks,
    )


async def _live(client: Client, progress: Progress) -> Progress:
    """Running chunks' counts asked of the chunks themselves: the batch hears of them in
    batches (every few seconds, or when a slot changes hands), the chunks know them now."""

    async def ask(chunk: ChunkProgress) -> None:
        if chunk.status is not ChunkStatus.RUNNING:
            return
        with contextlib.suppress(RPCError):
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


def view(p: Progress) -> ProgressView:
    """The `progress` query's answer as plain values (the one place that reads its model)."""
    c = p.counts
    return ProgressView(
        batch_id=p.batch_id,
        status=p.status,
        paused=p.paused,
        pause_reason=p.pause_reason,
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
    )


async def progress_view(client: Client, batch_id: str) -> ProgressView:
    """The batch's progress now, as plain values."""
    return view(await progress(client, batch_id))


async def results(
    client: Client, batch_id: str, *, store: ObjectStore | None = None, parallel: int = 16
) -> BatchReport:
    """Every job's result in input order, for a running or closed batch of any size.

    A closed chunk's rows are compact (its result is in its batch's history too): with `store`,
    their log tails and answers are read back from it.
    """
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
    limit = asyncio.Semaphore(parallel)

    async def read(chunk: ChunkProgress) -> list[JobResult]:
        async with limit:
            return await _chunk_results(client, batch_id, chunk, store)

    per_chunk = await asyncio.gather(*(read(c) for c in chunks))
    flat = [r for rs in per_chunk for r in rs]
    await _attach_followups(client, batch_id, flat)
    if store is not None:

        async def expand_one(result: JobResult) -> None:
            async with limit:
                await _expand_turns(result, store)

        await asyncio.gather(*(expand_one(result) for result in flat))
    counts = Counts.total_of([chunk.counts for chunk in chunks])
    return BatchReport(
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
        cost_usd=round(
            counts.cost_usd + sum(f.cost_usd or 0 for r in flat for f in r.followups), 6
        ),
        num_turns=counts.num_turns + sum(f.num_turns or 0 for r in flat for f in r.followups),
        paused=paused,
        pause_reason=pause_reason,
        cancel_reason=cancel_reason,
        results=flat,
    )


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
    handle = client.get_workflow_handle_for(ChunkWorkflow.run, chunk.workflow_id)
    if chunk.status is ChunkStatus.DONE:
        output: ChunkOutput = await handle.result()
        return output.results
    return await handle.query(ChunkWorkflow.results)


async def _attach_followups(client: Client, batch_id: str, results: list[JobResult]) -> None:
    """Add each job's follow-up turns (their own chunk workflows) to its result, in turn order."""
    by_job = {r.job_id: r for r in results}
    query = f'BatchId="{batch_id}" AND WorkflowType="ChunkWorkflow"'
    async for execution in client.list_workflows(query):
        if not execution.id.startswith(f"{batch_id}-followup-"):
            continue
        handle = client.get_workflow_handle_for(ChunkWorkflow.run, execution.id)
        if execution.status is WorkflowExecutionStatus.RUNNING:
            turns = await handle.query(ChunkWorkflow.results)
        elif execution.status is WorkflowExecutionStatus.COMPLETED:
            turns = (await handle.result()).results
        else:
            continue
        for turn in turns:
            if turn.job_id in by_job:
                by_job[turn.job_id].followups.append(turn)
    for result in results:
        result.followups.sort(key=lambda turn: turn.turn)


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
            turns += (await handle.result()).results
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
