"""An app's create pacer: turns for every worker within one token bucket, across continue-as-new.

The pacer runs on the real dev server; each `AppPacer` below stands for one worker's side.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.pacer_models import PacerState, ReserveCreates
from activities.pacing import AppPacer
from sortie.pacing import CREATE_BURST, pacer_workflow_id
from workflows.pacer import CreatePacerWorkflow

RATE = 20.0
"""Turns a second in these tests: fast enough that waiting them out takes little time."""


def within_bucket(turns: list[datetime], rate: float, burst: int) -> bool:
    """Whether a bucket of `burst` refilled at `rate` lets every turn through: any span of
    turns holds at most burst + its length x rate of them (times are to the microsecond)."""
    at = sorted(t.timestamp() for t in turns)
    return all(
        j - i + 1 <= burst + (at[j] - at[i]) * rate + 1e-3
        for i in range(len(at))
        for j in range(i, len(at))
    )


async def reserve(client: Client, queue: str, count: int) -> list[datetime]:
    """One worker's ask for `count` turns: when the pacer lets each go."""
    pacer = client.get_workflow_handle(pacer_workflow_id(queue, "app"))
    turns = await pacer.execute_update(
        CreatePacerWorkflow.reserve,
        ReserveCreates(count=count, rate=RATE, burst=CREATE_BURST),
    )
    return turns.at


async def test_turns_asked_at_once_by_two_workers_keep_to_one_bucket(
    temporal: WorkflowEnvironment,
) -> None:
    client = temporal.client
    queue = f"pace-{uuid.uuid4().hex}"
    async with Worker(client, task_queue=queue, workflows=[CreatePacerWorkflow]):
        started = await client.start_workflow(
            CreatePacerWorkflow.run,
            PacerState(),
            id=pacer_workflow_id(queue, "app"),
            task_queue=queue,
        )

        # Two workers ask at once, again and again, more than the pacer's run holds (it is
        # told to continue-as-new after 100 events): 60 asks of 1 to 3 turns. Each worker has
        # one ask in flight at a time, as `AppPacer` does (the server refuses an eleventh
        # update in flight to one workflow).
        async def worker_asks(first: int) -> list[list[datetime]]:
            return [await reserve(client, queue, 1 + i % 3) for i in range(first, 60, 2)]

        answers = [a for asks in await asyncio.gather(*map(worker_asks, (0, 1))) for a in asks]
        described = await client.get_workflow_handle(started.id).describe()
    turns = [t for answer in answers for t in answer]
    assert len(turns) == 120
    assert described.run_id != started.result_run_id, "the pacer continued as new meanwhile"
    assert within_bucket(turns, RATE, CREATE_BURST)


async def test_a_workers_creates_waiting_at_once_share_one_ask(
    temporal: WorkflowEnvironment,
) -> None:
    client = temporal.client
    queue = f"pace-{uuid.uuid4().hex}"
    pacer = AppPacer(client, queue, "app", RATE)
    async with Worker(client, task_queue=queue, workflows=[CreatePacerWorkflow]):
        await asyncio.gather(*(pacer.turn() for _ in range(12)))
        handle = client.get_workflow_handle(pacer_workflow_id(queue, "app"))
        events = [e async for e in handle.fetch_history_events()]
        full_at = await handle.query(CreatePacerWorkflow.bucket_full_at)
    asks = [
        e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    # The first create asks alone; the eleven that came while it asked share the next ask.
    assert len(asks) == 2
    # Twelve turns taken in all: the bucket is full again 12 turns after it was first used.
    started = events[0].event_time.ToDatetime().timestamp()
    assert full_at is not None and full_at.timestamp() >= started + 12 / RATE - 1e-3
