"""The batch's guards: failure thresholds and storm pauses, as rules and on the real workflows.

The rules of workflows/guards.py are checked as plain functions; the workflows run on the dev
server with the in-memory fleet (tests/helpers/fleet.py), so each scenario takes a second or so.
End to end on localfly, through the command line: tests/test_guards.py.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ActivityError, ApplicationError, RetryState
from temporalio.testing import WorkflowEnvironment

from client import batches
from sortie.fields import FAILURE_RATE_AFTER
from sortie.models import Counts, Tuning
from sortie.settings import Settings
from sortie.spec import OnTooManyFailures, StormGuard, parse_batch
from tests.helpers.fleet import Fleet, fleet_worker
from tests.helpers.waiting import eventually
from workflows import guards
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    BatchOutput,
    CancelRequest,
    FailureLimit,
    FailureLimitRequest,
    MaxCostRequest,
    MaxMachinesRequest,
    Progress,
    StormMark,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

# ---------------------------------------------------------------- the rules


def test_failures_count_failed_and_timed_out_jobs_against_max_failures() -> None:
    limit = FailureLimit(max_failures=3)
    assert guards.too_many_failures(limit, Counts(failed=1, timed_out=1, succeeded=9)) is None
    why = guards.too_many_failures(limit, Counts(failed=2, timed_out=1, cancelled=5))
    assert why == "3 jobs failed, max_failures is 3"
    assert guards.too_many_failures(FailureLimit(), Counts(failed=1000)) is None


def test_a_failure_rate_counts_only_once_enough_jobs_finished() -> None:
    limit = FailureLimit(max_failure_rate=10)
    early = Counts(failed=5, succeeded=FAILURE_RATE_AFTER - 6, cancelled=50)
    assert guards.too_many_failures(limit, early) is None, "cancelled jobs are not finished ones"
    assert guards.too_many_failures(limit, Counts(failed=1, succeeded=FAILURE_RATE_AFTER)) is None
    why = guards.too_many_failures(limit, Counts(failed=2, succeeded=FAILURE_RATE_AFTER - 2))
    assert why == f"2 of {FAILURE_RATE_AFTER} finished jobs failed (10%), max_failure_rate is 10%"


def test_a_changed_limit_keeps_what_the_request_leaves_out_and_0_removes() -> None:
    limit = FailureLimit(max_failures=3, max_failure_rate=10)
    raised = guards.changed_limit(limit, FailureLimitRequest(max_failures=50))
    assert (raised.max_failures, raised.max_failure_rate) == (50, 10)
    removed = guards.changed_limit(raised, FailureLimitRequest(max_failure_rate=0))
    assert (removed.max_failures, removed.max_failure_rate) == (50, None)
    cancel = FailureLimitRequest(on_too_many_failures=OnTooManyFailures.CANCEL)
    assert guards.changed_limit(removed, cancel).on_too_many is OnTooManyFailures.CANCEL
    assert guards.limit_text(removed) == "max_failures 50, then pause"
    assert guards.limit_text(FailureLimit()) is None


def test_a_storm_is_errors_within_the_window_and_resting_credentials_at_once() -> None:
    guard = StormGuard(errors=3, within=60)
    old = StormMark(at=NOW - timedelta(seconds=61), kind="rate_limit", count=5)
    fresh = [
        StormMark(at=NOW - timedelta(seconds=10), kind="rate_limit", count=1),
        StormMark(at=NOW, kind="fly_rate_limit", count=1),
    ]
    kept = guards.recent([old, *fresh], NOW, guard)
    assert kept == fresh and guards.storm(kept, guard) is None
    more = [*kept, StormMark(at=NOW, kind="auth", count=1)]
    assert guards.storm(more, guard) == (
        "storm: 3 errors within 1m (1 Claude authentication, 1 Fly 429, 1 Claude rate limit)"
    )
    resting = [StormMark(at=NOW, kind="credentials_resting", count=1)]
    assert guards.storm(resting, guard) == "storm: every Claude credential is resting"


def test_only_errors_that_blame_the_platform_are_storm_errors() -> None:
    assert all(guards.is_storm(k) for k in ("rate_limit", "auth", "credentials_resting"))
    assert not any(guards.is_storm(k) for k in (None, "max_turns", "budget", "no_report", "other"))
    for fly, kind in [
        ("FlyRateLimited", "fly_rate_limit"),
        ("FlyServerError", "fly_unavailable"),
        ("FlyTransportError", "fly_unavailable"),
        ("CredentialsResting", "credentials_resting"),
        ("FlyUnprocessable", None),
    ]:
        error = ActivityError(
            "create failed",
            scheduled_event_id=1,
            started_event_id=2,
            identity="w",
            activity_type="create_machine",
            activity_id="1",
            retry_state=RetryState.TIMEOUT,
        )
        error.__cause__ = ApplicationError("POST create -> 429", type=fly)
        assert guards.create_failure_kind(error) == kind


# ---------------------------------------------------------------- on the workflows


@asynccontextmanager
async def batch(
    temporal: WorkflowEnvironment, fleet: Fleet, jobs: list[dict[str, Any]], **fields: Any
) -> AsyncIterator[WorkflowHandle[BatchWorkflow, BatchOutput]]:
    """A batch on the fleet, its worker running for the block."""
    settings = Settings(task_queue=f"guards-{uuid.uuid4().hex}")
    defaults = {"retries": 2, **fields.pop("defaults", {"command": "true"})}
    spec = parse_batch(
        {
            "name": f"g{uuid.uuid4().hex[:8]}",
            "app": "fleet",
            "max_machines": 2,
            "chunk_size": 5,
            "defaults": defaults,
            "jobs": jobs,
            **fields,
        }
    )
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(temporal.client, settings, spec)
        yield batches.batch_handle(temporal.client, submitted.batch_id)


def failing(count: int, **env: str) -> list[dict[str, Any]]:
    return [{"id": f"j{i:02d}", "env": {"EXIT": "1", **env}} for i in range(count)]


async def paused_and_idle(
    temporal: WorkflowEnvironment, handle: WorkflowHandle[Any, Any]
) -> Progress | None:
    """The batch paused, no job of it running (the chunks asked): all it ran, it will run."""
    progress = await batches.progress(temporal.client, handle.id)
    return progress if progress.paused and progress.counts.running == 0 else None


async def event_in(handle: WorkflowHandle[Any, Any], kind: EventType.ValueType) -> bool:
    """Whether the history of the handle's run (the latest, without a run id) holds `kind`."""
    async for event in handle.fetch_history_events():
        if event.event_type == kind:
            return True
    return False


