"""A job's machine logs for `starter.py logs`: live while it runs, its stored tail once it ended.

Live lines are read on a worker (workflows/logs.py), which holds the Fly token and scrubs the
job's secrets; the loop here follows the job from attempt to attempt (a new machine each) and
turn to turn, and ends with what the worker stored when the job ended, without repeating the
lines already shown.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import AsyncIterator

from temporalio.client import Client

from activities.machine_models import ReadLogsInput
from client import batches
from fly.client import LOGS_FROM_START
from sortie.models import JobResult, JobState
from sortie.settings import Settings
from sortie.store import ObjectStore
from workflows.logs import MachineLogsWorkflow

POLL_S = 1.0
KEEP = 200
"""Lines shown live that are remembered, to leave them out of the stored tail at the end."""


async def read_logs(
    client: Client, settings: Settings, app: str, machine_id: str, names: list[str], token: str
) -> tuple[list[str], str]:
    """One read on a worker: the lines after `token` and the token to read on from."""
    page = await client.execute_workflow(
        MachineLogsWorkflow.run,
        ReadLogsInput(app=app, machine_id=machine_id, secrets=names, next_token=token),
        id=f"sortie-logs-{machine_id}-{secrets.token_hex(4)}",
        task_queue=settings.task_queue,
        static_summary=f"read the logs of machine {machine_id}",
    )
    return page.lines, page.next_token


def _unseen(shown: deque[str], tail: list[str]) -> list[str]:
    """The stored tail's lines after those already shown (the tail overlaps what was shown)."""
    seen = list(shown)
    for k in range(min(len(seen), len(tail)), 0, -1):
        if seen[-k:] == tail[:k]:
            return tail[k:]
    return tail


async def follow(
    client: Client, settings: Settings, batch_id: str, job_id: str, *, keep_following: bool
) -> AsyncIterator[str]:
    """The job's log lines as they come (with `keep_following`, until it ends), then the rest
    of its stored tail; a line `== …` before each machine and at the end."""
    said_pending = False
    while True:
        try:
            chunk, _ = await batches.find_job(client, batch_id, job_id)
            break
        except batches.UnknownJob:
            submitted = await batches.submitted_jobs(client, settings, batch_id)
            if job_id not in {job.id for job in submitted}:
                raise
        if not said_pending:
            said_pending = True
            yield f"== {job_id} is pending: its chunk has not started yet"
        if not keep_following:
            return
        await asyncio.sleep(POLL_S)
    store = settings.blob_store()
    app, job = await batches.job_as_run(client, store, chunk, job_id)
    machine: str | None = None
    token = LOGS_FROM_START
    shown: deque[str] = deque(maxlen=KEEP)
    said_waiting = False
    followed: str | None = None
    while True:
        turn = await batches.latest_turn(client, batch_id, chunk, job_id)
        if turn.machine_id and turn.machine_id != machine:
            if machine is not None:  # the attempt before ended: its last lines first
                async for line in _drain(client, settings, app, machine, job.secrets, token):
                    yield line
            machine, token = turn.machine_id, LOGS_FROM_START
            shown.clear()
            if not turn.state.final:
                yield f"== {job_id} turn {turn.turn} attempt {turn.attempts} on machine {machine}"
        if turn.state.final:
            if followed == machine and machine is not None:  # lines since the last read
                async for line in _drain(client, settings, app, machine, job.secrets, token):
                    shown.append(line)
                    yield line
            async for line in _ended(turn, store, shown):
                yield line
            return
        if machine is not None:
            followed = machine
            lines, token = await read_logs(client, settings, app, machine, job.secrets, token)
            for line in lines:
                shown.append(line)
                yield line
        elif not said_waiting:
            said_waiting = True
            yield f"== {job_id} is {turn.state.value}: no machine yet"
        if not keep_following:
            return
        await asyncio.sleep(POLL_S)


async def _drain(
    client: Client, settings: Settings, app: str, machine: str, names: list[str], token: str
) -> AsyncIterator[str]:
    lines, _ = await read_logs(client, settings, app, machine, names, token)
    for line in lines:
        yield line


async def _ended(turn: JobResult, store: ObjectStore, shown: deque[str]) -> AsyncIterator[str]:
    """The stored tail not shown yet, then how the job ended."""
    await batches.expand(turn, store)
    for line in _unseen(shown, turn.log_tail):
        yield line
    how = turn.state.value
    if turn.exit_code is not None:
        how += f", exit {turn.exit_code}"
    if turn.error and turn.state is not JobState.SUCCEEDED:
        how += f": {turn.error}"
    yield f"== {turn.job_id} turn {turn.turn} ended {how}"
