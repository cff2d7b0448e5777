"""`starter.py results --format json|jsonl|csv|md [--out FILE]`: a batch's results, streamed."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client

from client import batches, export
from client.batches import report as batch_report
from sortie.models import JobResult
from sortie.spec import load_batch_file
from sortie.store import ObjectStore
from tests.helpers.cli import batch_file, cli, cli_env
from tests.helpers.stack import Sortie
from workflows.batch_models import ChunkProgress

JOBS = 12
BAD = {"j03": 3, "j08": 4}
"""Jobs that fail, and their exit codes."""


async def test_results_export_in_every_format_streams_rows_failures_first_in_markdown(
    sortie: Sortie, app_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = cli_env(sortie)
    jobs = [
        {"id": f"j{i:02d}", "command": f"echo boom-{i}; exit {BAD[f'j{i:02d}']}"}
        if f"j{i:02d}" in BAD
        else {"id": f"j{i:02d}", "command": "true"}
        for i in range(JOBS)
    ]
    path = batch_file(tmp_path / "batch.json", app_name, jobs, max_machines=4, chunk_size=2)
    batch_id = (
        await batches.submit(sortie.client, sortie.settings, load_batch_file(path))
    ).batch_id
    output = await batches.batch_handle(sortie.client, batch_id).result()
    assert len(output.chunks) == 6, "several windows of chunks"

    report = tmp_path / "out" / "report.md"
    report.parent.mkdir()
    md = await cli(["results", batch_id, "--out", str(report)], env)
    assert md.returncode == 1, md.stderr  # two jobs failed, as `results` says
    assert md.stdout.splitlines()[-1] == f"wrote {JOBS} jobs of {batch_id} to {report} (md)"
    text = report.read_text()
    ui = sortie.settings.workflow_url(batch_id)
    assert text.startswith(f"# Batch {batch_id}\n\n[{batch_id} in the Temporal Web UI]({ui})")
    assert f"**completed**: {JOBS} jobs, {JOBS - 2} succeeded, 2 failed" in text
    assert "Cost: **$0.0000**" in text
    failures, others = text.split("## Failures (2)")[1].split("## Other jobs")
    assert "| j03 | failed | 3 | 1 |  | exited with code 3 | [" in failures
    assert "| j08 | failed | 4 | 1 |  | exited with code 4 | [" in failures
    assert f"]({ui}-chunk-0001)" in failures, "each failure links to the chunk it ran in"
    assert others.count("| succeeded |") == JOBS - 2 and "j03" not in others

    as_csv = await cli(["results", batch_id, "--format", "csv"], env)
    assert as_csv.returncode == 1, as_csv.stderr
    assert as_csv.stderr.startswith("Web UI: http"), "stdout is the CSV alone"
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["job_id"] for r in rows] == [f"j{i:02d}" for i in range(JOBS)]
    assert {r["job_id"]: r["exit_code"] for r in rows if r["state"] == "failed"} == {
        "j03": "3",
        "j08": "4",
    }

    # In process: JSON is the `results --json` document; JSON lines a row per job; and rows
    # stream: the first is written before the last window of chunks has been read.
    read: list[str] = []
    real = batch_report._chunk_results

    async def counted(
        client: Client, batch_id: str, chunk: ChunkProgress, store: ObjectStore | None
    ) -> list[JobResult]:
        read.append(chunk.workflow_id)
        return await real(client, batch_id, chunk, store)

    monkeypatch.setattr(batch_report, "_chunk_results", counted)
    head = await batches.report_head(sortie.client, batch_id)
    seen: list[int] = []

    async def rows_of() -> AsyncIterator[tuple[str, JobResult]]:
        async for where, row in batches.iter_results(sortie.client, batch_id, window=2):
            seen.append(len(read))
            yield where, row

    out = io.StringIO()
    await export.export(export.Format.JSON, head, rows_of, out, sortie.settings.workflow_url)
    assert seen[0] <= 4, "the first row waits for its window and the one read ahead, no more"
    assert len(read) == 6, "every chunk read once"
    document = json.loads(out.getvalue())
    whole = await batches.results(sortie.client, batch_id)
    assert document == json.loads(whole.model_dump_json())
    out = io.StringIO()
    await export.export(export.Format.JSONL, head, rows_of, out, sortie.settings.workflow_url)
    assert [json.loads(line)["job_id"] for line in out.getvalue().splitlines()] == [
        r.job_id for r in whole.results
    ]
