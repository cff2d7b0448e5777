"""A batch that goes bad stops itself, end to end: real activities, localfly, the command line.

Failure thresholds pause a batch whose jobs keep failing; a storm of Claude 429s pauses it
before it burns machines and attempts. Machines are counted at localfly; `status`,
`set-failure-limit` and `resume` run as the operator runs them. The rules themselves, and every
kind of storm, are tested on the workflows in tests/workflows/test_guards.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata

from client import batches
from sortie.models import Tuning
from sortie.spec import parse_batch
from tests.helpers.history import assert_no_create_while_paused
from tests.helpers.stack import ROOT, Sortie
from tests.helpers.waiting import eventually
from workflows.batch import BatchWorkflow
from workflows.batch_models import CancelRequest, Progress

TUNING = Tuning(heartbeat_timeout_s=5, heartbeat_every_s=1, create_timeout_s=10, call_timeout_s=10)
LIMITED = [f"sk-ant-oat01-limited-{uuid.uuid4().hex}" for _ in range(2)]


@pytest.fixture(autouse=True)
def no_faults(localfly: Any) -> Iterator[None]:
    localfly.set_faults({})
    yield
    localfly.set_faults({})


async def starter(s: Sortie, *args: str) -> subprocess.CompletedProcess[str]:
    """`python starter.py ARGS` against the test's server and queue, off the event loop."""
    env = {
        "PATH": "/usr/bin:/bin",
        "TEMPORAL_ADDRESS": s.settings.temporal_address,
        "SORTIE_TASK_QUEUE": s.settings.task_queue,
        "SORTIE_STATE_DIR": str(s.settings.state_dir),
    }
    command = [sys.executable, "starter.py", *args]
    return await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def live(s: Sortie, app: str) -> int:
    return sum(1 for m in s.localfly.machines(app) if m["state"] != "destroyed")


def made(s: Sortie, app: str) -> int:
    return len(s.localfly.machines(app))


async def paused_and_idle(s: Sortie, batch_id: str, app: str) -> Progress | None:
    """Paused, no job running (the chunks asked) and no machine alive at localfly."""
    progress = await batches.progress(s.client, batch_id)
    idle = progress.paused and progress.counts.running == 0 and live(s, app) == 0
    return progress if idle else None


async def test_a_batch_whose_jobs_all_fail_pauses_at_max_failures_with_no_machine_left(
    sortie: Sortie, app_name: str
) -> None:
    spec = parse_batch(
        {
            "name": f"g{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "max_machines": 2,
            "chunk_size": 5,
            "max_failures": 3,
            "defaults": {"image": "alpine", "timeout": "1m", "retries": 0},
            "jobs": [{"id": f"j{i}", "command": "exit 1"} for i in range(10)],
        }
    )
    batch_id = (await batches.submit(sortie.client, sortie.settings, spec, tuning=TUNING)).batch_id
    progress = await eventually(
        lambda: paused_and_idle(sortie, batch_id, app_name), timeout=60, what="paused and idle"
    )
    failed = progress.counts.failed
    # Every job fails: at most the 3 of the limit and the 2 running when the third was heard.
    assert 3 <= failed <= 3 + 2 and made(sortie, app_name) == failed
    assert progress.counts.pending == 10 - failed

    status = await starter(sortie, "status", batch_id)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].startswith(f"{batch_id}  paused (too many failures: "), (
        status.stdout
    )
    assert "max_failures is 3; raise it with set-failure-limit, then resume" in status.stdout
    assert "  failure limit: max_failures 3, then pause" in status.stdout
    handle = batches.batch_handle(sortie.client, batch_id)
    ui = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "paused (too many failures: " in ui.current_details, "the Web UI's current details"
    assert "(limit: max_failures 3, then pause)" in ui.current_details

    raised = await starter(sortie, "set-failure-limit", batch_id, "--max-failures", str(failed + 1))
    assert raised.stdout.startswith(f"sent set-failure-limit to {batch_id}"), raised.stderr

    async def raised_limit() -> Progress | None:
        progress = await batches.progress(sortie.client, batch_id)
        return progress if progress.failure_limit.max_failures == failed + 1 else None

    now = await eventually(raised_limit, what="the raised limit")
    assert now.paused and now.pause_reason == "failure limit raised: send resume to continue"
    await handle.signal(BatchWorkflow.resume)

    async def paused_again() -> Progress | None:
        progress = await paused_and_idle(sortie, batch_id, app_name)
        return progress if progress and progress.counts.failed > failed else None

    again = await eventually(paused_again, timeout=60, what="resumed, then paused again")
    assert failed + 1 <= again.counts.failed <= failed + 1 + 2
    assert made(sortie, app_name) == again.counts.failed
    await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="enough"))
    await handle.result()
    report = await batches.results(sortie.client, batch_id)
    assert report.failed == again.counts.failed and live(sortie, app_name) == 0


@pytest.mark.parametrize(
    "worker_env",
    [{"CLAUDE_CODE_OAUTH_TOKEN": LIMITED[0], "CLAUDE_CODE_OAUTH_TOKEN_2": LIMITED[1]}],
    indirect=True,
)
async def test_every_credential_answering_429_pauses_the_batch_and_no_machine_starts_meanwhile(
    sortie: Sortie, app_name: str
) -> None:
    spec = parse_batch(
        {
            "name": f"g{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "max_machines": 2,
            "chunk_size": 4,
            "storm": {"errors": 3, "within": "5m"},
            "defaults": {
                "timeout": "1m",
                "retries": 2,
                "env": {"STANDIN_CLAUDE_LIMITED_TOKENS": ",".join(LIMITED)},
            },
            "jobs": [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(8)],
        }
    )
    batch_id = (await batches.submit(sortie.client, sortie.settings, spec, tuning=TUNING)).batch_id
    progress = await eventually(
        lambda: paused_and_idle(sortie, batch_id, app_name), timeout=90, what="paused by the storm"
    )
    # One machine per attempt, each answered 429, which rests its credential in the pool every
    # worker shares: once both rest, the next create finds none to hand out and the batch
    # pauses at once, within the threshold of 3 (plus the attempt under way on the other slot).
    before = made(sortie, app_name)
    assert len(LIMITED) <= before <= 3 + 1, before
    assert progress.pause_reason is not None
    assert progress.pause_reason is not None
    reason = progress.pause_reason.split(";")[0]
    assert reason.startswith("storm: every Claude credential is resting until ") or reason in (
        "storm: 3 errors within 5m (3 Claude rate limit)",
        "storm: 4 errors within 5m (4 Claude rate limit)",
    ), progress.pause_reason
    status = await starter(sortie, "status", batch_id)
    assert f"{batch_id}  paused (storm: " in status.stdout, status.stdout
    handle = batches.batch_handle(sortie.client, batch_id)
    ui = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "paused (storm: " in ui.current_details, "the Web UI's current details"

    await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="enough"))
    await handle.result()
    assert live(sortie, app_name) == 0
    assert made(sortie, app_name) == before, "no machine while paused"
    # No chunk asked for a machine after it was told to pause.
    async for execution in sortie.client.list_workflows(f'BatchId="{batch_id}"'):
        if execution.workflow_type != "ChunkWorkflow":
            continue
        history = await sortie.client.get_workflow_handle(execution.id).fetch_history()
        assert_no_create_while_paused(history)