async def signals_to_chunks(temporal: WorkflowEnvironment, batch_id: str) -> list[str]:
    """The pause and resume signals the batch's chunks received, in order, chunk after chunk."""
    names: list[str] = []
    async for execution in temporal.client.list_workflows(f'BatchId="{batch_id}"'):
        if execution.workflow_type != "ChunkWorkflow":
            continue
        history = await temporal.client.get_workflow_handle(execution.id).fetch_history()
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                name = event.workflow_execution_signaled_event_attributes.signal_name
                if name in ("pause", "resume"):
                    names.append(name)
    return names


async def test_max_failures_pauses_the_batch_until_the_limit_is_raised_and_it_is_resumed(
    temporal: WorkflowEnvironment,
) -> None:
    fleet = Fleet()
    async with batch(temporal, fleet, failing(8), max_failures=3) as handle:
        progress = await eventually(
            lambda: paused_and_idle(temporal, handle), what="paused, none running"
        )
        failed = progress.counts.failed
        # The jobs running when the third failure was heard may fail too, no job starts after.
        assert 3 <= failed <= 3 + 2 and fleet.created == failed and fleet.live == 0
        assert re.fullmatch(
            r"too many failures: [345] jobs failed, max_failures is 3; raise it with "
            r"set-failure-limit, then resume",
            progress.pause_reason or "",
        )
        assert progress.failure_limit.max_failures == 3

        await handle.signal(BatchWorkflow.resume)  # still over the limit: stays paused
        # Signals are handled in order: once the new cap shows, the resume was handled too.
        await handle.signal(BatchWorkflow.set_max_machines, MaxMachinesRequest(max_machines=3))

        async def resumed_and_paused_again() -> Progress | None:
            progress = await paused_and_idle(temporal, handle)
            return progress if progress and progress.max_machines == 3 else None

        again = await eventually(resumed_and_paused_again, what="the resume handled")
        assert again.pause_reason is not None and "too many failures" in again.pause_reason
        assert fleet.created == failed

        await handle.signal(BatchWorkflow.set_failure_limit, FailureLimitRequest(max_failures=0))
        raised = await eventually(
            lambda: paused_and_idle(temporal, handle), what="the limit removed"
        )
        assert raised.pause_reason == "failure limit raised: send resume to continue"
        await handle.signal(BatchWorkflow.resume)
        output = await handle.result()
    assert (output.status, output.failed, fleet.created) == ("completed", 8, 8)


