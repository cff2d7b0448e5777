"""A batch's jobs run again: a retry of what failed, a follow-up turn, the latest results."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from datetime import UTC, datetime

from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)

from activities.job_models import LoadedJobs, jobs_key
from client.batches.report import (
    FollowupRefused,
    UnknownJob,
    _chunk_input,
    _chunk_jobs,
    find_job,
    results,
    started_input,
)
from client.batches.status import BatchNotReadable, _status, is_closed
from client.batches.submission import (
    STORE_AT_ONCE,
    BatchReport,
    Submitted,
    _details,
    _start_batch,
    claimed_batch,
)
from sortie.claude import ErrorKind
from sortie.labels import BATCH_ID, followup_workflow_id
from sortie.models import Counts, Followup, JobResult, JobState
from sortie.pacing import APPS_MEMO, batch_priority
from sortie.settings import Settings
from sortie.spec import (
    DEFAULT_PRIORITY,
    Job,
)
from sortie.store import ObjectStore
from workflows.batch_models import (
    BatchInput,
)
from workflows.chunk import ChunkWorkflow


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
                "machines": [],  # a turn of its own runs on a machine of its own
                "reuse_idle_s": None,
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
    return await started_input(client, handle, BatchInput)


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
    "reuse_idle_s",
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
