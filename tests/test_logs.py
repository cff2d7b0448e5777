"""`starter.py logs ID JOB [--follow]`: a job's machine logs live, then its stored tail."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from client import batches
from sortie.spec import load_batch_file
from tests.helpers.cli import batch_file, cli, cli_env
from tests.helpers.history import decoded_payloads
from tests.helpers.stack import ROOT, Sortie
from tests.helpers.waiting import eventually

SECRET = f"s3cret-{uuid.uuid4().hex}"


async def _lines_until(process: asyncio.subprocess.Process, seen: list[str], want: str) -> None:
    """Read the follower's lines into `seen` until one contains `want`."""
    assert process.stdout is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
        assert line, f"the follower ended before {want!r}: {seen}"
        seen.append(line.rstrip("\n"))
        if want in line:
            return


@pytest.mark.parametrize(
    "worker_env",
    [{"SORTIE_TEST_LOG_SECRET": SECRET, "CLAUDE_CODE_OAUTH_TOKEN": f"sk-ant-oat01-{SECRET}"}],
    indirect=True,
)
async def test_logs_follow_prints_lines_as_they_come_scrubbed_then_the_rest_once(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    env = cli_env(sortie)
    gate = tmp_path / "go"
    script = (
        'echo step-1; echo "token=$SORTIE_TEST_LOG_SECRET"; '
        f"while [ ! -e {gate} ]; do sleep 0.1; done; echo step-2; exit 3"
    )
    jobs: list[dict[str, Any]] = [
        {"id": "cmd", "command": script, "secrets": ["SORTIE_TEST_LOG_SECRET"]},
        # Its tail is kept whole, so its agent's lines show even if it ends before the follower
        # first looks (a loaded machine may take that long to start the follower).
        {
            "id": "ask",
            "prompt": "think [[slow:3]]",
            "image": "registry.fly.io/sortie-agent:latest",
            "log_tail": "always",
        },
    ]
    path = batch_file(tmp_path / "batch.json", app_name, jobs, max_machines=2)
    batch_id = (
        await batches.submit(sortie.client, sortie.settings, load_batch_file(path))
    ).batch_id

    follower = await asyncio.create_subprocess_exec(
        *[sys.executable, "starter.py", "logs", batch_id, "cmd", "--follow"],
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    asker = asyncio.create_task(cli(["logs", batch_id, "ask", "--follow"], env))
    seen: list[str] = []
    try:
        await _lines_until(follower, seen, "token=")
        assert not gate.exists() and follower.returncode is None, "shown while the job runs"
        gate.touch()
        await _lines_until(follower, seen, "== cmd turn 1 ended")
        assert await asyncio.wait_for(follower.wait(), timeout=30) == 0
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    assert follower.stderr is not None
    errors = (await follower.stderr.read()).decode()
    assert "Traceback" not in errors, errors
    assert seen[0].startswith("== cmd turn 1 attempt 1 on machine "), seen
    assert seen[1:] == [
        "step-1",
        "token=[redacted]",
        "step-2",
        "== cmd turn 1 ended failed, exit 3: exited with code 3",
    ], "every line once: the stored tail adds only what was not shown"

    asked = await asker
    assert asked.returncode == 0, asked.stderr
    assert "sortie: job ask: running claude in" in asked.stdout, "the agent's own lines"
    assert "SORTIE/1" not in asked.stdout, "no frames: answers and archives stay out"
    assert asked.stdout.splitlines()[-1] == "== ask turn 1 ended succeeded, exit 0"

    after = await cli(["logs", batch_id, "cmd"], env)
    assert after.returncode == 0, after.stderr
    assert after.stdout.splitlines() == seen[1:], "once it ended: its stored tail"
    assert all(SECRET not in text for text in ("\n".join(seen), asked.stdout, after.stdout))
    # The reads' own histories (the lines travel through them) hold the scrubbed lines only.
    machine = seen[0].rsplit(" ", 1)[1]
    reads: list[str] = []
    query = f'WorkflowId STARTS_WITH "sortie-logs-{machine}-"'
    async for execution in sortie.client.list_workflows(query):
        history = await sortie.client.get_workflow_handle(execution.id).fetch_history()
        reads += decoded_payloads(json.loads(history.to_json()))
    assert any("token=[redacted]" in text for text in reads), "the lines went through history"
    assert all(SECRET not in text for text in reads)
    await eventually(lambda: sortie.localfly.live_machines(app_name) == [], what="no machine")
