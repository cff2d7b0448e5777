"""The durable batch end to end: a real dev server, a real worker, real localfly machines.

Machines are counted at localfly (its admin API lists every machine it ever made), never from
Sortie's own records.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from client import batches
from sortie.labels import META_BATCH, META_JOB, chunk_workflow_id
from sortie.models import Tuning
from sortie.spec import BatchSpec, parse_batch
from tests.helpers.batches import JOBS, finish, settings_for, spec_for, start
from tests.helpers.cli import cli, cli_env
from tests.helpers.history import assert_no_create_while_paused, every_run
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import ROOT, SUGGEST_CONTINUE_AS_NEW_AT, TEMPORAL_CLI, Sortie
from tests.helpers.waiting import eventually
from workflows.batch import BatchWorkflow
from workflows.batch_models import (
    CancelRequest,
    ChunkStatus,
    MaxMachinesRequest,
    PauseRequest,
)
from workflows.chunk_models import ChunkInput
from workflows.reports import (
    EPOCH,
    MISSED_S,
    REPORTS_PER_S,
    missed,
    next_turn,
    report_every,
    report_phase,
)

TUNING = Tuning(heartbeat_timeout_s=5, heartbeat_every_s=1, create_timeout_s=10)


@pytest.fixture(autouse=True)
def no_faults(localfly: Any) -> Iterator[None]:
    localfly.set_faults({})
    yield
    localfly.set_faults({})


def make_spec(app: str, jobs: list[dict[str, Any]], **fields: Any) -> BatchSpec:
    defaults = {"image": "docker.io/library/alpine:3.20", "timeout": "60s", "retries": 1}
    defaults.update(fields.pop("defaults", {}))
    name = fields.pop("name", f"t{uuid.uuid4().hex[:8]}")
    return parse_batch({"name": name, "app": app, "defaults": defaults, "jobs": jobs, **fields})


def sleepers(count: int, seconds: float) -> list[dict[str, Any]]:
    return [{"id": f"job-{i:03d}", "command": f"sleep {seconds}"} for i in range(count)]


def machines(s: Sortie, app: str) -> list[dict[str, Any]]:
    return list(s.localfly.machines(app))


def live(s: Sortie, app: str) -> list[dict[str, Any]]:
    return [m for m in machines(s, app) if m["state"] != "destroyed"]


async def chunk_input(s: Sortie, history: Any) -> ChunkInput:
    """The input a chunk run started with."""
    started = history.events[0].workflow_execution_started_event_attributes
    [value] = await s.client.data_converter.decode(started.input.payloads, [ChunkInput])
    assert isinstance(value, ChunkInput)
    return value


async def chunk_histories(s: Sortie, batch_id: str) -> AsyncIterator[Any]:
    async for execution in s.client.list_workflows(f'BatchId="{batch_id}"'):
        if execution.workflow_type == "ChunkWorkflow":
            yield await s.client.get_workflow_handle(execution.id).fetch_history()


async def test_happy_path(sortie: Sortie, app_name: str) -> None:
    jobs = [{"id": f"echo-{i}", "command": f"echo hello from {i}"} for i in range(5)]
    spec = make_spec(app_name, jobs, max_machines=2, chunk_size=2, defaults={"log_tail": "always"})
    batch_id = await start(sortie, TUNING, spec)
    report = await finish(sortie, batch_id)

    assert (report.status, report.total, report.succeeded, report.failed) == ("completed", 5, 5, 0)
    assert [r.job_id for r in report.results] == [j["id"] for j in jobs]
    for i, result in enumerate(report.results):
        assert result.exit_code == 0 and result.attempts == 1 and result.machine_id
        assert f"hello from {i}" in "\n".join(result.log_tail)
    made = machines(sortie, app_name)
    assert len(made) == 5 and not live(sortie, app_name)
    assert {m["metadata"][META_BATCH] for m in made} == {batch_id}
    assert {m["metadata"][META_JOB] for m in made} == {j["id"] for j in jobs}
    # The chunks are the batch's children: the UI lists them under its Relationships.
    children = await eventually(
        lambda: _children(sortie, batch_id, count=3), what="the chunks listed as children"
    )
    assert children == [chunk_workflow_id(batch_id, i) for i in range(3)]
    chunk = await sortie.client.get_workflow_handle(children[0]).describe()
    assert chunk.parent_id == batch_id and chunk.status is WorkflowExecutionStatus.COMPLETED


async def _children(s: Sortie, batch_id: str, count: int) -> list[str] | None:
    """The batch's children by id, once visibility lists all `count` of them."""
    query = f'ParentWorkflowId="{batch_id}"'
    found = sorted([e.id async for e in s.client.list_workflows(query)])
    return found if len(found) == count else None


