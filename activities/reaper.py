"""The orphan reaper: destroy machines that no running Sortie workflow owns.

A machine is owned while its chunk workflow runs inside a running batch. Terminating a batch
runs no cleanup, and a worker that dies for good leaves its machines behind: the reaper lists
machines by Sortie's metadata, asks Temporal about their batch and chunk, and destroys the rest.
Chunks still running under a closed batch are cancelled so no worker creates more for them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.fly_calls import fly_errors
from activities.machines import GONE_STATES
from fly import FlyClient, Machine
from sortie.labels import (
    META_BATCH,
    META_CHUNK,
    META_JOB,
    META_MANAGED,
    META_OWNER,
    META_REUSE,
    chunk_workflow_id,
)
from sortie.reaper_models import Orphan, ReapInput, ReapOutput
from sortie.store import KEEP_UNTIL, REPORTS, SESSIONS, ObjectStore

REPORTS_KEPT = timedelta(hours=1)
"""A closed batch's agent reports outlive their upload this long (a follow-up of a closed batch
uploads new ones, and its collect reads them within seconds), then the reaper deletes them."""


class ReaperActivities:
    """Owns the Fly client and the object store; asks Temporal through the activity's client."""

    def __init__(self, fly: FlyClient, store: ObjectStore) -> None:
        self._fly = fly
        self._store = store

    @activity.defn(name="reap_orphans")
    async def reap_orphans(self, input: ReapInput) -> ReapOutput:
        """List Sortie machines, keep the owned ones, destroy (or just report) the rest."""
        client = activity.client()
        with fly_errors(f"list machines of {input.app}"):
            machines = await self._fly.list_machines(input.app, metadata={META_MANAGED: "1"})
        statuses: dict[str, WorkflowExecutionStatus | None] = {}
        orphans: list[Orphan] = []
        closed_batches: set[str] = set()
        for machine in machines:
            if machine.state in GONE_STATES:
                continue
            reason = await _why_orphaned(client, machine, statuses)
            metadata = _metadata(machine)
            if metadata.get(META_BATCH) and statuses.get(metadata[META_BATCH]) not in (
                None,
                WorkflowExecutionStatus.RUNNING,
            ):
                closed_batches.add(metadata[META_BATCH])
            if reason is not None:
                orphans.append(
                    Orphan(
                        machine_id=machine.id,
                        name=machine.name,
                        state=machine.state,
                        batch_id=metadata.get(META_BATCH),
                        job_id=metadata.get(META_JOB),
                        chunk=_chunk_index(metadata),
                        reason=reason,
                    )
                )
        destroyed = 0
        cancelled: list[str] = []
        if not input.dry_run:
            # Stop stray chunks first, so none replaces a machine the sweep is destroying.
            held = {
                chunk_workflow_id(o.batch_id, int(o.chunk))
                for o in orphans
                if o.batch_id in closed_batches and o.chunk is not None
            }
            cancelled = await _cancel_stray_chunks(client, sorted(closed_batches), held)
            for orphan in orphans:
                activity.heartbeat(orphan.machine_id)
                with fly_errors(f"destroy orphan {orphan.machine_id}"):
                    if await self._fly.destroy_machine(input.app, orphan.machine_id, force=True):
                        destroyed += 1
                activity.logger.info("reaped machine %s (%s)", orphan.machine_id, orphan.reason)
        expired = await self._expired_sessions(client, statuses)
        stale = await self._stale_reports(client, statuses)
        if not input.dry_run:
            for prefix in expired:
                await self._store.delete(prefix)
            for key in stale:
                await self._store.delete(key)
        return ReapOutput(
            app=input.app,
            checked=len(machines),
            orphans=orphans,
            destroyed=destroyed,
            cancelled_chunks=cancelled,
            expired_sessions=expired,
            stale_reports=len(stale),
            dry_run=input.dry_run,
        )

    async def _expired_sessions(
        self, client: Client, statuses: dict[str, WorkflowExecutionStatus | None]
    ) -> list[str]:
        """Session archives of batches that are gone, or closed and past their keep time."""
        expired: list[str] = []
        now = datetime.now(UTC)
        for prefix in await self._store.prefixes(SESSIONS):
            batch_id = prefix.rsplit("/", 1)[-1]
            if await _status(client, batch_id, statuses) is WorkflowExecutionStatus.RUNNING:
                continue
            until = await self._store.get(f"{prefix}/{KEEP_UNTIL}")
            if until is not None and datetime.fromisoformat(until.decode()) > now:
                continue
            expired.append(prefix)
        return expired

    async def _stale_reports(
        self, client: Client, statuses: dict[str, WorkflowExecutionStatus | None]
    ) -> list[str]:
        """Reports of batches no longer running, uploaded more than REPORTS_KEPT ago."""
        stale: list[str] = []
        before = datetime.now(UTC) - REPORTS_KEPT
        for prefix in await self._store.prefixes(REPORTS):
            batch_id = prefix.rsplit("/", 1)[-1]
            if await _status(client, batch_id, statuses) is WorkflowExecutionStatus.RUNNING:
                continue
            stale += [o.key async for o in self._store.objects(prefix) if o.modified < before]
        return stale


