"""Structured logs: one JSON object a line, with the ids it concerns, and no secret value."""

from __future__ import annotations

import io
import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from temporalio.testing import WorkflowEnvironment

from activities.logs import (
    JsonFormatter,
    ScrubFilter,
    configure_logging,
    ids_of,
    log_context,
    scrubber,
    secret_values,
)
from activities.machine_models import DestroyMachineInput, WaitMachineInput
from client import batches
from sortie.models import MachineRef
from sortie.spec import parse_batch
from tests.helpers.batches import settings_for
from tests.helpers.processes import WorkerProcess

TOKEN = f"ghp_{uuid.uuid4().hex}"
KEY = f"k1:{'A' * 43}="


def json_logger(env: dict[str, str]) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter(scrubber(secret_values(env))))
    logger = logging.getLogger(f"test-json-{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_a_line_names_batch_chunk_job_machine_and_attempt() -> None:
    logger, out = json_logger({})
    activity = {
        "activity_type": "finish_job",
        "attempt": 2,
        "workflow_id": "batch-nightly-1a2b3c4d-chunk-0003",
        "workflow_run_id": "run-1",
        "workflow_type": "ChunkWorkflow",
    }
    token = log_context.set({"job_id": "api", "machine_id": "m-1", "attempt": 1})
    try:
        logger.info("job %s\nended", "api", extra={"temporal_activity": activity})
    finally:
        log_context.reset(token)
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "job api\nended" and record["level"] == "info"
    assert (record["batch_id"], record["chunk"]) == ("batch-nightly-1a2b3c4d", 3)
    assert (record["job_id"], record["machine_id"], record["attempt"]) == ("api", "m-1", 1)
    assert (record["activity"], record["activity_attempt"]) == ("finish_job", 2)

    logger.info(
        "batch closing",
        extra={"temporal_workflow": {"workflow_id": "batch-x-1", "workflow_type": "BatchWorkflow"}},
    )
    assert json.loads(out.getvalue().splitlines()[1])["batch_id"] == "batch-x-1"


def test_secret_values_are_scrubbed_from_messages_and_tracebacks() -> None:
    env = {"GITHUB_TOKEN": TOKEN, "SORTIE_ENCRYPTION_KEYS": KEY, "FLY_APP": "visible-app"}
    logger, out = json_logger(env)
    logger.info("cloning with %s for %s", TOKEN, "visible-app")
    try:
        raise RuntimeError(f"refused key {KEY.partition(':')[2]}")
    except RuntimeError:
        logger.exception("failed")
    text = out.getvalue()
    assert TOKEN not in text and KEY.partition(":")[2] not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["message"] == "cloning with [redacted] for visible-app"
    assert "RuntimeError: refused key [redacted]" in second["exception"]


class _Inner(BaseModel):
    machine_id: str


class _Outer(BaseModel):
    job_id: str
    inner: _Inner
    attempt: int = 4


def test_ids_come_from_the_activity_input_at_any_depth() -> None:
    ref = MachineRef(app="a", machine_id="m-9", name="n")
    assert ids_of(DestroyMachineInput(machine=ref)) == {"machine_id": "m-9"}
    wait = WaitMachineInput(
        machine=ref, job_id="j", deadline=datetime.now(UTC), boot_deadline=datetime.now(UTC)
    )
    assert ids_of(wait) == {"job_id": "j", "machine_id": "m-9"}
    outer = _Outer(job_id="j2", inner=_Inner(machine_id="m-2"))
    assert ids_of(outer) == {"job_id": "j2", "attempt": 4, "machine_id": "m-2"}


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="SORTIE_LOG_FORMAT must be text or json"):
        configure_logging({"SORTIE_LOG_FORMAT": "xml"})


@pytest.mark.slow
async def test_a_json_worker_writes_one_object_a_line_with_the_jobs_ids(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    log = tmp_path / "worker.log"
    env = {"SORTIE_LOG_FORMAT": "json", "GITHUB_TOKEN": TOKEN, "SORTIE_REAPER": "off"}
    worker = WorkerProcess(settings, localfly.url, log, env=env).start()
    spec = parse_batch(
        {
            "name": f"l{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "max_machines": 2,
            "defaults": {"image": "alpine", "timeout": "1m", "secrets": ["GITHUB_TOKEN"]},
            # Four jobs on two machines: two machines are created by the finishing jobs' steps.
            "jobs": [{"id": f"job-{i}", "command": "echo $GITHUB_TOKEN"} for i in range(4)],
        }
    )
    try:
        submitted = await batches.submit(temporal.client, settings, spec)
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
    finally:
        worker.stop()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert TOKEN not in log.read_text()
    created = [r for r in records if r["message"].startswith("created machine")]
    assert sorted(r["job_id"] for r in created) == [f"job-{i}" for i in range(4)]
    assert all(r["batch_id"] == submitted.batch_id and r["attempt"] == 1 for r in created)
    assert all(isinstance(r["chunk"], int) for r in created)
    assert all(
        r["message"] == f"created machine {r['machine_id']} for job {r['job_id']}" for r in created
    )