async def test_a_terminated_batchs_chunks_stop_and_destroy_their_machines(
    sortie: Sortie, app_name: str
) -> None:
    # Chunks are abandoned children (the batch continues-as-new): terminated, the batch cannot
    # cancel them, so each stops itself when its next report cannot be delivered.
    spec = make_spec(app_name, sleepers(20, 1), max_machines=2, chunk_size=10)
    batch_id = await start(sortie, TUNING, spec)
    await eventually(lambda: len(live(sortie, app_name)) == 2, what="two running machines")
    await batches.batch_handle(sortie.client, batch_id).terminate("gave up on it")

    async def stopped() -> bool:
        statuses = [
            (await sortie.client.get_workflow_handle(chunk_workflow_id(batch_id, i)).describe())
            for i in range(2)
        ]
        return all(d.status is WorkflowExecutionStatus.COMPLETED for d in statuses)

    await eventually(stopped, timeout=60, what="both chunks to stop")
    assert not live(sortie, app_name)
    assert len(machines(sortie, app_name)) < 20, "the chunks stopped starting jobs"


async def test_concurrency_cap_is_never_exceeded_and_slots_are_reused_at_once(
    sortie: Sortie, app_name: str
) -> None:
    spec = make_spec(app_name, sleepers(100, 0.3), max_machines=10, chunk_size=25)
    batch_id = await start(sortie, TUNING, spec)
    report = await finish(sortie, batch_id)

    assert report.succeeded == 100
    stats = sortie.localfly.stats(app_name)
    assert stats["max_live_machines"] == 10, stats
    assert stats["machines_created"] == 100
    assert not live(sortie, app_name)
    # No wave barrier: the second chunk's first machine exists before the first chunk's last
    # machine is gone.
    made = machines(sortie, app_name)
    first_chunk = [m for m in made if m["metadata"]["sortie_chunk"] == "0"]
    second_chunk = [m for m in made if m["metadata"]["sortie_chunk"] == "1"]
    assert min(m["created_at"] for m in second_chunk) < max(m["destroyed_at"] for m in first_chunk)


async def test_every_run_of_the_batch_stays_short_while_it_starts_many_chunks(
    sortie: Sortie, app_name: str
) -> None:
    # A hundred and twenty one-job chunks on thirty machines: the batch starts them in passes
    # while their reports pour in, and each pass fits in what is left of the run's bound of events.
    spec = make_spec(app_name, sleepers(120, 0.1), max_machines=30, chunk_size=1)
    bound = SUGGEST_CONTINUE_AS_NEW_AT  # the dev server suggests continue-as-new there too
    submitted = await batches.submit(
        sortie.client, sortie.settings, spec, tuning=TUNING.model_copy(update={"run_events": bound})
    )
    report = await finish(sortie, submitted.batch_id)

    assert report.succeeded == 120
    runs = await every_run(sortie.client, submitted.batch_id)
    lengths = sorted(len(history.events) for history in runs)
    # A run ends at the first check past its bound: what arrives while it continues-as-new
    # (each running chunk's completion and last report, and the tasks they cause) overshoots it.
    assert len(runs) > 1 and lengths[-1] <= bound + 2 * spec.max_machines + 40, lengths
    assert not live(sortie, app_name)
    # Thirty chunks at once share the batch's reports: each reports every 30/2 s at most.
    every = {
        (await chunk_input(sortie, history)).report_every_s
        async for history in chunk_histories(sortie, submitted.batch_id)
    }
    assert every == {15.0}


