"""Artifacts end to end: files a job names are kept in the store, whatever its outcome, and
`starter.py artifacts` writes them out byte for byte."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from tests.helpers.cli import cli_env, run_cli
from tests.helpers.stack import Sortie


def write_batch(path: Path, app: str, jobs: list[dict[str, Any]], **defaults: Any) -> Path:
    """A batch file of these jobs on the agent image (whose entrypoint collects artifacts)."""
    batch = {"name": "artifacts", "app": app, "defaults": {"retries": 0, **defaults}, "jobs": jobs}
    path.write_text(json.dumps(batch))
    return path


async def cli(args: list[str], env: dict[str, str]) -> Any:
    return await asyncio.to_thread(run_cli, args, env, 300)


async def test_a_jobs_artifacts_come_back_byte_identical_and_are_listed_with_sizes(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    blob = os.urandom(1 << 20)
    (tmp_path / "b.bin").write_bytes(blob)
    command = (
        f"mkdir -p out/deep && echo hello > out/a.txt && cp {tmp_path / 'b.bin'} out/b.bin "
        "&& echo skip > out/deep/c.log && echo not-kept > elsewhere.txt"
    )
    jobs = [{"id": "writer", "command": command, "artifacts": ["out/**"]}]
    batch = write_batch(tmp_path / "batch.json", app_name, jobs, timeout="2m")
    env = cli_env(sortie)
    ran = await cli(["submit", str(batch), "--wait", "--json"], env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads(ran.stdout)
    (row,) = report["results"]
    kept = row["artifacts"]
    assert (kept["count"], kept["bytes"]) == (3, len(blob) + 6 + 5), kept
    assert [f["path"] for f in kept["files"]] == ["out/a.txt", "out/b.bin", "out/deep/c.log"]
    assert not kept["collected_at_timeout"]

    out = tmp_path / "got"
    wrote = await cli(["artifacts", report["batch_id"], "writer", "--out", str(out)], env)
    assert wrote.returncode == 0, wrote.stderr
    assert (out / "out" / "a.txt").read_bytes() == b"hello\n"
    assert (out / "out" / "b.bin").read_bytes() == blob
    assert not (out / "elsewhere.txt").exists()
    assert "out/b.bin  1.0 MB" in wrote.stdout

    shown = await cli(["results", report["batch_id"], "--job", "writer"], env)
    assert "artifacts: 3 files, 1.0 MB" in shown.stdout and "out/b.bin  1.0 MB" in shown.stdout
    table = await cli(["results", report["batch_id"]], env)
    assert "ARTIFACTS" in table.stdout and "3 files, 1.0 MB" in table.stdout
    csv_out = await cli(["results", report["batch_id"], "--format", "csv"], env)
    header, line = csv_out.stdout.splitlines()[:2]
    assert "artifacts,artifacts_bytes" in header and f",3,{len(blob) + 11}," in line


async def test_a_job_that_times_out_keeps_its_artifacts(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    command = "mkdir -p out && echo partial > out/progress.txt && sleep 600"
    jobs = [
        {"id": "slow", "command": command, "artifacts": ["out"], "timeout": "8s"},
        {
            "id": "big",
            "command": "head -c 3000 /dev/zero > a; head -c 10 /dev/zero > b",
            "artifacts": ["a", "b"],
            "artifacts_max": "2kb",
        },
    ]
    batch = write_batch(tmp_path / "batch.json", app_name, jobs)
    env = cli_env(sortie)
    ran = await cli(["submit", str(batch), "--wait", "--json"], env)
    report = json.loads(ran.stdout)
    slow, big = report["results"]
    assert slow["state"] == "timed_out", slow
    assert slow["artifacts"]["collected_at_timeout"] and slow["artifacts"]["count"] == 1
    out = tmp_path / "all"
    wrote = await cli(["artifacts", report["batch_id"], "--out", str(out)], env)
    assert wrote.returncode == 0, wrote.stderr
    assert (out / "slow" / "out" / "progress.txt").read_text() == "partial\n"
    assert big["state"] == "succeeded"
    assert big["artifacts"]["count"] == 1 and big["artifacts"]["left_out_count"] == 1
    assert (out / "big" / "b").read_bytes() == bytes(10) and not (out / "big" / "a").exists()
    assert (
        "left out: 1 files, 2.9 KB" in wrote.stdout and "a  2.9 KB  (artifacts_max)" in wrote.stdout
    )
