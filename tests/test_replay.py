"""Replay recorded histories against the current workflow code: determinism as a test.

`tests/histories/` holds histories of representative batches (happy path, infrastructure retry,
pause and resume, cancel, prompt jobs pausing at their budget), each a batch history and a chunk
history. Older recordings prove that batches already running on older code still replay
(`workflow.patched`): `v1-children-*` from before chunks were started by an activity,
`v2-steps-*` from before a job's wait, collect and destroy became one activity,
`v3-quarter-slots-*` from before fair shares of slots, `v4-created-apart-*` from before a
finishing job handed its slot to the next job inside `finish_job`, `v5-small-passes-*` (batch
histories only: the chunk did not change) from before a pass of chunk starts could carry 400 KB
of chunk input. A change
to the workflows that would break running batches fails `test_committed_histories_replay`. To
refresh them on purpose (after a deliberate, versioned change): `make histories`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker

from sortie import batches
from sortie.labels import chunk_workflow_id
from sortie.models import CancelRequest, MaxCostRequest, PauseRequest
from sortie.settings import Settings
from sortie.spec import parse_batch
from tests.fleet import Fleet
from tests.waiting import eventually
from workflows.batch import BatchWorkflow
from workflows.chunk import ChunkWorkflow
from workflows.reaper import ReaperWorkflow

HISTORIES = Path(__file__).parent / "histories"
RECORD = os.environ.get("SORTIE_RECORD_HISTORIES") == "1"
SCENARIOS = ["happy", "infra_retry", "pause_resume", "cancel", "budget"]


def replayer() -> Replayer:
    return Replayer(
        workflows=[BatchWorkflow, ChunkWorkflow, ReaperWorkflow],
        data_converter=pydantic_data_converter,
    )


def scenario_jobs(name: str) -> list[dict[str, Any]]:
    if name == "infra_retry":
        return [{"id": "flaky", "env": {"FAIL_ATTEMPTS": "1"}}, {"id": "steady"}]
    if name == "budget":
        return [{"id": f"job-{i}", "env": {"COST": "0.3"}} for i in range(4)]
    seconds = {"happy": "0.05", "pause_resume": "0.3", "cancel": "30"}[name]
    return [{"id": f"job-{i}", "env": {"SECONDS": seconds}} for i in range(4)]


async def steer(name: str, fleet: Fleet, handle: Any) -> None:
    if name == "pause_resume":
        await eventually(lambda: fleet.live >= 1, what="a live machine")
        await handle.signal(BatchWorkflow.pause, PauseRequest(reason="recording"))
        await eventually(lambda: fleet.live == 0 and fleet.created < 4, what="paused and idle")
        await handle.signal(BatchWorkflow.resume)
    elif name == "cancel":
        await eventually(lambda: fleet.live == 2, what="two live machines")
        await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="recording"))
    elif name == "budget":
        await eventually(lambda: _over_budget(handle), what="paused at the budget")
        # Two jobs spent 0.6 of the 0.5 budget: a third may have started while only one had
        # reported, the fourth never did.
        assert fleet.created <= 3
        await handle.signal(BatchWorkflow.set_max_cost, MaxCostRequest(max_cost_usd=10))
        await handle.signal(BatchWorkflow.resume)


async def _over_budget(handle: Any) -> bool:
    """Paused with no job running: the batch stopped at its budget."""
    progress = await handle.query(BatchWorkflow.progress)
    return bool(progress.paused and progress.counts.running == 0)


async def run_scenario(temporal: WorkflowEnvironment, name: str) -> dict[str, WorkflowHistory]:
    fleet = Fleet()
    settings = Settings(task_queue=f"replay-{uuid.uuid4().hex}")
    spec = parse_batch(
        {
            "name": f"r{uuid.uuid4().hex[:8]}",
            "app": "fleet",
            "max_machines": 2,
            "chunk_size": 4,
            **({"max_cost_usd": 0.5} if name == "budget" else {}),
            "defaults": {"prompt" if name == "budget" else "command": "review", "retries": 1},
            "jobs": [
                {**job, "env": {"SECONDS": "0.02", **job.get("env", {})}}
                for job in scenario_jobs(name)
            ],
        }
    )
    async with Worker(
        temporal.client,
        task_queue=settings.task_queue,
        workflows=[BatchWorkflow, ChunkWorkflow],
        activities=fleet.activities,
    ):
        submitted = await batches.submit(temporal.client, settings, spec)
        handle = batches.batch_handle(temporal.client, submitted.batch_id)
        await steer(name, fleet, handle)
        await handle.result()
    chunk = temporal.client.get_workflow_handle(chunk_workflow_id(submitted.batch_id, 0))
    return {
        "batch": await handle.fetch_history(),
        "chunk": await chunk.fetch_history(),
    }


@pytest.mark.parametrize("name", SCENARIOS)
async def test_fresh_histories_replay(temporal: WorkflowEnvironment, name: str) -> None:
    """Each scenario's live histories replay cleanly; with SORTIE_RECORD_HISTORIES=1, save them."""
    histories = await run_scenario(temporal, name)
    for kind, history in histories.items():
        await replayer().replay_workflow(history)
        if RECORD:
            HISTORIES.mkdir(exist_ok=True)
            path = HISTORIES / f"{name}.{kind}.json"
            path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")


async def test_committed_histories_replay() -> None:
    """The committed histories replay against the current code."""
    files = sorted(HISTORIES.glob("*.json"))
    assert {f.name for f in files} >= {
        f"{n}.{k}.json" for n in SCENARIOS for k in ("batch", "chunk")
    }
    for path in files:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        await replayer().replay_workflow(history)


async def test_replay_catches_a_nondeterministic_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Proof the replay test can fail: the chunk changed its steps, replay must refuse it."""
    original: Callable[..., Awaitable[Any]] = ChunkWorkflow._finish_job

    async def finish_twice(self: ChunkWorkflow, *args: Any) -> Any:
        await original(self, *args)
        return await original(self, *args)

    monkeypatch.setattr(ChunkWorkflow, "_finish_job", finish_twice)
    history = WorkflowHistory.from_json("happy", (HISTORIES / "happy.chunk.json").read_text())
    result = await Replayer(
        workflows=[ChunkWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),  # so the patched class is the one replayed
    ).replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None
    assert "Nondeterminism" in str(result.replay_failure) or "TMPRL1100" in str(
        result.replay_failure
    )