def test_chunks_report_less_often_the_more_of_them_run_at_once() -> None:
    # Together they send the batch REPORTS_PER_S reports a second, never more often than every 5 s.
    assert report_every(max_machines=200, chunks=200) == 200 / REPORTS_PER_S == 100
    # The bench's rows: 100 chunks of 2 slots (10,000 jobs) take turns 0.5 s apart in 50 s, 20
    # reports in 10 s, with room for 2.5 times that where a busy worker bunches them; 10 chunks of
    # 10 slots (1,000 jobs) still report every 5 s.
    assert report_every(max_machines=200, chunks=100) == 50
    assert report_phase(7, max_machines=200, chunks=100) == 7 * 0.5
    assert REPORTS_PER_S * 10 * 2.5 <= 5 * 10
    assert report_every(max_machines=100, chunks=10) == 5
    assert report_every(max_machines=200, chunks=10) == 5
    assert report_every(max_machines=3, chunks=1000) == 5


def test_a_turn_missed_in_a_stall_waits_for_the_next() -> None:
    # A chunk that gets to its turn more than MISSED_S late (its worker stalled) reports at its
    # next turn instead, so the reports due during a stall do not all reach the batch at once.
    every, phase = timedelta(seconds=50), timedelta(seconds=3.5)
    start = EPOCH + timedelta(days=20_000, seconds=12.25)
    turn = next_turn(start, phase, every)
    assert start < turn <= start + every and (turn - EPOCH - phase) % every == timedelta(0)
    assert not missed(turn, turn + timedelta(seconds=MISSED_S))
    assert missed(turn, turn + timedelta(seconds=MISSED_S + 0.5))
    assert next_turn(turn + timedelta(seconds=MISSED_S + 0.5), phase, every) == turn + every


async def test_failing_and_timed_out_jobs(sortie: Sortie, app_name: str) -> None:
    jobs = [
        {"id": "ok", "command": "echo fine"},
        {"id": "fails", "command": "echo broken >&2; exit 3"},
        {"id": "slow", "command": "sleep 120", "timeout": "2s"},
    ]
    batch_id = await start(sortie, TUNING, make_spec(app_name, jobs, max_machines=3))
    report = await finish(sortie, batch_id)
    ok, fails, slow = report.results

    # By default only a job that did not succeed has its log tail read: one logs call.
    assert ok.state == "succeeded" and ok.log_tail == []
    assert (fails.state, fails.exit_code, fails.attempts) == ("failed", 3, 1)
    assert "broken" in "\n".join(fails.log_tail)
    assert sortie.localfly.stats(app_name)["calls"].get("logs") == 1
    assert (slow.state, slow.attempts) == ("timed_out", 1)
    assert "timeout of 2s" in (slow.error or "")
    assert (report.succeeded, report.failed, report.timed_out) == (1, 2, 1)
    assert len(machines(sortie, app_name)) == 3 and not live(sortie, app_name)


@pytest.mark.parametrize("fault", ["fail_boot", "oom", "stuck_created"])
async def test_an_infrastructure_failure_is_retried_on_a_new_machine(
    sortie: Sortie, app_name: str, fault: str
) -> None:
    jobs = [{"id": "flaky", "command": "echo done"}, {"id": "steady", "command": "true"}]
    spec = make_spec(app_name, jobs, defaults={"boot_timeout": "2s", "retries": 2})
    sortie.localfly.set_faults(
        {
            "machines": [
                {"kind": fault, "count": 1, "metadata": {META_JOB: "flaky"}},
            ]
        }
    )
    report = await finish(sortie, await start(sortie, TUNING, spec))

    flaky = report.results[0]
    assert (flaky.state, flaky.attempts, flaky.exit_code) == ("succeeded", 2, 0)
    assert report.results[1].attempts == 1
    tries = [m for m in machines(sortie, app_name) if m["metadata"][META_JOB] == "flaky"]
    assert sorted(m["metadata"]["sortie_attempt"] for m in tries) == ["1", "2"]
    assert not live(sortie, app_name)


HOG = "python3 -c \"import time; held = b'x' * (300 << 20); time.sleep(4)\""
"""A job that needs about 310 MB: localfly's OOM killer stops it on a 256 MB machine."""