def _metadata(machine: Machine) -> dict[str, str]:
    return dict(machine.config.metadata) if machine.config else {}


def _chunk_index(metadata: dict[str, str]) -> int | None:
    chunk = metadata.get(META_CHUNK, "")
    return int(chunk) if chunk.isdigit() else None


async def _status(
    client: Client, workflow_id: str, cache: dict[str, WorkflowExecutionStatus | None]
) -> WorkflowExecutionStatus | None:
    """The workflow's status, None when Temporal has never heard of it (cached per run)."""
    if workflow_id not in cache:
        try:
            cache[workflow_id] = (await client.get_workflow_handle(workflow_id).describe()).status
        except RPCError as error:
            if error.status is not RPCStatusCode.NOT_FOUND:
                raise
            cache[workflow_id] = None
    return cache[workflow_id]


async def _why_orphaned(
    client: Client, machine: Machine, cache: dict[str, WorkflowExecutionStatus | None]
) -> str | None:
    """Why no running workflow owns this machine, or None when one does."""
    metadata = _metadata(machine)
    batch_id, chunk = metadata.get(META_BATCH), metadata.get(META_CHUNK)
    if not batch_id or chunk is None or not chunk.isdigit():
        return "no batch or chunk in its metadata"
    owners = [batch_id, chunk_workflow_id(batch_id, int(chunk))]
    owner = metadata.get(META_OWNER)
    if metadata.get(META_REUSE):
        owners = [batch_id]  # it outlives its chunk: the batch holds it, running or stopped
    elif owner and owner not in owners:
        owners = [owner]  # a follow-up turn: its own workflow owns it, the batch may be closed
    for workflow_id in owners:
        status = await _status(client, workflow_id, cache)
        if status is None:
            return f"{workflow_id} is unknown to Temporal"
        if status is not WorkflowExecutionStatus.RUNNING:
            return f"{workflow_id} is {status.name.lower()}"
    return None


async def _cancel_stray_chunks(client: Client, batch_ids: list[str], held: set[str]) -> list[str]:
    """Ask chunks still running under a closed batch to stop (they destroy what they hold).

    Candidates are the chunks visibility lists (which lags behind starts) and the chunks named by
    the orphans' metadata; each is described before it is cancelled.
    """
    candidates = set(held)
    for batch_id in batch_ids:
        query = (
            f'BatchId="{batch_id}" AND WorkflowType="ChunkWorkflow" AND ExecutionStatus="Running"'
        )
        async for execution in client.list_workflows(query):
            candidates.add(execution.id)
    cancelled: list[str] = []
    statuses: dict[str, WorkflowExecutionStatus | None] = {}
    for workflow_id in sorted(candidates):
        if await _status(client, workflow_id, statuses) is WorkflowExecutionStatus.RUNNING:
            await client.get_workflow_handle(workflow_id).cancel()
            cancelled.append(workflow_id)
    return cancelled
