"""A batch's results of any size: each chunk's stored rows once closed, its query while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from activities.job_models import LoadedJobs, StoredRows, jobs_key, rows_key
from client.batches.status import (
    BatchNotReadable,
    _closed_output,
    _live,
    batch_handle,
    chunk_handle,
    is_closed,
)
from client.batches.submission import BatchReport
from sortie.claude import PREVIEW_CHARS
from sortie.labels import followup_workflow_id
from sortie.models import Counts, JobResult, JobState
from sortie.settings import Settings
from sortie.spec import (
    Job,
)
from sortie.store import ObjectStore, StoreSettings, shared_store
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    ChunkProgress,
    ChunkStatus,
)
from workflows.chunk import ChunkWorkflow
from workflows.chunk_models import ChunkInput

T = TypeVar("T")
"""What a workflow run was started with (its input model)."""


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
        machines_created=counts.machines_created,
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


async def started_input(client: Client, handle: WorkflowHandle[Any, Any], kind: type[T]) -> T:
    """The input a workflow run was started with, read from the first event of its history."""
    async for first in handle.fetch_history_events(page_size=1):
        started = first.workflow_execution_started_event_attributes
        break
    [decoded] = await client.data_converter.decode(started.input.payloads, [kind])
    assert isinstance(decoded, kind)
    return decoded


async def _chunk_input(client: Client, chunk: ChunkProgress) -> ChunkInput:
    """The input the job's chunk was started with: the job as it ran, defaults applied."""
    return await started_input(client, client.get_workflow_handle(chunk.workflow_id), ChunkInput)


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