async def test_infrastructure_retries_that_succeeded_do_not_count_as_failures(
    temporal: WorkflowEnvironment,
) -> None:
    fleet = Fleet()
    # Two first attempts lose their machine, two meet a Claude rate limit (the batch hears of
    # those at once): each job then succeeds on a new machine, so nothing failed.
    refused = {"ERROR_KIND": "rate_limit", "ERROR_ATTEMPTS": "1"}
    jobs = [{"id": f"j{i}", "env": {"FAIL_ATTEMPTS": "1"} if i < 2 else refused} for i in range(4)]
    prompts = {"prompt": "review"}
    async with batch(temporal, fleet, jobs, max_failures=1, defaults=prompts) as handle:
        output = await asyncio.wait_for(handle.result(), timeout=30)
    assert (output.status, output.succeeded, fleet.created) == ("completed", 4, 8)
    assert await signals_to_chunks(temporal, output.batch_id) == [], "never paused"


async def test_a_stalled_attempt_runs_again_on_a_new_machine_and_a_bad_request_does_not(
    temporal: WorkflowEnvironment,
) -> None:
    fleet = Fleet()
    jobs = [
        {"id": "stalls", "env": {"ERROR_KIND": "stalled", "ERROR_ATTEMPTS": "1"}},
        {"id": "bad", "env": {"ERROR_KIND": "invalid_request"}},
    ]
    defaults = {"prompt": "review", "retries": 1}
    storm = {"errors": 1, "within": "1m"}
    async with batch(temporal, fleet, jobs, storm=storm, defaults=defaults) as handle:
        output = await asyncio.wait_for(handle.result(), timeout=30)
    # A stall is the platform's (retried on a new machine); a bad request is the job's own,
    # and neither is a storm error.
    assert (output.status, output.succeeded, output.failed) == ("completed", 1, 1)
    assert sorted(fleet.runs) == ["bad", "stalls", "stalls"]
    assert await signals_to_chunks(temporal, output.batch_id) == [], "never paused"


async def test_a_failure_rate_waits_for_enough_finished_jobs_then_cancels_when_told(
    temporal: WorkflowEnvironment,
) -> None:
    fleet = Fleet()
    count = FAILURE_RATE_AFTER + 20
    jobs = [{"id": f"j{i:02d}", "env": {"EXIT": str(i % 2)}} for i in range(count)]
    limits = {"max_failure_rate": "10%", "on_too_many_failures": "cancel"}
    async with batch(temporal, fleet, jobs, max_machines=4, **limits) as handle:
        output = await handle.result()
    finished = output.succeeded + output.failed
    assert output.status == "cancelled" and output.cancelled > 0
    # Half the jobs fail from the first on, yet the rate counts only from the 20th finished; a
    # chunk's successes reach the batch with its next report (a failure at once), so a few more
    # may have finished by the time the batch counts 20, but it stops well before the end.
    assert FAILURE_RATE_AFTER <= finished < len(jobs), finished
    why = re.fullmatch(
        r"too many failures: \d+ of (\d+) finished jobs failed \(\d+%\), max_failure_rate is 10%",
        output.cancel_reason or "",
    )
    assert why and int(why.group(1)) >= FAILURE_RATE_AFTER, output.cancel_reason
    assert fleet.live == 0


async def test_a_limit_lowered_on_a_running_batch_pauses_it_at_once(
    temporal: WorkflowEnvironment,
) -> None:
    fleet = Fleet()
    jobs = [*failing(2), *({"id": f"slow{i}", "env": {"SECONDS": "60"}} for i in range(4))]
    async with batch(temporal, fleet, jobs, max_machines=3, chunk_size=6) as handle:

        async def two_failed() -> bool:
            progress = await handle.query(BatchWorkflow.progress)
            return progress.counts.failed == 2

        await eventually(two_failed, what="the two quick jobs failed")
        await handle.signal(BatchWorkflow.set_failure_limit, FailureLimitRequest(max_failures=2))

        async def paused() -> Progress | None:
            progress = await handle.query(BatchWorkflow.progress)
            return progress if progress.paused else None

        progress = await eventually(paused, what="paused by the lowered limit")
        assert progress.pause_reason is not None
        assert progress.pause_reason.startswith("too many failures: 2 jobs failed")
        await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="enough"))
        output = await handle.result()
    assert output.status == "cancelled" and fleet.live == 0


