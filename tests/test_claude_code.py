"""Prompt jobs with the real Claude Code CLI (npm, the version agent/Dockerfile pins) on localfly
machines, against the fake Messages API of tests/helpers/anthropic_api.py on loopback.

Markers in a prompt script the fake API (`[[tool]]`, `[[status:529]]`, `[[structured:{…}]]`,
`[[hang]]`, `[[burst:2]]`, `[[cut]]`); a credential whose ANTHROPIC_BASE_URL_n ends in
`/status/429` is refused with that status. What the CLI does with it (its retries, its
messages, its result object) is its own.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType

from client import batches, render
from sortie.claude import CLI_ENV
from sortie.spec import BatchSpec, parse_batch
from tests.helpers.anthropic_api import ANSWER
from tests.helpers.batches import git_repo
from tests.helpers.cli import cli, cli_env
from tests.helpers.history import every_run
from tests.helpers.stack import Sortie
from tests.helpers.waiting import eventually
from workflows.batch import BatchWorkflow

CLI_RETRIES = "CLAUDE_CODE_MAX_RETRIES"
RETRIES = int(CLI_ENV[CLI_RETRIES])
"""The CLI's own retries a job gets by default: a refused call is made 1 + RETRIES times."""


def claude_spec(app: str, jobs: list[dict[str, Any]], **fields: Any) -> BatchSpec:
    defaults = {"timeout": "3m", "retries": 0, "log_tail": "always", **fields.pop("defaults", {})}
    return parse_batch(
        {
            "name": f"cc{uuid.uuid4().hex[:8]}",
            "app": app,
            "max_machines": 8,
            "chunk_size": 8,
            "defaults": defaults,
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


def open_gate(machine_id: str, repo: str) -> None:
    """Touch `.gate` in a running localfly machine's checkout (its own temporary directory),
    the one place a sandboxed `verify` sees."""
    [checkout] = Path(tempfile.gettempdir()).glob(f"localfly-{machine_id}-*/workspace/{repo}")
    (checkout / ".gate").touch()


def api(s: Sortie) -> Any:
    assert s.api is not None
    return s.api


async def test_an_answer_its_session_cost_and_turns_and_a_followup_on_a_new_machine(
    claude_code: Sortie, app_name: str, tmp_path: Path
) -> None:
    repo = git_repo(tmp_path / "repo")
    marker = uuid.uuid4().hex
    cut = uuid.uuid4().hex
    jobs: list[dict[str, Any]] = [
        {"id": "look", "prompt": f"Look around {marker} [[tool]]", "repos": [str(repo)]},
        {"id": "cut", "prompt": f"A stream that breaks {cut} [[cut]]"},
    ]
    report = await run_batch(claude_code, claude_spec(app_name, jobs, keep_sessions="1h"))
    first, unstreamed = report.results
    assert first.state == "succeeded", first.error
    assert first.result == ANSWER and first.session_id and first.archive_ref
    assert first.num_turns == 2, "a tool use, then the answer"
    assert first.cost_usd and first.cost_usd > 0, "the CLI priced the usage the API reported"
    calls = api(claude_code).calls_to(marker=marker)
    assert len(calls) == 2 and all(c.stream for c in calls), "the CLI streams its requests"
    # Streams that break make the CLI ask without streaming: that answer counts the same.
    assert (unstreamed.state, unstreamed.result) == ("succeeded", ANSWER), unstreamed.error
    assert [c.stream for c in api(claude_code).calls_to(marker=cut)][-1] is False
    # The live log: one human line per event, never the CLI's JSON.
    assert any("uses Bash" in line for line in first.log_tail), first.log_tail
    assert not any(line.lstrip().startswith("{") for line in first.log_tail), first.log_tail

    followup = uuid.uuid4().hex
    workflow_id = await batches.followup(
        claude_code.client, claude_code.settings, report.batch_id, "look", f"And now? {followup}"
    )
    [row] = await batches.turn_rows(claude_code.client, workflow_id)
    turn = await batches.expand(row, claude_code.settings.blob_store())
    assert (turn.state, turn.turn) == ("succeeded", 2), turn.error
    assert turn.session_id == first.session_id, "the follow-up resumed the session"
    [resumed] = api(claude_code).calls_to(marker=followup)
    assert marker in resumed.text, "the first turn's conversation came along"
    assert all(c.path.endswith("/v1/messages") for c in api(claude_code).calls), (
        "with the agent's environment the CLI calls nothing but the Messages API"
    )
    machines = claude_code.localfly.machines(app_name)
    assert len(machines) == 3 and live(claude_code, app_name) == []


ERROR_KINDS = {
    429: "rate_limit",
    529: "overloaded",
    503: "overloaded",
    401: "auth",
    403: "auth",
    400: "invalid_request",
}


async def test_each_api_error_becomes_its_error_kind(claude_code: Sortie, app_name: str) -> None:
    tag = uuid.uuid4().hex
    jobs: list[dict[str, Any]] = [
        {"id": f"s{status}", "prompt": f"{tag} [[status:{status}]]"} for status in ERROR_KINDS
    ]
    jobs += [
        # The batch file's env overrides the CLI's bounds a job gets by default.
        {"id": "once", "prompt": f"{tag}-once [[status:429]]", "env": {CLI_RETRIES: "1"}},
        {"id": "turns", "prompt": f"{tag} [[tool]]", "max_turns": 1},
        {"id": "budget", "prompt": f"{tag} [[tool]]", "max_cost_usd": 0.001},
    ]
    report = await run_batch(claude_code, claude_spec(app_name, jobs, storm=False, max_machines=10))
    kinds = {r.job_id: r.error_kind for r in report.results}
    assert kinds == {
        **{f"s{status}": kind for status, kind in ERROR_KINDS.items()},
        "once": "rate_limit",
        "turns": "max_turns",
        "budget": "budget",
    }
    assert len(api(claude_code).calls_to(marker=f"{tag}-once [[status:429]]")) == 2
    assert all(r.state == "failed" for r in report.results)
    for status, calls in ((429, 1 + RETRIES), (401, 1 + RETRIES), (529, 3), (503, 3)):
        # The CLI's own retries are the job's bound (CLAUDE_CODE_MAX_RETRIES), not its ~10;
        # it stops sooner by itself after 3 overloaded answers in a row.
        made = api(claude_code).calls_to(marker=f"{tag} [[status:{status}]]")
        assert len(made) == calls, (status, len(made))
    assert live(claude_code, app_name) == []


async def test_an_overloaded_api_is_a_storm_and_a_bad_request_is_not(
    claude_code: Sortie, app_name: str
) -> None:
    tag = uuid.uuid4().hex
    # One machine at a time, in this order: the 400 has failed before the first 529 starts, so
    # had it counted, the 529 would have made the storm's two errors.
    jobs = [
        {"id": "bad", "prompt": f"{tag} [[status:400]]"},
        {"id": "o529", "prompt": f"{tag} [[status:529]]"},
        {"id": "o503", "prompt": f"{tag} [[status:503]]"},
        *({"id": f"later{i}", "prompt": f"{tag} waits for a slot"} for i in range(2)),
    ]
    spec = claude_spec(app_name, jobs, max_machines=1, storm={"errors": 2, "within": "5m"})
    submitted = await batches.submit(claude_code.client, claude_code.settings, spec)
    handle = batches.batch_handle(claude_code.client, submitted.batch_id)

    async def paused() -> Any:
        progress = await batches.progress(claude_code.client, submitted.batch_id)
        return progress if progress.paused and progress.counts.failed == 3 else None

    progress = await eventually(paused, timeout=120, what="the storm to pause the batch")
    assert (progress.pause_reason or "").startswith(
        "storm: 2 errors within 5m (2 Claude API overloaded)"
    ), "the 400 failed too, and was no storm error"
    assert progress.counts.pending == 2, "no job started after the storm"
    await handle.signal(BatchWorkflow.cancel)
    await handle.result()
    await eventually(lambda: not live(claude_code, app_name), what="machines destroyed")


@pytest.mark.parametrize(
    "claude_credentials",
    [
        {"ANTHROPIC_API_KEY": 429, "ANTHROPIC_API_KEY_2": None},
        {"ANTHROPIC_API_KEY": 401, "ANTHROPIC_API_KEY_2": None},
    ],
    ids=["429", "401"],
    indirect=True,
)
async def test_a_refused_credential_comes_back_rested_and_a_short_burst_is_ridden_out(
    claude_code: Sortie, app_name: str, claude_credentials: dict[str, int | None]
) -> None:
    [status] = [s for s in claude_credentials.values() if s]
    tag = uuid.uuid4().hex
    jobs = [
        {"id": "first", "prompt": f"{tag} first"},
        {"id": "burst", "prompt": f"{tag} [[burst:2]]"},
    ]
    spec = claude_spec(app_name, jobs, max_machines=1, defaults={"retries": 1})
    report = await run_batch(claude_code, spec)

    first, burst = report.results
    assert (first.state, first.attempts) == ("succeeded", 2), first.error
    assert first.credential == "ANTHROPIC_API_KEY_2", "the next attempt took another credential"
    refused = api(claude_code).calls_to(prefix=f"/status/{status}", marker=f"{tag} first")
    assert len(refused) == 1 + RETRIES, "the CLI gave up after the job's bounded retries"
    # The refused credential rests: the next job never gets it, and rides out its 429s.
    assert (burst.state, burst.attempts, burst.credential) == (
        "succeeded",
        1,
        "ANTHROPIC_API_KEY_2",
    )
    assert [c.status for c in api(claude_code).calls_to(marker=f"{tag} [[burst:2]]")] == [
        429,
        429,
        200,
    ]


async def test_json_schema_gives_the_object_and_a_mismatch_fails_the_job(
    claude_code: Sortie, app_name: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "why": {"type": "string"}},
        "required": ["answer"],
    }
    jobs = [
        {"id": "fits", "prompt": '[[structured:{"answer": 42, "why": "asked"}]]'},
        {"id": "wrong", "prompt": '[[structured:{"answer": "forty-two"}]]'},
    ]
    report = await run_batch(
        claude_code, claude_spec(app_name, jobs, defaults={"json_schema": schema})
    )
    fits, wrong = report.results
    assert fits.state == "succeeded", fits.error
    assert fits.structured == {"answer": 42, "why": "asked"}
    calls = api(claude_code).calls_to(marker='"why": "asked"')
    assert calls and "StructuredOutput" in calls[0].tools, "the CLI got --json-schema"
    assert (wrong.state, wrong.error_kind, wrong.structured) == ("failed", "invalid_output", None)
    assert "does not match json_schema" in (wrong.error or "") or "no structured" in (
        wrong.error or ""
    )

    env = cli_env(claude_code)
    shown = await cli(["results", report.batch_id, "--job", "fits"], env)
    assert shown.returncode == 0, shown.stderr
    assert "structured (json_schema):" in shown.stdout and '"answer": 42' in shown.stdout
    as_csv = await cli(["results", report.batch_id, "--format", "csv"], env)
    [row] = [r for r in csv.DictReader(io.StringIO(as_csv.stdout)) if r["job_id"] == "fits"]
    assert json.loads(row["structured"]) == {"answer": 42, "why": "asked"}
    as_json = await cli(["results", report.batch_id, "--format", "jsonl"], env)
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["structured"] for r in rows] == [{"answer": 42, "why": "asked"}, None]


