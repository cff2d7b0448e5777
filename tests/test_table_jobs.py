"""A batch whose jobs come from a table, run end to end: each job gets its own row's values."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.helpers.cli import cli_env, run_cli
from tests.helpers.stack import Sortie


async def test_a_50_row_csv_validates_to_50_jobs_that_each_echo_their_row(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    rows = ["name,word"] + [f"n{i},w{i * 7}" for i in range(50)]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    batch = tmp_path / "batch.yaml"
    batch.write_text(
        f"name: table\napp: {app_name}\nmax_machines: 10\n"
        "defaults: {image: alpine, timeout: 2m, log_tail: always}\n"
        "jobs_from:\n  file: rows.csv\n"
        "  template: {id: 'echo-{name}', command: 'echo row {name} says {word}'}\n"
    )
    env = cli_env(sortie)
    checked = await asyncio.to_thread(run_cli, ["validate", str(batch)], env)
    assert checked.returncode == 0, checked.stderr
    assert "jobs:     50 (50 command, 0 prompt)" in checked.stdout
    ran = await asyncio.to_thread(run_cli, ["submit", str(batch), "--wait", "--json"], env, 300)
    assert ran.returncode == 0, ran.stderr
    results = json.loads(ran.stdout)["results"]
    assert len(results) == 50
    for i, result in enumerate(results):
        assert result["job_id"] == f"echo-n{i}" and result["state"] == "succeeded"
        assert f"row n{i} says w{i * 7}" in result["log_tail"], result
