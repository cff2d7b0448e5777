"""`starter.py retry` and `results --latest`: run again only what did not succeed, end to end.

Each command line run costs a second or more of interpreter start on a loaded machine, so the
commands whose output is the point run as processes, and the rest through `client.batches`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from temporalio.service import RPCError

from client import batches
from sortie.labels import META_BATCH, META_JOB
from sortie.models import JobState
from sortie.spec import load_batch_file
from tests.helpers.cli import batch_file, cli, cli_env
from tests.helpers.stack import Sortie

FAILING = {f"j{i:02d}" for i in range(0, 50, 5)}
FAILED = {JobState.FAILED}


async def test_retry_failed_runs_exactly_the_failed_jobs_and_latest_shows_every_job(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    env = cli_env(sortie)
    marks = tmp_path / "marks"
    marks.mkdir()
    gate = tmp_path / "go"

    def command(job: str) -> str:
        if job in FAILING:  # fails the first time it runs, succeeds the next
            return f"test -e {marks}/{job} || {{ touch {marks}/{job}; echo first-{job}; exit 1; }}"
        if job == "j01":  # holds the batch open until the test lets it go
            return f"while [ ! -e {gate} ]; do sleep 0.1; done"
        return "true"

    jobs = [{"id": f"j{i:02d}", "command": command(f"j{i:02d}")} for i in range(50)]
    spec = load_batch_file(batch_file(tmp_path / "batch.json", app_name, jobs, max_machines=25))
    batch_id = (await batches.submit(sortie.client, sortie.settings, spec)).batch_id

    still_open = await cli(["retry", batch_id, "--failed"], env)
    assert still_open.returncode == 2, still_open.stderr
    assert f"cannot retry: batch {batch_id} is still running" in still_open.stderr
    assert "Traceback" not in still_open.stderr
    gate.touch()
    own = await batches.batch_handle(sortie.client, batch_id).result()
    assert (own.succeeded, own.failed) == (40, 10)
    assert len(sortie.localfly.machines(app_name)) == 50

    for states, ids, said in [
        ({JobState.TIMED_OUT}, None, f"batch {batch_id} has no timed_out jobs"),
        (FAILED, ["j01", "nope"], f"batch {batch_id} has no job 'nope'"),
    ]:
        with pytest.raises(batches.RetryRefused, match=re.escape(said)):
            await batches.retry(
                sortie.client, sortie.settings, batch_id, states=states, job_ids=ids
            )
    with pytest.raises(RPCError, match="not found"):
        await batches.retry(sortie.client, sortie.settings, "batch-none", states=FAILED)
    assert len(sortie.localfly.machines(app_name)) == 50, "nothing started for bad input"

    retried = await cli(["retry", batch_id, "--failed", "--wait"], env)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    head = re.fullmatch(
        rf"retrying 10 jobs of {batch_id} as ({batch_id}-retry-[0-9a-f]{{8}})",
        retried.stdout.splitlines()[0],
    )
    assert head, retried.stdout
    retry_id = head.group(1)
    made = sortie.localfly.machines(app_name)
    again = [m["metadata"][META_JOB] for m in made if m["metadata"][META_BATCH] == retry_id]
    assert sorted(again) == sorted(FAILING), "exactly the failed jobs, a new machine each"
    assert len(made) == 60 and all(m["state"] == "destroyed" for m in made)

    twice = await batches.retry(sortie.client, sortie.settings, batch_id, states=FAILED)
    assert (twice.batch_id, twice.created, twice.status) == (retry_id, False, "completed")
    assert len(sortie.localfly.machines(app_name)) == 60, "retrying twice runs nothing twice"

    latest = await cli(["results", batch_id, "--latest", "--json"], env)
    assert latest.returncode == 0, latest.stderr
    document = json.loads(latest.stdout)
    assert [r["job_id"] for r in document["results"]] == [f"j{i:02d}" for i in range(50)]
    assert {r["state"] for r in document["results"]} == {"succeeded"}
    assert (document["total"], document["succeeded"], document["failed"]) == (50, 50, 0)
    assert document["latest_from"] == dict.fromkeys(sorted(FAILING), retry_id)

    status = await cli(["status", batch_id], env)
    assert f"retried by {retry_id} (completed): http" in status.stdout, status.stdout
    assert await batches.retry_of(sortie.client, retry_id) == batch_id
    memo = await (await sortie.client.get_workflow_handle(retry_id).describe()).memo()
    assert (memo[batches.RETRY_OF], memo[batches.RETRY_ROOT]) == (batch_id, batch_id)


@pytest.mark.parametrize(
    ("limit", "error_kind"),
    [
        ({"prompt": "Refactor it all [[max-turns]]", "max_turns": 3}, "max_turns"),
        ({"prompt": "Refactor it all [[cost:0.2]]", "max_cost_usd": 0.05}, "budget"),
    ],
    ids=["max-turns", "budget"],
)
async def test_retry_continue_sessions_goes_on_with_the_session_that_ran_out_of_turns(
    sortie: Sortie, app_name: str, tmp_path: Path, limit: dict[str, Any], error_kind: str
) -> None:
    # Out of turns, or stopped by its own --max-budget-usd: the session continues on retry.
    env = cli_env(sortie)
    jobs = [{"id": "long", **limit}]
    path = batch_file(
        tmp_path / "prompts.json",
        app_name,
        jobs,
        keep_sessions="1h",
        defaults={"timeout": "2m", "retries": 0},
    )
    batch_id = (
        await batches.submit(sortie.client, sortie.settings, load_batch_file(path))
    ).batch_id
    await batches.batch_handle(sortie.client, batch_id).result()
    [first] = (await batches.results(sortie.client, batch_id)).results
    assert (first.state, first.error_kind) == ("failed", error_kind) and first.session_id

    retried = await cli(["retry", batch_id, "--continue-sessions", "--wait", "--json"], env)
    assert retried.returncode == 0, retried.stderr
    assert "1 continuing their session" in retried.stderr
    [turn] = json.loads(retried.stdout)["results"]
    assert (turn["state"], turn["turn"], turn["session_id"]) == ("succeeded", 2, first.session_id)
    assert f"resumed session {first.session_id} (turn 2)" in turn["result"]
    assert batches.DEFAULT_CONTINUE_PROMPT in turn["result"], "the continuing prompt was sent"

    assert first.archive_ref
    await sortie.settings.blob_store().delete(first.archive_ref)
    with pytest.raises(batches.RetryRefused, match="sessions of long are no longer kept"):
        await batches.retry(
            sortie.client, sortie.settings, batch_id, states=FAILED, continue_prompt="go on"
        )


async def test_retry_logs_and_export_usage_errors_exit_2_without_a_server() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "SORTIE_"))}
    env["TEMPORAL_ADDRESS"] = "127.0.0.1:1"  # nothing listens: none of these may need it
    cases = [
        (["retry"], "usage: starter.py retry"),
        (["logs", "batch-x"], "usage: starter.py logs"),
        (["results", "batch-x", "--out", "r.txt"], "--out r.txt: name the format with --format"),
        (["results", "batch-x", "--format", "csv", "--job", "a"], "--format writes a whole batch"),
    ]
    ran = await asyncio.gather(*(cli(args, env) for args, _ in cases))
    for (args, said), done in zip(cases, ran, strict=True):
        assert done.returncode == 2, (args, done.stderr)
        assert said in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