async def test_a_hung_api_call_is_stopped_as_stalled(claude_code: Sortie, app_name: str) -> None:
    jobs = [{"id": "hangs", "prompt": f"{uuid.uuid4().hex} [[hang]]"}]
    spec = claude_spec(app_name, jobs, defaults={"stall_timeout": "20s", "timeout": "10m"})
    report = await run_batch(claude_code, spec)
    [job] = report.results
    assert (job.state, job.error_kind) == ("failed", "stalled"), job.error
    assert job.error and "stalled" in job.error
    assert job.session_id and job.archive_ref, "what it had, its session too, was uploaded"
    assert any("stalled, stopping it" in line for line in job.log_tail), job.log_tail
    assert live(claude_code, app_name) == []


async def test_a_verify_loop_spends_the_batch_budget_as_it_happens(
    claude_code: Sortie, app_name: str, tmp_path: Path
) -> None:
    """The batch pauses at its budget while the loop that spent it still runs, as it would at a
    plain prompt job's cost, so no machine starts on money a running loop has spent, though
    cheap jobs beside it free their slots."""
    repo = git_repo(tmp_path / "repo")
    # Each turn reports 200,000 output tokens: dollars at any model's price, past the budget.
    jobs: list[dict[str, Any]] = [
        {
            "id": "loop",
            "prompt": f"Make it pass {uuid.uuid4().hex} [[usage:200000]]",
            "repos": [str(repo)],
            # verify sees only its checkout (its sandbox): the gate is opened there
            "verify": "while [ ! -e .gate ]; do sleep 0.1; done; exit 1",
            "max_iterations": 2,
        },
        *({"id": f"cheap{i}", "prompt": f"A cheap question {i}"} for i in range(4)),
    ]
    # Room for the real CLI: localfly kills a machine past its memory_mb, as Fly's kernel does.
    roomy = {"guest": {"memory_mb": 1024}}
    spec = claude_spec(app_name, jobs, max_machines=2, max_cost_usd=0.5, defaults=roomy)
    submitted = await batches.submit(claude_code.client, claude_code.settings, spec)

    async def paused_while_looping() -> Any:
        progress = await batches.progress(claude_code.client, submitted.batch_id)
        looping = any("-loop-" in m.get("name", "") for m in live(claude_code, app_name))
        return progress if progress.paused and looping else None

    paused = await eventually(
        paused_while_looping, timeout=60, what="the batch to pause while the loop runs"
    )
    assert "budget reached" in (paused.pause_reason or ""), paused.pause_reason
    assert paused.counts.cost_usd >= 0.5, "the first turn's cost, counted before the job ended"
    made = len(claude_code.localfly.machines(app_name))

    [loop_machine] = [m["id"] for m in live(claude_code, app_name) if "-loop-" in m["name"]]
    open_gate(loop_machine, "repo")  # the check fails: Claude's second turn, then the job ends
    await eventually(lambda: not live(claude_code, app_name), what="running jobs to end")
    assert len(claude_code.localfly.machines(app_name)) == made, "a machine started past it"
    handle = batches.batch_handle(claude_code.client, submitted.batch_id)
    await handle.signal(BatchWorkflow.cancel)
    await handle.result()
    report = await batches.results(
        claude_code.client, submitted.batch_id, store=claude_code.settings.blob_store()
    )
    loop = report.results[0]
    assert (loop.state, loop.error_kind) == ("failed", "verify_failed"), loop.error
    assert len(loop.iterations) == 2 and loop.attempts == 1
    assert loop.cost_usd == pytest.approx(sum(i.cost_usd for i in loop.iterations))
    assert report.cost_usd == pytest.approx(sum(r.cost_usd or 0 for r in report.results))
    assert loop.iterations[0].cost_usd <= paused.counts.cost_usd < report.cost_usd