@pytest.mark.parametrize("on_oom", ["grow", "same"])
async def test_the_retry_of_an_oom_killed_job_runs_with_twice_the_memory(
    sortie: Sortie, app_name: str, on_oom: str
) -> None:
    jobs = [{"id": "hog", "command": HOG, "on_oom": on_oom}]
    spec = make_spec(app_name, jobs, defaults={"retries": 1, "guest": {"memory_mb": 256}})
    report = await finish(sortie, await start(sortie, TUNING, spec))

    (hog,) = report.results
    sizes = sorted(
        (m["metadata"]["sortie_attempt"], m["memory_mb"]) for m in machines(sortie, app_name)
    )
    if on_oom == "grow":
        assert (hog.state, hog.attempts, hog.memory_mb) == ("succeeded", 2, 512), hog.error
        env = cli_env(sortie)
        shown = await cli(["results", report.batch_id, "--format", "csv"], env)
        [row] = csv.DictReader(io.StringIO(shown.stdout))
        assert row["memory_mb"] == "512", "the result says the size that ran"
        assert sizes == [("1", 256), ("2", 512)], "killed at 256 MB, then run at 512 MB"
    else:
        assert (hog.state, hog.attempts, hog.memory_mb) == ("failed", 2, 256)
        assert "OOM killed" in (hog.error or "") and sizes == [("1", 256), ("2", 256)]
    assert not live(sortie, app_name)


async def test_infrastructure_retries_are_bounded(sortie: Sortie, app_name: str) -> None:
    spec = make_spec(app_name, [{"id": "doomed", "command": "true"}], defaults={"retries": 1})
    sortie.localfly.set_faults({"machines": [{"kind": "fail_boot", "count": None}]})
    report = await finish(sortie, await start(sortie, TUNING, spec))

    (doomed,) = report.results
    assert (doomed.state, doomed.attempts) == ("failed", 2)
    assert "failed state" in (doomed.error or "") and "attempt 2 of 2" in (doomed.error or "")
    assert len(machines(sortie, app_name)) == 2 and not live(sortie, app_name)


async def test_pause_creates_nothing_until_resume(sortie: Sortie, app_name: str) -> None:
    spec = make_spec(app_name, sleepers(8, 1), max_machines=2, chunk_size=4)
    batch_id = await start(sortie, TUNING, spec)
    handle = batches.batch_handle(sortie.client, batch_id)
    await eventually(lambda: len(live(sortie, app_name)) == 2, what="two live machines")

    await handle.signal(BatchWorkflow.pause, PauseRequest(reason="maintenance"))
    created = len(machines(sortie, app_name))
    progress = await eventually(
        lambda: _paused_and_idle(sortie, batch_id, app_name), what="running jobs to finish"
    )
    assert progress.pause_reason == "maintenance" and progress.counts.pending > 0
    # A job finishing as the pause arrives may still pass its slot on (one per slot); a slot
    # passed on after the pause took effect would go on from job to job until none was left.
    assert len(machines(sortie, app_name)) <= created + 2
    assert progress.counts.pending >= 8 - created - 2
    await handle.signal(BatchWorkflow.resume)
    report = await finish(sortie, batch_id)

    assert report.succeeded == 8
    async for history in chunk_histories(sortie, batch_id):
        assert_no_create_while_paused(history)


async def _paused_and_idle(s: Sortie, batch_id: str, app: str) -> Any:
    progress = await batches.progress(s.client, batch_id)
    return progress if progress.paused and not live(s, app) else None


@pytest.mark.parametrize("how", ["signal", "temporal_cancel"])
async def test_cancel_destroys_running_machines_and_keeps_partial_results(
    sortie: Sortie, app_name: str, how: str
) -> None:
    jobs = [{"id": "quick", "command": "true"}, *sleepers(11, 120)]
    spec = make_spec(app_name, jobs, max_machines=4, chunk_size=3)
    batch_id = await start(sortie, TUNING, spec)
    handle = batches.batch_handle(sortie.client, batch_id)
    await eventually(
        lambda: len(machines(sortie, app_name)) == 5 and len(live(sortie, app_name)) == 4,
        what="the quick job done and four machines running",
    )

    if how == "signal":
        await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="operator said stop"))
    else:
        await handle.cancel()
    await eventually(lambda: not live(sortie, app_name), timeout=30, what="no live machine")
    report = await finish(sortie, batch_id)

    assert report.status == "cancelled"
    assert [r.job_id for r in report.results] == [j["id"] for j in jobs]
    assert report.results[0].state == "succeeded"
    assert all(r.state == "cancelled" for r in report.results[1:])
    assert (report.total, report.succeeded, report.cancelled) == (12, 1, 11)
    if how == "signal":
        assert report.cancel_reason == "operator said stop"
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.COMPLETED


