"""Claude Code jobs end to end: the agent entrypoint on localfly machines, the stand-in `claude`.

The stand-in answers like the real CLI's `--output-format json`; markers in a prompt pick its
behaviour (`[[cost:X]]`, `[[long:N]]`, `[[auth]]`, `[[write:NAME]]`, ...). Nothing touches the
network: repositories are local git repositories made by the test.
"""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from activities import reaper as reaper_activities
from client import batches
from sortie import reaping
from sortie.claude import PREVIEW_CHARS
from sortie.reaper_models import ReapInput
from sortie.spec import BatchSpec, parse_batch
from sortie.store import REPORTS, session_prefix
from tests.helpers.batches import git_repo, settings_for
from tests.helpers.history import largest_payload, signal_handled
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import Sortie
from tests.helpers.waiting import eventually
from workflows.batch import BatchWorkflow
from workflows.batch_models import CancelRequest, MaxCostRequest


def prompt_spec(app: str, jobs: list[dict[str, Any]], **fields: Any) -> BatchSpec:
    return parse_batch(
        {
            "name": f"p{uuid.uuid4().hex[:8]}",
            "app": app,
            "max_machines": 4,
            "chunk_size": 3,
            "defaults": {"timeout": "2m", "retries": 1},
            "jobs": jobs,
            **fields,
        }
    )


async def run_batch(s: Sortie, spec: BatchSpec) -> batches.BatchReport:
    submitted = await batches.submit(s.client, s.settings, spec)
    await batches.batch_handle(s.client, submitted.batch_id).result()
    return await batches.results(s.client, submitted.batch_id, store=s.settings.blob_store())


def live(s: Sortie, app: str) -> list[dict[str, Any]]:
    return [m for m in s.localfly.machines(app) if m["state"] != "destroyed"]


async def test_prompt_jobs_return_answer_session_and_cost(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    repo = git_repo(tmp_path / "repo")
    jobs: list[dict[str, Any]] = [
        {"id": "review", "prompt": "Review the code [[cost:0.25]]", "repos": [str(repo)]},
        {"id": "essay", "prompt": f"Write at length [[long:{PREVIEW_CHARS * 3}]] [[cost:0.5]]"},
        {"id": "broken", "prompt": "This one fails [[error]]", "retries": 0},
    ]
    report = await run_batch(sortie, prompt_spec(app_name, jobs))

    review, essay, broken = report.results
    assert review.state == "succeeded" and review.exit_code == 0
    assert review.session_id and review.cost_usd == 0.25 and review.num_turns
    assert "app.py" in (review.result or ""), "the job saw the cloned repository"
    assert review.commits[str(repo)] == _head(repo)

    assert essay.state == "succeeded" and essay.cost_usd == 0.5
    assert essay.result is not None and len(essay.result) == PREVIEW_CHARS
    assert essay.result_ref and essay.result_chars == PREVIEW_CHARS * 3
    full = await batches.full_answer(sortie.settings, essay)
    assert full is not None and len(full) == PREVIEW_CHARS * 3 and full.startswith(essay.result)

    assert broken.state == "failed" and broken.exit_code == 1 and broken.is_error
    assert broken.error_kind == "other" and "Claude failed" in (broken.error or "")

    assert report.cost_usd == pytest.approx(0.25 + 0.5 + (broken.cost_usd or 0.0))
    assert report.num_turns == sum(r.num_turns or 0 for r in report.results)
    assert live(sortie, app_name) == []


BAD = f"sk-ant-oat01-bad-{uuid.uuid4().hex}"
GOOD = f"sk-ant-oat01-good-{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    "worker_env",
    [{"CLAUDE_CODE_OAUTH_TOKEN": BAD, "CLAUDE_CODE_OAUTH_TOKEN_2": GOOD}],
    indirect=True,
)
async def test_a_refused_credential_is_rested_and_the_job_retried_with_another(
    sortie: Sortie, app_name: str, worker_env: dict[str, str]
) -> None:
    bad = BAD
    jobs = [{"id": f"j{i}", "prompt": f"question {i}"} for i in range(4)]
    spec = prompt_spec(
        app_name,
        jobs,
        max_machines=1,
        defaults={"retries": 1, "env": {"STANDIN_CLAUDE_BAD_TOKENS": bad}},
    )
    report = await run_batch(sortie, spec)

    assert [r.state for r in report.results] == ["succeeded"] * 4
    assert all(r.credential == "CLAUDE_CODE_OAUTH_TOKEN_2" for r in report.results)
    # Only the first job met the bad credential; after that it rested and was not handed out.
    assert [r.attempts for r in report.results] == [2, 1, 1, 1]


