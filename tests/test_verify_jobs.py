"""Jobs that check their own work, end to end: verify loops, the change as a patch, a pushed
branch, a budget the loops spend, and their failure among the top causes `status` shows.

Prompt jobs run the agent entrypoint on localfly machines with the stand-in `claude`;
repositories are local git repositories made by the test, the pushed-to origin a bare one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from client import batches
from tests.helpers.batches import git_repo
from tests.helpers.cli import cli, cli_env
from tests.helpers.stack import Sortie
from tests.helpers.waiting import eventually
from tests.test_claude_jobs import prompt_spec, run_batch
from workflows.batch import BatchWorkflow
from workflows.batch_models import CancelRequest, Progress


def git(*args: str, cwd: Path) -> str:
    """Run git with an identity, for test setup and checks."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def git_apply(patch: str, cwd: Path) -> None:
    """Apply a patch to a checkout as a user would, failing the test if git refuses it."""
    subprocess.run(["git", "apply"], input=patch, text=True, cwd=cwd, check=True)


def machines_of(s: Sortie, app: str, job_id: str) -> list[dict[str, Any]]:
    """Every machine localfly made for a job (destroyed ones too)."""
    return [m for m in s.localfly.machines(app) if f"-{job_id}-" in (m.get("name") or "")]


async def test_verify_loops_their_changes_as_a_patch_and_a_pushed_branch(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    repo = git_repo(tmp_path / "repo")
    start = git("rev-parse", "HEAD", cwd=repo)
    origin = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(repo), str(origin), cwd=tmp_path)
    jobs: list[dict[str, Any]] = [
        {
            "id": "notes",
            "prompt": "Write the notes [[write:notes.txt]] [[cost:0.1]]",
            "repos": [str(repo)],
            "verify": "test -f notes.txt",
        },
        {
            "id": "never",
            "prompt": "Make it pass [[cost:0.1]]",
            "repos": [str(repo)],
            "verify": "echo 'still red'; exit 1",
            "max_iterations": 2,
        },
        {
            "id": "pushed",
            "prompt": "Write and push [[write:notes.txt]]",
            "repos": [str(origin)],
            "verify": "test -f notes.txt",
            "push_branch": "sortie/{batch}/{job}",
        },
    ]
    report = await run_batch(sortie, prompt_spec(app_name, jobs))
    notes, never, pushed = report.results

    assert notes.state == "succeeded", notes.error
    assert [i.verify_exit for i in notes.iterations] == [0]
    assert notes.changes is not None and notes.changes.files == 1 and notes.changes.insertions
    assert notes.changes.ref and notes.changes.ref.startswith(f"changes/{report.batch_id}/notes/")

    assert never.state == "failed" and never.error_kind == "verify_failed"
    assert [i.verify_exit for i in never.iterations] == [1, 1]
    assert never.error and never.error.startswith("verify failed: `echo 'still red'; exit 1`")
    assert "still red" in never.error
    assert never.cost_usd == pytest.approx(sum(i.cost_usd for i in never.iterations))
    assert never.iterations[0].cost_usd == 0.1, "every turn's cost counts"
    assert never.num_turns == sum(i.num_turns for i in never.iterations)
    # Claude ran twice, in one session, on one machine.
    assert f"resumed session {never.session_id} (turn 2)" in (never.result or "")
    assert len(machines_of(sortie, app_name, "never")) == 1
    assert never.attempts == 1

    branch = f"sortie/{report.batch_id}/pushed"
    assert pushed.state == "succeeded", pushed.error
    assert pushed.pushed is not None and pushed.pushed.branch == branch
    commit = pushed.pushed.commits["origin"]
    assert git("--git-dir", str(origin), "rev-parse", branch, cwd=tmp_path) == commit
    shown = git("--git-dir", str(origin), "show", "--name-only", "--format=", commit, cwd=tmp_path)
    assert shown.splitlines() == ["notes.txt"]

    # `diff` prints a patch that applies to a fresh clone of the commit the job started from.
    env = cli_env(sortie)
    diff = await cli(["diff", report.batch_id, "notes"], env)
    assert diff.returncode == 0, diff.stderr
    assert "notes.txt" in diff.stdout
    fresh = tmp_path / "fresh"
    git("clone", "-q", str(repo), str(fresh), cwd=tmp_path)
    git("checkout", "-q", start, cwd=fresh)
    git_apply(diff.stdout, fresh)
    assert (fresh / "notes.txt").read_text().startswith("Write the notes")
    out = tmp_path / "never.patch"
    written = await cli(["diff", report.batch_id, "never", "--out", str(out)], env)
    assert written.returncode == 0 and out.read_bytes() == b"", "no change: an empty patch"
    wrong = await cli(["diff", report.batch_id, "notes", "--repo", "elsewhere"], env)
    assert wrong.returncode == 2 and "no repository 'elsewhere'" in wrong.stderr

    # `results` shows the change per job; exports carry it.
    table = await cli(["results", report.batch_id], env)
    assert "CHANGES" in table.stdout and "1 file +1 -0" in table.stdout
    lines = await cli(["results", report.batch_id, "--format", "jsonl"], env)
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert rows[0]["changes"] == notes.changes.model_dump()
    assert rows[1]["iterations"][1]["verify_exit"] == 1
    md = await cli(["results", report.batch_id, "--format", "md"], env)
    assert "| notes | succeeded |" in md.stdout and "| 1 file +1 -0 |" in md.stdout
    one = await cli(["results", report.batch_id, "--job", "never"], env)
    assert "iteration 2: claude exited 0, verify exited 1" in one.stdout
    assert "changes: 0 files +0 -0" in one.stdout
    one = await cli(["results", report.batch_id, "--job", "pushed"], env)
    assert f"pushed: {branch} (origin {commit[:12]})" in one.stdout
    cause = "1 job, verify_failed: verify failed: `echo 'still red'; exit 1` exited 1 after 2"
    assert "## Causes of failure (1)" in md.stdout
    status = await cli(["status", report.batch_id], env)
    assert status.returncode == 0, status.stderr
    assert "top causes of failure:" in status.stdout and cause in status.stdout


async def test_a_budget_the_verify_loops_spend_pauses_the_batch(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    repo = git_repo(tmp_path / "repo")
    # Every turn costs $0.30: the check's output carries the cost marker into the next prompt.
    jobs = [
        {
            "id": f"j{i}",
            "prompt": f"step {i} [[cost:0.3]]",
            "repos": [str(repo)],
            "verify": "echo '[[cost:0.3]]'; exit 1",
            "max_iterations": 2,
        }
        for i in range(4)
    ]
    spec = prompt_spec(app_name, jobs, max_machines=1, max_cost_usd=1.0)
    submitted = await batches.submit(sortie.client, sortie.settings, spec)

    async def paused() -> Progress | None:
        progress = await batches.progress(sortie.client, submitted.batch_id)
        return progress if progress.paused and progress.counts.running == 0 else None

    stopped = await eventually(paused, timeout=90, what="the batch to pause at its budget")
    assert "budget reached" in (stopped.pause_reason or "")
    assert stopped.counts.cost_usd == pytest.approx(1.2), "two jobs of two $0.30 turns each"
    assert stopped.counts.pending == 2
    assert len(sortie.localfly.machines(app_name)) == 2, "no machine past the budget"
    handle = batches.batch_handle(sortie.client, submitted.batch_id)
    await handle.signal(BatchWorkflow.cancel, CancelRequest(reason="seen"))
    await handle.result()