async def test_lowering_max_machines_takes_effect_as_jobs_finish(
    sortie: Sortie, app_name: str
) -> None:
    spec = make_spec(app_name, sleepers(24, 0.5), max_machines=6, chunk_size=8)
    batch_id = await start(sortie, TUNING, spec)
    handle = batches.batch_handle(sortie.client, batch_id)
    await eventually(lambda: len(live(sortie, app_name)) == 6, what="six live machines")

    await handle.signal(BatchWorkflow.set_max_machines, MaxMachinesRequest(max_machines=2))
    # Live machines dip between a destroy and the create of a slot's next job, so "at most two
    # alive" alone does not show the cap took effect: the chunks must also hold two slots.
    await eventually(
        lambda: _holding_at_most(sortie, batch_id, app_name, 2),
        what="two slots held and at most two live machines",
    )
    sortie.localfly.reset_stats()
    report = await finish(sortie, batch_id)

    assert report.succeeded == 24
    assert sortie.localfly.stats(app_name)["max_live_machines"] <= 2


async def _holding_at_most(s: Sortie, batch_id: str, app: str, slots: int) -> bool:
    progress = await batches.progress(s.client, batch_id)
    held = sum(c.slots for c in progress.chunks if c.status is ChunkStatus.RUNNING)
    return held <= slots and len(live(s, app)) <= slots


async def test_submitting_the_same_file_twice_is_one_batch(sortie: Sortie, app_name: str) -> None:
    spec = make_spec(app_name, [{"id": "once", "command": "true"}])
    first = await batches.submit(sortie.client, sortie.settings, spec, tuning=TUNING)
    second = await batches.submit(sortie.client, sortie.settings, spec, tuning=TUNING)
    await finish(sortie, first.batch_id)
    third = await batches.submit(sortie.client, sortie.settings, spec, tuning=TUNING)

    assert first.created and not second.created and not third.created
    assert first.batch_id == second.batch_id == third.batch_id
    assert third.status == "completed"
    query = f'BatchId="{first.batch_id}" AND WorkflowType="BatchWorkflow"'

    async def runs() -> int:
        return (await sortie.client.count_workflows(query)).count

    assert await eventually(runs, what="the batch to be visible") == 1
    assert len(machines(sortie, app_name)) == 1


async def test_an_unknown_secret_is_refused_before_any_machine(
    sortie: Sortie, app_name: str
) -> None:
    jobs = [{"id": "needs-secret", "command": "true", "secrets": ["SORTIE_TEST_ABSENT_SECRET"]}]
    batch_id = await start(sortie, TUNING, make_spec(app_name, jobs))
    with pytest.raises(WorkflowFailureError) as failure:
        await batches.batch_handle(sortie.client, batch_id).result()

    assert "SORTIE_TEST_ABSENT_SECRET" in str(failure.value.cause)
    assert machines(sortie, app_name) == []


@pytest.mark.parametrize("several", [False, True], ids=["app", "apps"])
async def test_an_app_fly_does_not_know_is_refused_before_any_machine(
    sortie: Sortie, app_name: str, tmp_path: Path, several: bool
) -> None:
    # Fly answers 404 for the app (localfly told so): the worker refuses the batch at once,
    # and the command line calls that bad input; among several apps, before any app gets one.
    known = f"t-{uuid.uuid4().hex[:10]}"
    sortie.localfly.set_faults({"missing_apps": [app_name]})
    try:
        batch = tmp_path / "batch.json"
        batch.write_text(
            json.dumps(
                {
                    "name": f"a{uuid.uuid4().hex[:6]}",
                    **({"apps": [known, app_name]} if several else {"app": app_name}),
                    "jobs": [{"id": f"j{i}", "command": "true"} for i in range(4)],
                }
            )
        )
        env = {
            **os.environ,
            "TEMPORAL_ADDRESS": sortie.settings.temporal_address,
            "SORTIE_TASK_QUEUE": sortie.settings.task_queue,
        }
        ran = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "starter.py", "submit", str(batch), "--wait"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        sortie.localfly.set_faults({})
    assert ran.returncode == 2, (ran.stdout, ran.stderr)
    assert f"Fly app {app_name!r} cannot be used" in ran.stderr and "Traceback" not in ran.stderr
    assert sortie.localfly.stats(app_name)["calls"] == {"app": 1}, "no machine was asked for"
    if several:
        assert sortie.localfly.stats(known)["calls"] == {"app": 1}, "none in the known app"