@pytest.mark.parametrize(
    ("env", "defaults", "reason"),
    [
        ({"ERROR_KIND": "auth"}, {"prompt": "review"}, "3 Claude authentication"),
        ({"ERROR_KIND": "overloaded"}, {"prompt": "review"}, "3 Claude API overloaded"),
        ({"CREATE_ERROR": "FlyServerError"}, {"command": "true"}, "3 Fly 5xx or unreachable"),
        (
            {"CREATE_ERROR": "CredentialsResting"},
            {"prompt": "review"},
            "every Claude credential is resting",
        ),
    ],
    ids=["claude-auth", "claude-overloaded", "fly-5xx", "credentials-resting"],
)
async def test_a_storm_of_platform_errors_pauses_the_batch(
    temporal: WorkflowEnvironment, env: dict[str, str], defaults: dict[str, str], reason: str
) -> None:
    fleet = Fleet()
    jobs = [{"id": f"j{i:02d}", "env": env} for i in range(10)]
    storm = {"errors": 3, "within": "1m"}
    async with batch(temporal, fleet, jobs, storm=storm, defaults=defaults) as handle:
        progress = await eventually(
            lambda: paused_and_idle(temporal, handle), what="paused by the storm"
        )
        assert progress.pause_reason is not None and reason in progress.pause_reason
        assert progress.pause_reason.endswith("; send resume to continue")
        await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="enough"))
        output = await handle.result()
    # Each attempt met one error; the batch paused within the threshold (plus what was running).
    attempts = fleet.created + fleet.refused
    threshold = 1 if "resting" in reason else 3
    assert threshold <= attempts <= threshold + 2, attempts
    assert output.status == "cancelled" and fleet.live == 0


async def test_a_storm_pause_resumes_itself_on_a_durable_timer(
    temporal: WorkflowEnvironment,
) -> None:
    # The pause outlives its run and its worker: the paused batch continues-as-new, the worker
    # stops, the timer fires with no worker at all, and a new worker resumes the batch.
    fleet = Fleet()
    env = {"ERROR_KIND": "rate_limit", "ERROR_ATTEMPTS": "1"}
    settings = Settings(task_queue=f"guards-{uuid.uuid4().hex}")
    spec = parse_batch(
        {
            "name": f"g{uuid.uuid4().hex[:8]}",
            "app": "fleet",
            "max_machines": 2,
            "chunk_size": 4,
            "storm": {"errors": 2, "within": "1m", "auto_resume_after": "6s"},
            "defaults": {"retries": 2, "prompt": "review"},
            "jobs": [{"id": f"j{i}", "env": env} for i in range(4)],
        }
    )
    async with fleet_worker(temporal, settings, fleet.activities):
        submitted = await batches.submit(
            temporal.client, settings, spec, tuning=Tuning(run_events=100)
        )
        latest = temporal.client.get_workflow_handle(submitted.batch_id)
        await eventually(lambda: paused_and_idle(temporal, latest), what="the storm pause")
        first_run = (await latest.describe()).run_id

        async def continued() -> bool:  # signals that change nothing grow the run past 100 events
            if (await latest.describe()).run_id != first_run:
                return True
            await latest.signal(BatchWorkflow.set_max_cost, MaxCostRequest(max_cost_usd=1000.0))
            return False

        await eventually(continued, what="the paused batch continued-as-new")
        await eventually(
            lambda: event_in(latest, EventType.EVENT_TYPE_TIMER_STARTED), what="the new run's timer"
        )
    await eventually(
        lambda: event_in(latest, EventType.EVENT_TYPE_TIMER_FIRED), what="the timer, no worker up"
    )
    async with fleet_worker(temporal, settings, fleet.activities):
        handle = batches.batch_handle(temporal.client, submitted.batch_id)
        output = await asyncio.wait_for(handle.result(), timeout=60)
    assert (output.status, output.succeeded) == ("completed", 4)
    assert (await signals_to_chunks(temporal, output.batch_id))[:2] == ["pause", "resume"]
