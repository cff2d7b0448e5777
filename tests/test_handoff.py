"""Handoff and a prompt job's artifacts with the real Claude Code CLI against the fake API: the
job's repository with its change and its session come back to this machine, and the real CLI
resumes that session there."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from client import batches
from client.handoff import project_dir
from sortie.claude import CLI_ENV
from sortie.spec import parse_batch
from tests.helpers.batches import git_repo
from tests.helpers.cli import cli_env, run_cli
from tests.helpers.stack import CLAUDE_CODE_BIN, Sortie


async def test_handoff_of_a_prompt_job_that_wrote_a_file_resumes_with_the_real_cli(
    claude_code: Sortie, app_name: str, tmp_path: Path
) -> None:
    assert claude_code.api is not None
    repo = git_repo(tmp_path / "repo")
    marker = uuid.uuid4().hex
    write = "mkdir -p out && echo handed-off > notes.txt && echo kept > out/report.txt"
    job: dict[str, Any] = {
        "id": "writer",
        "prompt": f"Take notes {marker} [[bash:{write}]]",
        "repos": [str(repo)],
        "artifacts": ["out/*.txt"],
        "allowed_tools": ["Bash"],
    }
    spec = parse_batch(
        {
            "name": f"ho{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "keep_sessions": "1h",
            "defaults": {"timeout": "3m", "retries": 0},
            "jobs": [job],
        }
    )
    submitted = await batches.submit(claude_code.client, claude_code.settings, spec)
    await batches.batch_handle(claude_code.client, submitted.batch_id).result()
    report = await batches.results(
        claude_code.client, submitted.batch_id, store=claude_code.settings.blob_store()
    )
    [row] = report.results
    assert row.state == "succeeded", row.error
    assert row.session_id and row.changes is not None and row.changes.files == 2
    assert row.artifacts is not None and [f.path for f in row.artifacts.files] == ["out/report.txt"]

    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(claude_code, HOME=str(home))
    env.pop("CLAUDE_CONFIG_DIR", None)
    where = tmp_path / "handoff"
    ran = await asyncio.to_thread(
        run_cli, ["handoff", submitted.batch_id, "writer", "--dir", str(where)], env
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    checkout = where / "repo"
    assert (checkout / "notes.txt").read_text() == "handed-off\n"
    assert (checkout / "app.py").exists()
    head = await asyncio.to_thread(
        subprocess.run,
        ["git", "rev-parse", "HEAD"],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
    )
    assert head.stdout.strip() == row.commits[str(repo)]
    session = project_dir(checkout.resolve(), {"HOME": str(home)}) / f"{row.session_id}.jsonl"
    assert session.is_file() and row.session_id in session.read_text()
    command = ran.stdout.strip().splitlines()[-1]
    assert command == f"cd {checkout} && claude --resume {row.session_id}"

    again = await asyncio.to_thread(
        run_cli, ["handoff", submitted.batch_id, "writer", "--dir", str(where)], env
    )
    assert again.returncode == 2 and "is not empty" in again.stderr

    # The real CLI, here, finds the session by its id and goes on with it.
    resumed = await asyncio.to_thread(
        subprocess.run,
        [
            str(CLAUDE_CODE_BIN / "claude"),
            "--resume",
            row.session_id,
            "-p",
            "And now?",
            "--output-format",
            "json",
        ],
        cwd=checkout,
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "ANTHROPIC_API_KEY": f"sk-ant-api03-test-{uuid.uuid4().hex}",
            "ANTHROPIC_BASE_URL": claude_code.api.base_url(),
            **CLI_ENV,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    answer = json.loads(resumed.stdout)
    assert answer["session_id"] == row.session_id and not answer["is_error"], answer
    [call] = claude_code.api.calls_to(marker="And now?")[-1:]
    assert marker in call.text, "the resumed request carries the job's conversation"