async def test_signals_sent_with_the_plain_temporal_cli(sortie: Sortie, app_name: str) -> None:
    spec = make_spec(app_name, sleepers(6, 60), max_machines=2, chunk_size=3)
    batch_id = await start(sortie, TUNING, spec)
    await eventually(lambda: len(live(sortie, app_name)) == 2, what="two live machines")

    def cli(*args: str) -> None:
        subprocess.run(
            [
                str(TEMPORAL_CLI),
                "workflow",
                "signal",
                "--address",
                sortie.settings.temporal_address,
                "--workflow-id",
                batch_id,
                *args,
            ],
            check=True,
            capture_output=True,
        )

    cli("--name", "pause")
    await eventually(
        lambda: _field(batches.progress(sortie.client, batch_id), "paused"), what="paused"
    )
    cli("--name", "set_max_machines", "--input", '{"max_machines": 3}')
    cli("--name", "resume")
    await eventually(
        lambda: _max_machines_is(sortie, batch_id, 3), what="max_machines changed to 3"
    )
    cli("--name", "cancel", "--input", '{"reason": "from the CLI"}')
    report = await finish(sortie, batch_id)

    assert report.status == "cancelled" and report.cancel_reason == "from the CLI"
    assert not live(sortie, app_name)


async def _field(coroutine: Any, name: str) -> Any:
    return getattr(await coroutine, name)


async def _max_machines_is(s: Sortie, batch_id: str, n: int) -> bool:
    progress = await batches.progress(s.client, batch_id)
    return progress.max_machines == n and not progress.paused


async def test_starter_submit_wait_json_and_bad_input(
    sortie: Sortie, app_name: str, tmp_path: Any
) -> None:
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": sortie.settings.temporal_address,
        "SORTIE_TASK_QUEUE": sortie.settings.task_queue,
    }
    good = tmp_path / "batch.json"
    good.write_text(
        json.dumps(
            {
                "name": f"cli{uuid.uuid4().hex[:6]}",
                "app": app_name,
                "jobs": [{"id": "a", "command": "echo a"}, {"id": "b", "command": "exit 1"}],
            }
        )
    )
    ran = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "starter.py", "submit", str(good), "--wait", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    document = json.loads(ran.stdout)
    assert ran.returncode == 1, ran.stderr
    assert {"total", "succeeded", "failed", "cancelled", "results"} <= document.keys()
    assert (document["total"], document["succeeded"], document["failed"]) == (2, 1, 1)
    first = document["results"][0]
    assert {"job_id", "state", "exit_code", "attempts", "machine_id", "error"} <= first.keys()
    assert "Web UI: http" in ran.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\napp: y\njobs:\n  - id: a\n")
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "starter.py", "submit", str(bad)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "job 'a' (jobs[0]): set exactly one of command or prompt" in refused.stderr


async def test_results_of_a_closed_batch_need_no_worker(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    # The chunks' compact rows are in Temporal, their log tails in the object store: a closed
    # batch reads back whole with every worker gone.
    settings = settings_for(temporal.client.service_client.config.target_host).model_copy(
        update={"state_dir": tmp_path / "state"}
    )
    worker = WorkerProcess(settings, localfly.url, tmp_path / "worker.log").start()
    try:
        submitted = await batches.submit(
            temporal.client, settings, spec_for(app_name, seconds=0.1), tuning=TUNING
        )
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
    finally:
        worker.stop()

    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "SORTIE_TASK_QUEUE": settings.task_queue,
        "SORTIE_STATE_DIR": str(settings.state_dir),
    }
    ran = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "starter.py", "results", submitted.batch_id, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    document = json.loads(ran.stdout)
    assert [r["state"] for r in document["results"]] == ["succeeded"] * JOBS
    for i, result in enumerate(document["results"]):
        assert f"out-{i}" in "\n".join(result["log_tail"]), "read back from the object store"
