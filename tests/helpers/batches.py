"""Small batches, settings and checks that several end-to-end tests share."""

from __future__ import annotations

import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client import batches
from sortie.labels import META_ATTEMPT, META_JOB
from sortie.models import Tuning
from sortie.settings import Settings
from sortie.spec import BatchSpec, parse_batch
from workflows.batch_models import BatchOutput

if TYPE_CHECKING:
    from tests.helpers.stack import Sortie

TUNING = Tuning(heartbeat_timeout_s=3, heartbeat_every_s=0.5, create_timeout_s=5, call_timeout_s=5)
"""Failures noticed in seconds: a dead worker within 3 s, a stuck create within 5 s."""
JOBS = 8


def spec_for(app: str, seconds: float = 1.0) -> BatchSpec:
    """JOBS command jobs that print `out-<i>` and sleep, four machines, chunks of four."""
    return parse_batch(
        {
            "name": f"c{uuid.uuid4().hex[:8]}",
            "app": app,
            "max_machines": 4,
            "chunk_size": 4,
            "defaults": {"image": "alpine", "timeout": "2m", "retries": 1, "log_tail": "always"},
            "jobs": [
                {"id": f"job-{i}", "command": f"echo out-{i}; sleep {seconds}"} for i in range(JOBS)
            ],
        }
    )


def settings_for(address: str) -> Settings:
    """Settings for a worker process of its own, on a fresh task queue."""
    return Settings(
        temporal_address=address, task_queue=f"crash-{uuid.uuid4().hex}", shutdown_grace_s=2
    )


async def start(s: Sortie, tuning: Tuning, spec: BatchSpec) -> str:
    """Submit a new batch through the client, as the starter does; its id."""
    submitted = await batches.submit(s.client, s.settings, spec, tuning=tuning)
    assert submitted.created
    return submitted.batch_id


async def finish(s: Sortie, batch_id: str) -> batches.BatchReport:
    """Wait for the batch to close; its results, read as `results` reads them."""
    output: BatchOutput = await batches.batch_handle(s.client, batch_id).result()
    assert output.batch_id == batch_id
    return await batches.results(s.client, batch_id, store=s.settings.blob_store())


def check_exactly_once(localfly: Any, app: str, report: batches.BatchReport) -> None:
    """Every job one result and its own output, one machine per attempt, none left alive."""
    assert report.status == "completed"
    assert [r.job_id for r in report.results] == [f"job-{i}" for i in range(JOBS)]
    assert all(r.state == "succeeded" for r in report.results), report.results
    for i, result in enumerate(report.results):
        assert f"out-{i}" in "\n".join(result.log_tail)
    made = localfly.machines(app)
    per_attempt = Counter((m["metadata"][META_JOB], m["metadata"][META_ATTEMPT]) for m in made)
    assert all(count == 1 for count in per_attempt.values()), per_attempt
    assert len(made) == JOBS, "a job ran on more than one machine"
    assert [m["id"] for m in made if m["state"] != "destroyed"] == []


def git_repo(path: Path) -> Path:
    """A local repository with two files, committed."""
    path.mkdir(parents=True)
    (path / "app.py").write_text("print('hello')\n")
    (path / "README.md").write_text("# demo\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=path, check=True)
    subprocess.run([*git, "add", "."], cwd=path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=path, check=True)
    return path
