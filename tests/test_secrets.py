"""No secret value reaches workflow history, the Web UI's metadata, the store or the logs.

A batch runs on a worker process whose environment holds known token values (and the object
store's keys); while it runs, the batch's and its chunks' descriptions (pending activities and
their heartbeat details included) are taken; then the history of every run of the batch and every
child, the exported latest history (`temporal workflow
show -o json`, payloads decoded), their descriptions (UI summaries, details, search attributes),
the worker's log, and every object the batch left in the store with its metadata are searched
for those values, and for any presigned URL the worker minted for the machines.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToJson
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from client import batches
from sortie.spec import parse_batch
from tests.helpers.batches import git_repo, settings_for
from tests.helpers.history import decoded_payloads, every_run
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import TEMPORAL_CLI
from tests.helpers.waiting import eventually
from workflows.batch_models import ChunkStatus

pytestmark = pytest.mark.slow

CLAUDE = f"sk-ant-oat01-{uuid.uuid4().hex}{uuid.uuid4().hex}"
CLAUDE_2 = f"sk-ant-api03-{uuid.uuid4().hex}{uuid.uuid4().hex}"
GITHUB = f"ghp_{uuid.uuid4().hex}{uuid.uuid4().hex[:4]}"
STORE_KEY = f"store-secret-{uuid.uuid4().hex}{uuid.uuid4().hex}"
SECRETS = {
    CLAUDE: "CLAUDE_CODE_OAUTH_TOKEN",
    CLAUDE_2: "ANTHROPIC_API_KEY",
    GITHUB: "GITHUB_TOKEN",
    STORE_KEY: "AWS_SECRET_ACCESS_KEY",  # moto takes any key: the worker signs with this one
}
PRESIGNED = ("X-Amz-Signature", "X-Amz-Credential", "Signature=")
"""What any presigned URL carries in its query."""


async def test_no_secret_value_in_history_ui_or_worker_log(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    address = temporal.client.service_client.config.target_host
    settings = settings_for(address).model_copy(update={"state_dir": tmp_path / "state"})
    env = {name: value for value, name in SECRETS.items()}
    worker = WorkerProcess(settings, localfly.url, tmp_path / "worker.log", env=env).start()
    repo = git_repo(tmp_path / "repo")
    origin = tmp_path / "origin.git"  # a pushed branch's origin: a bare repository on disk
    _git("clone", "-q", "--bare", str(repo), str(origin))
    spec = parse_batch(
        {
            "name": f"s{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "max_machines": 4,
            "defaults": {"timeout": "2m", "secrets": ["GITHUB_TOKEN"], "log_tail": "always"},
            "jobs": [
                {
                    "id": "review",
                    "prompt": "Review it [[write:out.txt]]",
                    "repos": [str(repo)],
                    "artifacts": ["out.txt"],
                },
                {"id": "second", "prompt": "And again [[long:5000]]"},
                # Checks its work with the token in its env, and pushes with it.
                {
                    "id": "pushed",
                    "prompt": "Write it [[write:notes.txt]]",
                    "repos": [str(origin)],
                    "verify": "echo token=$GITHUB_TOKEN; test -f notes.txt",
                    "push_branch": "sortie/{batch}/{job}",
                },
                {"id": "refused", "prompt": "Try [[auth]]", "retries": 1},
                # A job that prints its secrets: the log tail must come back scrubbed. It runs
                # long enough to be read while it runs (heartbeats, pending activities).
                # Keeps artifacts: their presigned URLs never reach what it runs, nor history.
                {
                    "id": "leaky",
                    "command": "echo token=$GITHUB_TOKEN | tee t.txt; env | sort; sleep 4",
                    "artifacts": ["*.txt"],
                },
            ],
        }
    )
    running: list[str] = []
    try:
        submitted = await batches.submit(temporal.client, settings, spec)
        await eventually(
            lambda: described_with_heartbeats(temporal.client, submitted.batch_id, running),
            timeout=60,
            what="the running batch's chunks heartbeating",
        )
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
        report = await batches.results(
            temporal.client, submitted.batch_id, store=settings.blob_store()
        )
    finally:
        worker.stop()

    leaky = report.results[4]
    assert leaky.state == "succeeded" and "token=[redacted]" in leaky.log_tail
    assert any(line.startswith("GITHUB_TOKEN=[redacted]") for line in leaky.log_tail)
    assert leaky.artifacts is not None and not leaky.artifacts.count, "t.txt holds the token"
    assert leaky.artifacts.left_out_count == 1
    assert report.results[0].artifacts and report.results[0].artifacts.count == 1
    assert report.results[0].state == "succeeded" and report.results[0].session_id
    pushed = report.results[2]
    assert pushed.state == "succeeded" and pushed.pushed is not None, pushed.error
    assert pushed.changes is not None and pushed.changes.ref
    pushed_history = _git("--git-dir", str(origin), "log", "-p", "--all", "--format=fuller")
    assert "notes.txt" in pushed_history

    progress = await batches.progress(temporal.client, submitted.batch_id)
    ids = [submitted.batch_id, *(chunk.workflow_id for chunk in progress.chunks)]
    exported = [_export(address, workflow_id) for workflow_id in ids]
    exported += [await _every_run(temporal.client, workflow_id) for workflow_id in ids]
    assert all(
        '"WorkflowExecutionStarted"' in e or "WORKFLOW_EXECUTION_STARTED" in e for e in exported
    )
    store = settings.blob_store()
    stored: list[str] = []
    for prefix in ("answers", "logs", "reports", "sessions", "jobs", "changes", "artifacts"):
        async for item in store.objects(f"{prefix}/{submitted.batch_id}"):
            stored.append(f"{item.key} {await store.metadata(item.key)}")
            if not item.key.endswith(".tar.gz"):
                stored.append((await store.get(item.key) or b"").decode())
    assert any(key.startswith("reports/") for key in stored), "the reports came by the store"
    assert any(key.startswith("changes/") for key in stored), "the changes came by the store"
    texts = [
        *running,
        *exported,
        (tmp_path / "worker.log").read_text(),
        report.model_dump_json(),
        *stored,
        pushed_history,
        (origin / "config").read_text(),
    ]
    for value, name in SECRETS.items():
        leaks = [i for i, text in enumerate(texts) if value in text or value[8:40] in text]
        assert not leaks, f"{name} leaked into {leaks}"
    for mark in PRESIGNED:
        leaks = [i for i, text in enumerate(texts) if mark in text]
        assert not leaks, f"a presigned URL leaked into {leaks}"


def _git(*args: str) -> str:
    """Run git; its output."""
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def _export(address: str, workflow_id: str) -> str:
    """History and description as the CLI exports them, every payload decoded alongside."""
    parts = []
    for command in (["show"], ["describe"]):
        out = subprocess.run(
            [
                str(TEMPORAL_CLI),
                "workflow",
                *command,
                "-w",
                workflow_id,
                "-o",
                "json",
                "--address",
                address,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        parts.append(out)
        parts.extend(decoded_payloads(json.loads(out)))
    return "\n".join(parts)


async def described_with_heartbeats(client: Client, batch_id: str, into: list[str]) -> bool:
    """Describe the running batch and its chunks (pending activities, their heartbeats, the Web
    UI's details) into `into`; whether a pending `finish_job` had heartbeat details yet."""
    progress = await batches.progress(client, batch_id)
    beating = False
    chunks = [c.workflow_id for c in progress.chunks if c.status is ChunkStatus.RUNNING]
    for workflow_id in [batch_id, *chunks]:
        described = await client.get_workflow_handle(workflow_id).describe()
        text = MessageToJson(described.raw_description)
        into.append(text)
        into.extend(decoded_payloads(json.loads(text)))
        beating |= any(
            a.activity_type.name == "finish_job" and a.heartbeat_details.payloads
            for a in described.raw_description.pending_activities
        )
    return beating


async def _every_run(client: Client, workflow_id: str) -> str:
    """Every run's history (a batch continues-as-new), payloads decoded alongside."""
    parts = []
    for history in await every_run(client, workflow_id):
        text = history.to_json()
        parts.append(text)
        parts.extend(decoded_payloads(json.loads(text)))
    return "\n".join(parts)