async def test_budget_pauses_the_batch_and_a_raised_budget_continues(
    sortie: Sortie, app_name: str
) -> None:
    jobs = [{"id": f"j{i}", "prompt": f"step {i} [[cost:0.2]]"} for i in range(6)]
    spec = prompt_spec(app_name, jobs, max_machines=1, max_cost_usd=0.5)
    submitted = await batches.submit(sortie.client, sortie.settings, spec)
    handle = batches.batch_handle(sortie.client, submitted.batch_id)

    paused = await eventually(
        lambda: _paused(sortie, submitted.batch_id), timeout=60, what="the batch to pause itself"
    )
    assert "budget reached" in (paused.pause_reason or "")
    assert paused.counts.cost_usd == pytest.approx(0.6)
    await eventually(lambda: not live(sortie, app_name), what="running jobs to finish")
    assert len(sortie.localfly.machines(app_name)) == 3, "no machine was created past the budget"

    await handle.signal(BatchWorkflow.resume)  # still over budget: stays paused
    await eventually(lambda: signal_handled(handle, "resume"), what="the resume handled")
    still = await batches.progress(sortie.client, submitted.batch_id)
    assert still.paused and "budget reached" in (still.pause_reason or ""), still
    assert len(sortie.localfly.machines(app_name)) == 3, "a machine was created past the budget"
    await handle.signal(BatchWorkflow.set_max_cost, MaxCostRequest(max_cost_usd=5.0))
    await handle.signal(BatchWorkflow.resume)
    await handle.result()
    report = await batches.results(
        sortie.client, submitted.batch_id, store=sortie.settings.blob_store()
    )
    assert report.succeeded == 6 and report.cost_usd == pytest.approx(1.2)


async def _paused(s: Sortie, batch_id: str) -> Any:
    progress = await batches.progress(s.client, batch_id)
    return progress if progress.paused else None