@pytest.mark.parametrize(
    "claude_credentials",
    [{"CLAUDE_CODE_OAUTH_TOKEN": "limit-one", "CLAUDE_CODE_OAUTH_TOKEN_2": "limit-two"}],
    indirect=True,
)
async def test_every_credential_refused_until_a_reset_pauses_the_batch_until_then(
    claude_code: Sortie, app_name: str
) -> None:
    # Both subscriptions hit their usage limit, which resets 30 s from now: the real CLI says so
    # (a `rate_limit_event` and "resets …"), each credential rests until then, the batch pauses
    # by itself and resumes by itself at the reset, with no `auto_resume_after`.
    fake, tag = api(claude_code), uuid.uuid4().hex
    reset = int(time.time()) + 30
    fake.limit("limit-one", reset)
    fake.limit("limit-two", reset)
    jobs = [{"id": f"ask{i}", "prompt": f"{tag} question {i}"} for i in range(3)]
    spec = claude_spec(app_name, jobs, max_machines=2, defaults={"retries": 2})
    assert spec.storm is not None and spec.storm.auto_resume_after is None
    submitted = await batches.submit(claude_code.client, claude_code.settings, spec)
    handle = batches.batch_handle(claude_code.client, submitted.batch_id)

    async def paused() -> str | None:
        progress = await handle.query(BatchWorkflow.progress)
        return progress.pause_reason if progress.paused else None

    reason = await eventually(paused, timeout=60, what="the pause for the resting credentials")
    paused_at = time.time()
    until = datetime.fromtimestamp(reset, UTC)
    assert f"every Claude credential is resting until {until:%H:%M:%S} UTC" in reason, reason
    assert "resumes by itself" in reason
    # What `status` prints (in-process: a command line started now might see the batch resumed).
    shown = render.progress_lines(
        batches.view(await batches.progress(claude_code.client, submitted.batch_id))
    )
    assert f"until {until:%H:%M:%S} UTC" in shown[0], shown
    await asyncio.wait_for(handle.result(), timeout=180)

    report = await batches.results(claude_code.client, submitted.batch_id)
    assert [r.state for r in report.results] == ["succeeded"] * 3, [r.error for r in report.results]
    refused = [c for c in fake.calls if tag in c.text and c.status == 429]
    answered = [c for c in fake.calls if tag in c.text and c.status == 200]
    assert refused and all(c.at < reset for c in refused), "refused only before the reset"
    assert answered and all(c.at >= reset for c in answered)
    made = [
        datetime.fromisoformat(m["created_at"]).timestamp()
        for m in claude_code.localfly.machines(app_name)
    ]
    assert not [t for t in made if paused_at < t < reset], "no machine while every one rests"
    # It resumed by itself: on a timer set for the reset, which fired, and with no resume sent.
    # (How soon after the reset depends on the machine's load: printed below, not asserted.)
    fired_at = []
    for history in await every_run(claude_code.client, submitted.batch_id):
        events = list(history.events)
        fired = {
            e.timer_fired_event_attributes.started_event_id
            for e in events
            if e.event_type == EventType.EVENT_TYPE_TIMER_FIRED
        }
        assert "resume" not in [
            e.workflow_execution_signaled_event_attributes.signal_name
            for e in events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        ]
        fired_at += [
            e.event_time.ToSeconds()
            + e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds()
            for e in events
            if e.event_id in fired
            and b"resume after the storm pause" in e.user_metadata.summary.data
        ]
    assert fired_at and all(at >= reset - 1 for at in fired_at), (fired_at, reset)
    resumed = min(t for t in made if t >= reset)
    print(f"resumed {resumed - reset:.2f}s after the reset; {len(made)} machines")
