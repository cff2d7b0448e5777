"""Creates paced by Temporal on a queue per Fly app: any number of workers stay within Fly's rate.

Real `worker.py` processes, a real dev server and localfly enforcing Fly's published limits
(429 past 1 create/s per app with bursts of 3).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from sortie import batches
from sortie.labels import META_JOB
from sortie.pacing import create_queue
from sortie.settings import Settings
from sortie.spec import parse_batch
from tests.helpers.batches import TUNING, check_exactly_once, settings_for, spec_for
from tests.helpers.fleet import Fleet, fleet_spec, fleet_worker
from tests.helpers.processes import WorkerProcess
from tests.helpers.waiting import eventually

ENFORCED = {"rate_limits": {"enforce": True, "retry_after": True}}


@pytest.fixture
def enforced(localfly: Any) -> Iterator[None]:
    """localfly answers 429 as Fly does, for this test only."""
    localfly.set_faults(ENFORCED)
    yield
    localfly.set_faults({})


async def pollers(client: Client, queue: str) -> int:
    """Workers polling the queue for activities right now."""
    described = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        )
    )
    return len({poller.identity for poller in described.pollers})


def paced_workers(
    settings: Any, localfly: Any, tmp_path: Path, apps: list[str]
) -> list[WorkerProcess]:
    """Two workers pacing creates as on real Fly (the client's limits on, as with a token)."""
    env = {"SORTIE_FLY_RATE_LIMIT": "on", "SORTIE_FLY_APPS": ",".join(apps)}
    return [
        WorkerProcess(settings, localfly.url, tmp_path / f"worker-{n}.log", env=env) for n in (1, 2)
    ]


async def test_two_workers_keep_to_one_apps_create_rate(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path, enforced: None
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    workers = paced_workers(settings, localfly, tmp_path, [app_name])
    try:
        for worker in workers:
            worker.start()
        queue = create_queue(settings.task_queue, app_name)
        await eventually(
            lambda: _at_least(pollers(temporal.client, queue), 2), what="both workers polling"
        )
        spec = spec_for(app_name, seconds=0)
        submitted = await batches.submit(temporal.client, settings, spec, tuning=TUNING)
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
        report = await batches.results(
            temporal.client, submitted.batch_id, store=settings.blob_store()
        )
    finally:
        for worker in workers:
            worker.stop()
    check_exactly_once(localfly, app_name, report)
    stats = localfly.stats(app_name)
    assert stats["rate_limited"] == 0, stats


async def test_three_apps_share_a_batch_each_at_its_own_rate(
    temporal: WorkflowEnvironment, localfly: Any, tmp_path: Path, enforced: None
) -> None:
    apps = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    settings = settings_for(temporal.client.service_client.config.target_host)
    workers = paced_workers(settings, localfly, tmp_path, apps)
    spec = parse_batch(
        {
            "name": f"a{uuid.uuid4().hex[:8]}",
            "apps": apps,
            "max_machines": 9,
            "defaults": {"image": "alpine", "command": "true"},
            "jobs": [{"id": f"job-{i}"} for i in range(12)],
        }
    )
    try:
        for worker in workers:
            worker.start()
        submitted = await batches.submit(temporal.client, settings, spec, tuning=TUNING)
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
        report = await batches.results(temporal.client, submitted.batch_id)
    finally:
        for worker in workers:
            worker.stop()
    assert report.status == "completed" and report.succeeded == 12, report
    # Jobs take the apps in turn, and every result names its machine's app.
    assert [r.app for r in report.results] == [apps[i % 3] for i in range(12)]
    made = {app: localfly.machines(app) for app in apps}
    assert {app: len(m) for app, m in made.items()} == dict.fromkeys(apps, 4)
    jobs = Counter(m["metadata"][META_JOB] for machines in made.values() for m in machines)
    assert set(jobs.values()) == {1}, "one machine per job"
    assert all(m["state"] == "destroyed" for machines in made.values() for m in machines)
    assert sum(localfly.stats(app)["rate_limited"] for app in apps) == 0
    # Each app's creates overlap the others': three apps create at once, not one after another.
    first = {app: min(m["created_at"] for m in made[app]) for app in apps}
    last = {app: max(m["created_at"] for m in made[app]) for app in apps}
    assert max(first.values()) < min(last.values()), (first, last)


async def _at_least(count: Any, wanted: int) -> bool:
    return bool(await count >= wanted)


async def test_a_small_batch_behind_a_large_one_starts_its_jobs_among_the_large_ones(
    temporal: WorkflowEnvironment,
) -> None:
    # One app's create queue, paced, holds a backlog of the large batch's creates when the
    # small batch arrives: fairness by batch gives the small one its turns at once, where first
    # come first served would start its jobs after all thirty.
    fleet = Fleet()
    settings = Settings(task_queue=f"fair-{uuid.uuid4().hex}")
    large = fleet_spec([{"id": f"big{i:02d}"} for i in range(30)], max_machines=30, chunk_size=10)
    small = fleet_spec([{"id": f"small{i}"} for i in range(3)], max_machines=3, chunk_size=3)
    async with fleet_worker(temporal, settings, fleet.activities, rate=5.0):
        first = await batches.submit(temporal.client, settings, large)
        await eventually(lambda: fleet.created >= 2, what="the large batch creating")
        second = await batches.submit(temporal.client, settings, small)
        await batches.batch_handle(temporal.client, second.batch_id).result()
        await batches.batch_handle(temporal.client, first.batch_id).result()
    order = fleet.runs
    assert len(order) == 33
    smalls = [order.index(f"small{i}") for i in range(3)]
    assert max(smalls) < 15, f"the small batch's creates came at {smalls} of 33"
