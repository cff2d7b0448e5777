"""Worker Versioning: a batch finishes on the build it started on, new batches go to the new one.

Two real `worker.py` processes on one task queue, each with its own SORTIE_BUILD_ID of one
SORTIE_DEPLOYMENT, against the session's dev server and localfly. Which build ran what is read
from Temporal: each workflow's versioning info, and in its history the build and the worker
identity (pid@host) of every workflow task and the identity of every activity.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.common import VersioningBehavior
from temporalio.testing import WorkflowEnvironment

from client import batches
from sortie.labels import chunk_workflow_id
from sortie.models import Tuning
from sortie.pacing import create_queue
from sortie.settings import Settings
from sortie.spec import BatchSpec, parse_batch
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import TEMPORAL_CLI
from tests.helpers.waiting import eventually

TUNING = Tuning(heartbeat_timeout_s=5, heartbeat_every_s=1, create_timeout_s=10)
LATE = 20
"""Jobs of the first batch whose chunks start after the switch: enough for the batch to continue
as new (the session's dev server suggests it at 100 events) after the switch too."""


def test_a_version_is_a_deployment_and_a_build_together() -> None:
    assert Settings.from_env({}).deployment_config() is None
    config = Settings.from_env({"SORTIE_DEPLOYMENT": "sortie", "SORTIE_BUILD_ID": "b7"})
    deployment = config.deployment_config()
    assert deployment is not None
    assert deployment.version.to_canonical_string() == "sortie.b7"
    assert deployment.use_worker_versioning
    assert deployment.default_versioning_behavior == VersioningBehavior.PINNED
    with pytest.raises(ValueError, match="together"):
        Settings.from_env({"SORTIE_BUILD_ID": "b7"})


def spec_for(app: str, commands: list[str]) -> BatchSpec:
    """One machine at a time, one job per chunk: chunk n+1 starts when chunk n's job is done."""
    return parse_batch(
        {
            "name": f"v{uuid.uuid4().hex[:8]}",
            "app": app,
            "max_machines": 1,
            "chunk_size": 1,
            "defaults": {"image": "alpine", "timeout": "2m", "retries": 0},
            "jobs": [{"id": f"job-{i}", "command": c} for i, c in enumerate(commands)],
        }
    )


async def set_current(address: str, deployment: str, build_id: str) -> None:
    """`temporal worker deployment set-current-version`, as an operator would run it.

    The server knows a version once one of its workers has polled; until then the command is
    refused, so it is repeated until it succeeds.
    """

    async def attempt() -> bool:
        process = await asyncio.create_subprocess_exec(
            str(TEMPORAL_CLI),
            *("worker", "deployment", "set-current-version", "--yes"),
            *("--address", address, "--deployment-name", deployment, "--build-id", build_id),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await process.wait() == 0

    await eventually(attempt, every=0.3, what=f"{deployment}.{build_id} to become current")


async def routed_to(client: Client, task_queue: str, build_id: str) -> None:
    """Wait until the task queue itself routes new workflows to `build_id`: the deployment's
    current version reaches its queues a moment after the command returns."""

    async def routed() -> bool:
        described = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
        current = described.versioning_info.current_deployment_version
        return bool(current.build_id == build_id)

    await eventually(routed, every=0.2, what=f"{task_queue} to route new workflows to {build_id}")


async def ran_on(client: Client, workflow_id: str) -> tuple[str, set[str]]:
    """The build a workflow is pinned to, and the identities of whoever ran its tasks."""
    handle = client.get_workflow_handle(workflow_id)
    info = (await handle.describe()).raw_description.workflow_execution_info.versioning_info
    assert info.behavior == VersioningBehavior.PINNED.value, workflow_id
    builds: set[str] = set()
    identities: set[str] = set()
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            attributes = event.workflow_task_completed_event_attributes
            builds.add(attributes.deployment_version.build_id)
            identities.add(attributes.identity)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            identities.add(event.activity_task_started_event_attributes.identity)
    assert builds == {info.deployment_version.build_id}, (workflow_id, builds)
    return info.deployment_version.build_id, identities


async def pending(client: Client, batch_id: str) -> str:
    """What the batch's first chunk waits on, and where: said when a wait times out."""
    try:
        described = await client.get_workflow_handle(chunk_workflow_id(batch_id, 0)).describe()
    except Exception as error:  # only a diagnostic: say why there is none
        return f"chunk 0 not described: {error}"
    activities = described.raw_description.pending_activities
    versioning = described.raw_description.workflow_execution_info.versioning_info
    return f"chunk 0 on {versioning.deployment_version}, pending: " + "; ".join(
        f"{a.activity_type.name} attempt {a.attempt} state {a.state}" for a in activities
    )


def identity(worker: WorkerProcess) -> str:
    """The SDK's default identity of the worker process's client."""
    assert worker.process is not None
    return f"{worker.process.pid}@{socket.gethostname()}"


async def test_a_batch_finishes_on_its_build_while_the_next_build_takes_new_batches(
    temporal: WorkflowEnvironment, localfly: Any, tmp_path: Path
) -> None:
    client = temporal.client
    address = client.service_client.config.target_host
    deployment = f"sortie-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        temporal_address=address,
        task_queue=f"versioning-{uuid.uuid4().hex}",
        shutdown_grace_s=1,
        state_dir=tmp_path / "state",
    )

    def worker(build_id: str) -> WorkerProcess:
        env = {"SORTIE_DEPLOYMENT": deployment, "SORTIE_BUILD_ID": build_id}
        return WorkerProcess(settings, localfly.url, tmp_path / f"{build_id}.log", env)

    old, new = worker("build-1"), worker("build-2")
    gate = tmp_path / "switched"
    old_app, new_app = f"t-{uuid.uuid4().hex[:10]}", f"t-{uuid.uuid4().hex[:10]}"
    try:
        old.start()
        await set_current(address, deployment, "build-1")
        await routed_to(client, settings.task_queue, "build-1")
        # The first job holds the batch's only machine until build 2 is current, so every later
        # chunk is started after the switch, as a child of the batch pinned to build 1.
        first = await batches.submit(
            client,
            settings,
            spec_for(old_app, [f"until [ -e {gate} ]; do sleep 0.1; done"] + ["true"] * LATE),
            tuning=TUNING,
        )
        try:
            await eventually(
                lambda: any(m["state"] == "started" for m in localfly.machines(old_app)),
                what="the first batch's first machine running",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}; {await pending(client, first.batch_id)}") from None
        new.start()
        await set_current(address, deployment, "build-2")
        await routed_to(client, settings.task_queue, "build-2")
        switched_at = datetime.now(UTC)
        gate.touch()
        second = await batches.submit(
            client, settings, spec_for(new_app, ["sleep 1", "sleep 1"]), tuning=TUNING
        )
        await asyncio.wait_for(
            asyncio.gather(
                batches.batch_handle(client, first.batch_id).result(),
                batches.batch_handle(client, second.batch_id).result(),
            ),
            timeout=60,
        )
        reports = [await batches.results(client, b.batch_id) for b in (first, second)]
        expected = [("build-1", {identity(old)}), ("build-2", {identity(new)})]
    finally:
        old.stop()
        new.stop()

    # Each build let its batch's creates go only once their app's create queue was in its version.
    for worker_process, app in ((old, old_app), (new, new_app)):
        build = worker_process.env["SORTIE_BUILD_ID"]
        joined = f"{create_queue(settings.task_queue, app)} joined version {deployment}.{build}"
        assert joined in worker_process.log.read_text(), joined
    for report in reports:
        assert report.status == "completed"
        assert {r.state for r in report.results} == {"succeeded"}, report.results
    # The first batch's later chunks and its latest run were started after build 2 became
    # current, and still ran on build 1.
    late = await client.get_workflow_handle(chunk_workflow_id(first.batch_id, 1)).describe()
    assert late.start_time > switched_at
    latest = (await batches.batch_handle(client, first.batch_id).describe()).raw_description
    info = latest.workflow_execution_info
    assert info.first_run_id != info.execution.run_id, "the first batch did not continue as new"
    assert info.start_time.ToDatetime(UTC) > switched_at
    for report, ran in zip(reports, expected, strict=True):
        chunks = [chunk_workflow_id(report.batch_id, i) for i in range(report.total)]
        for workflow_id in [report.batch_id, *chunks]:
            assert await ran_on(client, workflow_id) == ran, workflow_id
