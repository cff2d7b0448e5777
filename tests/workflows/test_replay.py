"""Replay recorded histories against the current workflow code: determinism as a test.

`tests/histories/` holds one batch history and one chunk history per scenario, named by what it
proves: `happy`, `infra-retry` (a job retried on a new machine), `pause-resume`, `cancel`,
`budget` (prompt jobs pausing at their budget, then resumed), `storm` (Claude rate limits
pausing the batch, a durable timer resuming it), `continue-as-new` (the first run of a batch
that continued-as-new while its chunks ran) and `reuse` (`reuse_machines`: machines handed from
job to job and chunk to chunk, then destroyed). A change to the workflows that would
break running batches fails `test_committed_histories_replay`; Sortie has no release yet, so
after a deliberate change the histories are recorded again with `make histories`.
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
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from client import batches
from sortie.labels import chunk_workflow_id
from sortie.settings import Settings
from sortie.spec import parse_batch
from tests.helpers.fleet import Fleet, fleet_worker
from tests.helpers.waiting import eventually
from workflows import job_steps
from workflows.batch import BatchWorkflow
from workflows.batch_models import CancelRequest, MaxCostRequest, PauseRequest
from workflows.chunk import ChunkWorkflow
from workflows.reaper import ReaperWorkflow

HISTORIES = Path(__file__).parent / "histories"
RECORD = os.environ.get("SORTIE_RECORD_HISTORIES") == "1"
SCENARIOS = [
    "happy",
    "infra-retry",
    "pause-resume",
    "cancel",
    "budget",
    "storm",
    "continue-as-new",
    "reuse",
]
PROMPTS = {"budget", "storm"}
EXTRA: dict[str, dict[str, Any]] = {
    "budget": {"max_cost_usd": 0.5},
    "storm": {"storm": {"errors": 2, "within": "1m", "auto_resume_after": "1s"}},
    "reuse": {"reuse_machines": True, "chunk_size": 3},
}


def replayer() -> Replayer:
    return Replayer(
        workflows=[BatchWorkflow, ChunkWorkflow, ReaperWorkflow],
        data_converter=pydantic_data_converter,
    )


def scenario_jobs(name: str) -> list[dict[str, Any]]:
    if name == "infra-retry":
        return [{"id": "flaky", "env": {"FAIL_ATTEMPTS": "1"}}, {"id": "steady"}]
    if name == "budget":
        return [{"id": f"job-{i}", "env": {"COST": "0.3"}} for i in range(4)]
    if name == "storm":
        limited = {"ERROR_KIND": "rate_limit", "ERROR_ATTEMPTS": "1"}
        return [{"id": f"job-{i}", "env": limited if i < 2 else {}} for i in range(4)]
    if name == "continue-as-new":
        return [{"id": f"job-{i}", "env": {"SECONDS": "0.02"}} for i in range(80)]
    if name == "reuse":
        return [
            {"id": f"job-{i}", "env": {"SECONDS": "0.05", "EXIT": str(i % 2)}} for i in range(9)
        ]
    seconds = {"happy": "0.05", "pause-resume": "0.3", "cancel": "30"}[name]
    return [{"id": f"job-{i}", "env": {"SECONDS": seconds}} for i in range(4)]


async def steer(name: str, fleet: Fleet, handle: Any) -> None:
    if name == "pause-resume":
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
            **EXTRA.get(name, {}),
            "defaults": {"prompt" if name in PROMPTS else "command": "review", "retries": 1},
            "jobs": [
                {**job, "env": {"SECONDS": "0.02", **job.get("env", {})}}
                for job in scenario_jobs(name)
            ],
        }
    )
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec)
        handle = batches.batch_handle(temporal.client, submitted.batch_id)
        await steer(name, fleet, handle)
        await handle.result()
    chunk = temporal.client.get_workflow_handle(chunk_workflow_id(submitted.batch_id, 0))
    first_run = (await handle.describe()).raw_description.workflow_execution_info.first_run_id
    batch = temporal.client.get_workflow_handle(submitted.batch_id, run_id=first_run)
    history = await batch.fetch_history()
    if name == "continue-as-new":
        last = history.events[-1]
        assert last.HasField("workflow_execution_continued_as_new_event_attributes"), last
    return {"batch": history, "chunk": await chunk.fetch_history()}


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
    original: Callable[..., Awaitable[Any]] = job_steps.finish_job

    async def finish_twice(*args: Any) -> Any:
        await original(*args)
        return await original(*args)

    monkeypatch.setattr(job_steps, "finish_job", finish_twice)
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
