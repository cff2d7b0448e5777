"""The Claude credential pool all workers share: turns, rests, and what a batch sees if all rest.

Each `ClaudePool` below stands for one worker's memory (its credentials from its environment);
the rests and the turn live in the task queue's CredentialPoolWorkflow on the real dev server.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.credentials import ClaudePool, CredentialsResting, pool_workflow_id
from client import batches
from sortie.spec import parse_batch
from tests.helpers.history import decoded_payloads
from tests.helpers.stack import Sortie
from tests.helpers.waiting import eventually
from workflows.batch import BatchWorkflow
from workflows.batch_models import Progress
from workflows.credentials import CredentialPoolWorkflow

ONE, TWO, THREE = (
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN_2",
    "CLAUDE_CODE_OAUTH_TOKEN_3",
)


def worker_pool(**extra: str) -> ClaudePool:
    """One worker's credentials, as its environment gives them."""
    env = {name: f"sk-ant-oat01-{uuid.uuid4().hex}" for name in (ONE, TWO, THREE)}
    return ClaudePool.from_env({**env, **extra})


async def test_a_credential_rested_by_one_worker_is_not_handed_out_by_another(
    temporal: WorkflowEnvironment,
) -> None:
    queue = f"pool-{uuid.uuid4().hex}"
    client = temporal.client
    a, b = worker_pool(), worker_pool()
    async with Worker(client, task_queue=queue, workflows=[CredentialPoolWorkflow]):
        # Turns are shared: two workers asking in turn get the three credentials in turn.
        taken = [(await pool.take(client, queue)).name for pool in (a, b, a, b, a, b)]
        assert taken == [ONE, TWO, THREE, ONE, TWO, THREE]

        await a.rest(client, queue, TWO, "rate_limit error in job j1")
        assert [(await b.take(client, queue)).name for _ in range(4)] == [ONE, THREE] * 2
        # A worker started afresh (nothing in its memory) still sees the rest.
        assert TWO not in [(await worker_pool().take(client, queue)).name for _ in range(3)]

        await b.rest(client, queue, ONE, "auth error in job j2")
        await b.rest(client, queue, THREE, "auth error in job j3")
        with pytest.raises(CredentialsResting, match="every Claude credential is resting"):
            await a.take(client, queue)
        pool = client.get_workflow_handle(pool_workflow_id(queue))
        view = await pool.query(CredentialPoolWorkflow.resting)
        history = await pool.fetch_history()
    assert sorted(view.resting) == [ONE, TWO, THREE]
    assert view.reasons[TWO] == "rate_limit error in job j1"
    # The pool's history replays (deterministic) and holds names, never a value.
    replayer = Replayer(workflows=[CredentialPoolWorkflow], data_converter=client.data_converter)
    await replayer.replay_workflow(history)
    recorded = "\n".join(decoded_payloads(json.loads(history.to_json())))
    assert TWO in recorded, "names are kept"
    assert not any(value in recorded for value in (*a.values(), *b.values()))


def test_a_numbered_credential_carries_its_own_endpoint_and_model() -> None:
    pool = worker_pool(
        ANTHROPIC_BASE_URL_2="https://gateway.example/anthropic", ANTHROPIC_MODEL_2="claude-x"
    )
    second = pool[TWO]
    assert second.machine_env() == {
        "CLAUDE_CODE_OAUTH_TOKEN": second.value,
        "ANTHROPIC_BASE_URL": "https://gateway.example/anthropic",
        "ANTHROPIC_MODEL": "claude-x",
    }
    assert pool[ONE].machine_env() == {"CLAUDE_CODE_OAUTH_TOKEN": pool[ONE].value}, "its own"


async def test_a_job_that_finds_every_credential_resting_waits_for_the_rest_to_end(
    sortie: Sortie, app_name: str, worker_env: dict[str, str]
) -> None:
    # The worker's one credential rests until a reset 8 s ahead (another worker saw Claude refuse
    # it and say when its limit resets): the prompt job's create is refused with no machine, the
    # job waits (`credentials_resting`), the batch pauses until the reset, then both go on.
    pool = ClaudePool.from_env(worker_env)
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=8)
    await pool.rest(sortie.client, sortie.settings.task_queue, ONE, "rate_limit elsewhere", until)
    spec = parse_batch(
        {
            "name": f"p{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "defaults": {"retries": 0},
            "jobs": [{"id": "ask", "prompt": "anything"}],
        }
    )
    submitted = await batches.submit(sortie.client, sortie.settings, spec)
    handle = batches.batch_handle(sortie.client, submitted.batch_id)

    async def waiting() -> Progress | None:
        progress = await handle.query(BatchWorkflow.progress)
        return progress if progress.paused and progress.counts.credentials_resting else None

    progress = await eventually(waiting, what="the job waiting, the batch paused")
    assert f"resting until {until:%H:%M:%S} UTC" in (progress.pause_reason or "")
    assert progress.counts.pending == 1 and sortie.localfly.machines(app_name) == []
    output = await asyncio.wait_for(handle.result(), timeout=60)
    [result] = (await batches.results(sortie.client, submitted.batch_id)).results
    assert (output.status, result.state, result.attempts) == ("completed", "succeeded", 1)
    [machine] = sortie.localfly.machines(app_name)
    assert datetime.fromisoformat(machine["created_at"]) >= until, "made once the rest was over"


async def test_a_rest_lasts_until_the_reset_claude_named_or_the_fixed_span(
    temporal: WorkflowEnvironment,
) -> None:
    queue = f"pool-{uuid.uuid4().hex}"
    client, pool = temporal.client, worker_pool(SORTIE_CREDENTIAL_REST="120")
    before = datetime.now(UTC)
    soon = before + timedelta(minutes=7)
    async with Worker(client, task_queue=queue, workflows=[CredentialPoolWorkflow]):
        await pool.rest(client, queue, ONE, "rate_limit error in job a", soon)
        await pool.rest(client, queue, TWO, "auth error in job b")
        await pool.rest(
            client, queue, THREE, "rate_limit error in job c", soon + timedelta(days=30)
        )
        handle = client.get_workflow_handle(pool_workflow_id(queue))
        view = await handle.query(CredentialPoolWorkflow.resting)
        after = datetime.now(UTC)
        with pytest.raises(CredentialsResting) as resting:
            await pool.take(client, queue)
    assert abs((view.resting[ONE] - soon).total_seconds()) < 0.01, "until the named reset"
    # 120 s from when the pool took the rest: between the two readings of the clock (a second
    # either side for the server's clock against ours), however long the calls took.
    span, skew = timedelta(seconds=120), timedelta(seconds=1)
    assert all(
        before + span - skew <= view.resting[n] <= after + span + skew for n in (TWO, THREE)
    ), "no reset, or one past Claude's longest window: the fixed span"
    assert resting.value.until == min(view.resting.values())
