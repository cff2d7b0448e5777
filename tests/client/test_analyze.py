"""`starter.py analyze` end to end: a real package's source as a git checkout, reviewed by
parallel prompt jobs on localfly with the stand-in `claude`, findings merged into one report.

The stand-in answers `[[findings]]` prompts with findings about the files the prompt lists plus
one finding every part repeats (the merge must keep it once); a file whose path holds
`[[prose]]` makes its part answer in prose, which must be kept raw while the batch goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import _pytest
import httpx
import pydantic
import pytest
import yaml
from temporalio.testing import WorkflowEnvironment

from client import batches
from client.analysis import batch as analysis
from client.analysis.files import read_checkout
from client.analysis.partition import partition
from sortie.labels import META_ATTEMPT, META_JOB
from tests.helpers.batches import TUNING, settings_for
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import ROOT, Sortie
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


def package_checkout(tmp_path: Path) -> Path:
    """Installed packages' source as a git repository, plus one file that garbles an answer."""
    repo = tmp_path / "checkout"
    for package in (pydantic, _pytest, httpx, yaml):
        shutil.copytree(
            Path(str(package.__file__)).parent,
            repo / package.__name__,
            ignore=shutil.ignore_patterns("*.pyc", "__pycache__"),
        )
    (repo / "README.md").write_text("# pydantic, vendored for a review\n")
    (repo / "notes").mkdir()
    (repo / "notes" / "[[prose]].md").write_text("this part's reviewer answers in prose\n")
    subprocess.run([*GIT, "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*GIT, "add", "."], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "import"], cwd=repo, check=True)
    return repo


def live(localfly: Any, app: str) -> list[dict[str, Any]]:
    return [m for m in localfly.machines(app) if m["state"] != "destroyed"]


async def test_analyze_a_package_checkout_plan_progress_and_merged_report(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    repo = package_checkout(tmp_path)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": sortie.settings.temporal_address,
        "SORTIE_TASK_QUEUE": sortie.settings.task_queue,
        "SORTIE_STATE_DIR": str(sortie.settings.state_dir),
        "FLY_APP": app_name,
    }
    command = [
        sys.executable,
        str(ROOT / "starter.py"),
        "analyze",
        str(repo),
        "--workers",
        "4",
        "--focus",
        "bugs [[findings]]",
        "--watch",
        "--out",
        str(out),
    ]
    # The worker runs in this process: the starter must not block its event loop.
    process = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=300)
    printed = stdout.decode()
    assert process.returncode == 0, printed + stderr.decode()
    checkout = read_checkout(repo)
    parts = partition(checkout.files)
    assert len(checkout.files) > 200 and len(parts) > 10

    assert f"{len(checkout.files)} files to review" in printed
    assert all(part.name in printed for part in parts), "the plan is printed first"
    assert "parts reviewed" in printed and "running" in printed, "progress while it runs"
    document = json.loads((out / "findings.json").read_text())
    summary, findings = document["summary"], document["findings"]
    assert summary["files"] == len(checkout.files) and summary["chunks"] == len(parts)
    shared = [f for f in findings if f["title"] == "Setup steps are out of date"]
    assert len(shared) == 1, "the finding every part made is merged into one"
    garbled = [p.name for p in parts if "notes/[[prose]].md" in p.files]
    assert summary["unparsed_chunks"] == garbled, "parts are named as the plan names them"
    assert summary["chunk_names"] == {analysis.job_id(i, p): p.name for i, p in enumerate(parts)}
    severities = [f["severity"] for f in findings]
    order = ["critical", "high", "medium", "low", "info"]
    assert severities == sorted(severities, key=order.index), "sorted by severity"
    assert len(summary["sessions"]) == len(parts)

    report = (out / "report.md").read_text()
    assert "no JSON from me" in report, "the unparseable answer is kept raw"
    assert all(session in report for session in summary["sessions"].values())
    assert f"python starter.py followup {summary['batch_id']}" in report
    assert live(sortie.localfly, app_name) == []

    # A follow-up works on an analysis job: its session and workspace were kept.
    job, session = next(iter(summary["sessions"].items()))
    workflow_id = await batches.followup(
        sortie.client, sortie.settings, summary["batch_id"], job, "Which finding matters most?"
    )
    turn = (await batches.turn_rows(sortie.client, workflow_id))[0]
    assert turn.state == "succeeded" and turn.session_id == session


async def test_analysis_resumes_after_a_worker_kill_without_rerunning_finished_parts(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    repo = package_checkout(tmp_path)
    checkout = read_checkout(repo)
    parts = partition(checkout.files, "equal", max_files=40)
    spec = analysis.analysis_spec(
        checkout,
        parts,
        repo_url=str(repo),
        focus="[[findings]] [[slow:2]]",
        workers=2,
        app=app_name,
    )
    settings = settings_for(temporal.client.service_client.config.target_host).model_copy(
        update={"state_dir": tmp_path / "state"}
    )
    credential = {"CLAUDE_CODE_OAUTH_TOKEN": f"sk-ant-oat01-{uuid.uuid4().hex}"}
    first = WorkerProcess(settings, localfly.url, tmp_path / "w1.log", env=credential).start()
    second = WorkerProcess(settings, localfly.url, tmp_path / "w2.log", env=credential)
    try:
        submitted = await batches.submit(
            temporal.client,
            settings,
            spec,
            # the killed worker's parts are noticed and run again within seconds
            tuning=TUNING,
            memo=analysis.analysis_memo(checkout, parts, str(repo), "equal", "x"),
        )
        await eventually(
            lambda: _finished_parts(localfly, app_name) >= 2, timeout=120, what="two parts done"
        )
        first.kill()
        finished_before = _finished_parts(localfly, app_name)
        second.start()
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
        result = await analysis.aggregate(temporal.client, settings, submitted.batch_id)
    finally:
        first.stop()
        second.stop()

    assert result.summary.status == "completed" and finished_before >= 2
    assert len(result.summary.sessions) == len(parts)
    made = localfly.machines(app_name)
    per_attempt = Counter((m["metadata"][META_JOB], m["metadata"][META_ATTEMPT]) for m in made)
    assert set(per_attempt.values()) == {1} and len(made) == len(parts), "no part ran twice"
    assert live(localfly, app_name) == []


def _finished_parts(localfly: Any, app: str) -> int:
    return sum(m["state"] == "destroyed" for m in localfly.machines(app))


def _four_part_repo(repo: Path) -> Path:
    """Three directories of two files and a README: four parts of at most two files."""
    for directory in ("api", "db", "web"):
        (repo / directory).mkdir(parents=True)
        for name in ("a.py", "b.py"):
            (repo / directory / name).write_text(f"x = {directory + name!r}\n")
    (repo / "README.md").write_text("# four parts\n")
    subprocess.run([*GIT, "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*GIT, "add", "."], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "first"], cwd=repo, check=True)
    return repo


def _commit_change(repo: Path, path: str) -> None:
    (repo / path).write_text(f"changed = {uuid.uuid4().hex!r}\n")
    subprocess.run([*GIT, "commit", "-q", "-am", f"change {path}"], cwd=repo, check=True)


async def test_analyze_since_reviews_only_changed_parts_and_carries_the_others_over(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    repo = _four_part_repo(tmp_path / "repo")
    focus = "bugs [[findings]]"
    checkout = read_checkout(repo)
    parts = partition(checkout.files, min_files=1, max_files=2)
    assert [p.name for p in parts] == ["api", "db", "web", "(root)"]
    spec = analysis.analysis_spec(
        checkout, parts, repo_url=str(repo), focus=focus, workers=4, app=app_name
    )
    memo = analysis.analysis_memo(checkout, parts, str(repo), "directory", focus)
    first = (await batches.submit(sortie.client, sortie.settings, spec, memo=memo)).batch_id
    await batches.batch_handle(sortie.client, first).result()
    assert len(sortie.localfly.machines(app_name)) == 4

    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": sortie.settings.temporal_address,
        "SORTIE_TASK_QUEUE": sortie.settings.task_queue,
        "SORTIE_STATE_DIR": str(sortie.settings.state_dir),
        "FLY_APP": app_name,
    }

    async def analyze_since(batch_id: str, out: Path) -> tuple[str, dict[str, Any]]:
        command = [sys.executable, str(ROOT / "starter.py"), "analyze", str(repo), "--since"]
        command += [batch_id, "--min-files", "1", "--max-files", "2", "--focus", focus]
        command += ["--watch", "--out", str(out)]
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, stdout.decode() + stderr.decode()
        return stdout.decode(), json.loads((out / "findings.json").read_text())

    _commit_change(repo, "db/a.py")
    printed, document = await analyze_since(first, tmp_path / "out2")
    assert "1 files changed; 1 parts to review again, 3 carried over" in printed, printed
    made = sortie.localfly.machines(app_name)
    assert len(made) == 5 and made[-1]["metadata"][META_JOB] == analysis.job_id(1, parts[1])
    summary, findings = document["summary"], document["findings"]
    second = summary["batch_id"]
    assert summary["since"] == first and summary["chunks"] == 4
    assert set(summary["carried"].values()) == {first} and len(summary["carried"]) == 3
    by_file = {f["file"]: f.get("carried_from") for f in findings if f["file"] != "README.md"}
    assert by_file == {
        **dict.fromkeys(["api/a.py", "api/b.py", "web/a.py", "web/b.py"], first),
        **dict.fromkeys(["db/a.py", "db/b.py"], None),
    }, "the changed part's findings are new, the others' carried over"
    report = (tmp_path / "out2" / "report.md").read_text()
    assert f"| carried over | 3 unchanged parts since `{first}`, not reviewed again |" in report
    assert f"Unvalidated input in api/a.py _(security)_ (carried over from `{first}`)" in report

    # Again on the incremental batch: its carried parts keep pointing at their first review.
    _commit_change(repo, "web/a.py")
    printed, document = await analyze_since(second, tmp_path / "out3")
    assert "1 parts to review again, 3 carried over" in printed, printed
    assert len(sortie.localfly.machines(app_name)) == 6
    carried = document["summary"]["carried"]
    assert carried == {
        analysis.job_id(0, parts[0]): first,
        analysis.job_id(1, parts[1]): second,
        analysis.job_id(3, parts[3]): first,
    }
    third = document["summary"]["batch_id"]
    unchanged = await analysis.plan_since(sortie.client, third, read_checkout(repo), parts, focus)
    assert unchanged.review == [] and unchanged.changed == 0
    refocused = await analysis.plan_since(sortie.client, third, read_checkout(repo), parts, "style")
    assert refocused.review == [0, 1, 2, 3], "another focus reviews everything again"
    assert live(sortie.localfly, app_name) == []