async def test_followup_continues_the_session_in_the_workspace_it_left(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    repo = git_repo(tmp_path / "repo")
    jobs = [{"id": "fix", "prompt": "Note it [[write:notes.txt]]", "repos": [str(repo)]}]
    report = await run_batch(sortie, prompt_spec(app_name, jobs, keep_sessions="1h"))
    first = report.results[0]
    assert first.state == "succeeded" and first.session_id and first.archive_ref

    workflow_id = await batches.followup(
        sortie.client, sortie.settings, report.batch_id, "fix", "What did you write? [[slow:2]]"
    )
    # The batch is closed, yet the follow-up's machine is owned: the reaper leaves it alone.
    await eventually(lambda: live(sortie, app_name), what="the follow-up's machine")
    sweep = await reaping.reap_once(
        sortie.client, sortie.settings, ReapInput(app=app_name, dry_run=True)
    )
    assert sweep.checked == 1 and sweep.orphans == []
    [row] = await batches.turn_rows(sortie.client, workflow_id)
    assert row.result is None and row.result_ref, "the stored row carries a key, not text"
    turn = await batches.expand(row, sortie.settings.blob_store())
    assert turn.state == "succeeded" and turn.turn == 2
    assert turn.session_id == first.session_id
    assert f"resumed session {first.session_id} (turn 2)" in (turn.result or "")
    assert "notes.txt" in (turn.result or ""), "the workspace came back as the first turn left it"

    again = await batches.results(
        sortie.client, report.batch_id, store=sortie.settings.blob_store()
    )
    assert [t.turn for t in again.results[0].followups] == [2]
    assert again.cost_usd == pytest.approx((first.cost_usd or 0) + (turn.cost_usd or 0))

    # A third turn at once continues the second: turns are found by id, not through visibility.
    third_id = await batches.followup(
        sortie.client, sortie.settings, report.batch_id, "fix", "And then?"
    )
    third = (await batches.turn_rows(sortie.client, third_id))[0]
    assert (third.state, third.turn) == ("succeeded", 3)
    _, found = await batches.find_job(
        sortie.client, report.batch_id, "fix", store=sortie.settings.blob_store()
    )
    assert [t.turn for t in found.followups] == [2, 3]
    assert live(sortie, app_name) == []


async def test_sessions_are_deleted_with_the_batch_unless_kept(
    sortie: Sortie, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sortie.settings.blob_store()
    report = await run_batch(sortie, prompt_spec(app_name, [{"id": "a", "prompt": "hi"}]))
    assert report.results[0].archive_ref
    assert await store.get(report.results[0].archive_ref) is None, "deleted when the batch closed"
    with pytest.raises(batches.FollowupRefused):
        await batches.followup(sortie.client, sortie.settings, report.batch_id, "nope", "x")

    kept = await run_batch(
        sortie, prompt_spec(app_name, [{"id": "b", "prompt": "hi"}], keep_sessions="1h")
    )
    archive = kept.results[0].archive_ref
    assert archive and await store.get(archive) is not None
    swept = await reaping.reap_once(sortie.client, sortie.settings, ReapInput(app=app_name))
    assert swept.expired_sessions == [] and await store.get(archive) is not None

    # Once the keep time is up, the reaper deletes them.
    past = datetime.now(UTC) - timedelta(seconds=1)
    await store.put(f"{session_prefix(kept.batch_id)}/keep-until", past.isoformat().encode())
    swept = await reaping.reap_once(sortie.client, sortie.settings, ReapInput(app=app_name))
    assert session_prefix(kept.batch_id) in swept.expired_sessions
    assert await store.get(archive) is None

    # The agents' reports of closed batches go too, once read long enough ago; the answers
    # (which history points at) stay.
    reports = f"{REPORTS}/{kept.batch_id}"
    assert [o.key async for o in store.objects(reports)], "the agent's report came by the store"
    monkeypatch.setattr(reaper_activities, "REPORTS_KEPT", timedelta(0))
    swept = await reaping.reap_once(sortie.client, sortie.settings, ReapInput(app=app_name))
    assert swept.stale_reports >= 1
    assert [o.key async for o in store.objects(reports)] == []
    assert kept.results[0].result_ref and await store.get(kept.results[0].result_ref)


def _head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


ANSWER_CHARS = 20_000


async def test_answers_arrive_whole_when_logs_lose_lines(sortie: Sortie, app_name: str) -> None:
    # Fly's logs are best-effort: with a tenth of the lines lost for good, every answer still
    # arrives whole, because the report travels by the object store, not the logs.
    sortie.localfly.set_faults({"log_drop_rate": 0.1, "seed": 15})
    try:
        jobs = [{"id": f"j{i}", "prompt": f"Essay {i} [[long:{ANSWER_CHARS}]]"} for i in range(20)]
        report = await run_batch(sortie, prompt_spec(app_name, jobs, max_machines=10))
    finally:
        sortie.localfly.set_faults({})
    assert [r.state for r in report.results] == ["succeeded"] * 20
    for result in report.results:
        full = await batches.full_answer(sortie.settings, result)
        assert full is not None and len(full) == ANSWER_CHARS, result.job_id
    assert live(sortie, app_name) == []


async def test_a_report_that_never_arrives_fails_the_job(sortie: Sortie, app_name: str) -> None:
    # Claude ran and the machine exited 0, but the report never reached the store.
    sortie.localfly.set_faults({"machines": [{"kind": "withhold_report", "count": 1}]})
    try:
        report = await run_batch(
            sortie, prompt_spec(app_name, [{"id": "lost", "prompt": "hi", "retries": 0}])
        )
    finally:
        sortie.localfly.set_faults({})
    [lost] = report.results
    assert (lost.state, lost.exit_code, lost.attempts) == ("failed", 0, 1), "not run again"
    assert lost.error_kind == "no_report" and "never reached the object store" in (lost.error or "")
    assert (report.succeeded, report.failed) == (0, 1)


async def test_a_followup_runs_on_another_worker_with_its_own_state_dir(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    # Two hosts in all but name: worker processes with different SORTIE_STATE_DIRs, sharing
    # only Temporal and the object store. The first runs the batch and stops; the follow-up
    # runs on the second, from the session archive the first one's machine uploaded.
    address = temporal.client.service_client.config.target_host
    settings = settings_for(address)
    credential = {"CLAUDE_CODE_OAUTH_TOKEN": f"sk-ant-oat01-{uuid.uuid4().hex}"}

    def worker(name: str) -> WorkerProcess:
        own = settings.model_copy(update={"state_dir": tmp_path / name})
        return WorkerProcess(own, localfly.url, tmp_path / f"{name}.log", env=credential)

    repo = git_repo(tmp_path / "repo")
    jobs = [{"id": "fix", "prompt": "Note it [[write:notes.txt]]", "repos": [str(repo)]}]
    first = worker("host-a").start()
    try:
        submitted = await batches.submit(
            temporal.client, settings, prompt_spec(app_name, jobs, keep_sessions="1h")
        )
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
    finally:
        assert first.terminate() == 0
    second = worker("host-b").start()
    try:
        workflow_id = await batches.followup(
            temporal.client, settings, submitted.batch_id, "fix", "What did you write?"
        )
        [turn] = await batches.turn_rows(temporal.client, workflow_id)
    finally:
        second.stop()
    turn = await batches.expand(turn, settings.blob_store())
    assert turn.state == "succeeded", turn.error
    assert "notes.txt" in (turn.result or ""), "the workspace came back on the other host"
    assert not (tmp_path / "host-a").exists() and not (tmp_path / "host-b").exists(), (
        "nothing on either worker's disk"
    )


PROMPT_BYTES = 2_000
PAYLOAD_LIMIT = 512 * 1024


async def test_twenty_thousand_prompt_jobs_of_2kb_start_small_and_leave_no_machine(
    sortie: Sortie, app_name: str
) -> None:
    # 40 MB of prompts: the jobs wait in the object store and no workflow or activity input or
    # result in any history reaches 512 KB. The suite runs a few of them and cancels the rest
    # (the bench runs all 20,000 on 200 machines).
    jobs = [
        {"id": f"j{i:05d}", "prompt": f"Review {i} " + "p" * PROMPT_BYTES} for i in range(20_000)
    ]
    spec = prompt_spec(app_name, jobs, max_machines=2, chunk_size=250)
    submitted = await batches.submit(sortie.client, sortie.settings, spec)
    handle = batches.batch_handle(sortie.client, submitted.batch_id)

    async def some_succeeded() -> bool:
        return (await batches.progress(sortie.client, submitted.batch_id)).counts.succeeded >= 2

    await eventually(some_succeeded, timeout=120, what="the first jobs done")
    await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="enough of a sample"))
    await handle.result()
    await eventually(lambda: live(sortie, app_name) == [], what="every machine destroyed")

    report = await batches.results(
        sortie.client, submitted.batch_id, store=sortie.settings.blob_store()
    )
    assert [r.job_id for r in report.results] == [job["id"] for job in jobs]
    assert report.succeeded >= 2 and report.succeeded + report.cancelled == 20_000
    largest, runs = await largest_payload(sortie.client, f'BatchId="{submitted.batch_id}"')
    assert runs > 1 and 0 < largest < PAYLOAD_LIMIT, (largest, runs)


async def test_prompt_jobs_and_a_followup_run_with_reused_machines(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    """`reuse_machines`: prompt jobs take each other's machine (a credential and upload URLs
    of their own each time); a follow-up turn runs on a machine of its own."""
    repo = git_repo(tmp_path / "repo")
    jobs = [
        {"id": f"p{i}", "prompt": f"Note it [[write:notes-{i}.txt]]", "repos": [str(repo)]}
        for i in range(3)
    ]
    spec = prompt_spec(app_name, jobs, max_machines=1, reuse_machines=True, keep_sessions="1h")
    report = await run_batch(sortie, spec)

    assert [r.state for r in report.results] == ["succeeded"] * 3
    assert [r.machine_reused for r in report.results] == [False, True, True]
    assert len({r.machine_id for r in report.results}) == 1
    assert len({r.session_id for r in report.results}) == 3
    workflow_id = await batches.followup(
        sortie.client, sortie.settings, report.batch_id, "p2", "What did you write?"
    )
    [turn] = await batches.turn_rows(sortie.client, workflow_id)
    assert turn.state == "succeeded" and turn.turn == 2 and not turn.machine_reused
    assert turn.machine_id != report.results[2].machine_id
    assert live(sortie, app_name) == []
