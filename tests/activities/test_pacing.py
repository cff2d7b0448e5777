"""Creates paced per Fly app for every worker together: any number of workers keep Fly's rate.

Real `worker.py` processes, a plain `temporal server start-dev` (no dynamic config: default
partitions, as Temporal Cloud) and localfly enforcing Fly's published limits (429 past 1
create/s per app with bursts of 3).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from client import batches
from client.stack import MATCHING_CONFIG
from sortie.codec import data_converter
from sortie.labels import BATCH_ID, META_JOB
from sortie.pacing import create_queue
from sortie.settings import Settings
from sortie.spec import parse_batch
from tests.helpers.batches import TUNING, settings_for
from tests.helpers.fleet import Fleet, fleet_spec, fleet_worker
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import TEMPORAL_CLI
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


@pytest.fixture(scope="module")
async def plain() -> AsyncIterator[WorkflowEnvironment]:
    """`temporal server start-dev` as it comes: no dynamic config, four partitions a queue."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_CLI),
        data_converter=data_converter({}),
        search_attributes=[BATCH_ID],
    )
    try:
        yield env
    finally:
        await env.shutdown()


ONE_PARTITION = [
    "--dynamic-config-value",
    "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value",
    "matching.numTaskqueueWritePartitions=1",
]
"""What a self-hosted server gives an app's create queue for exact fairness between batches:
one partition (its dynamic config can scope that to `<queue>.fly.<app>` by name; the dev
server's flag cannot, so this test's server gives it to every queue)."""


@pytest.fixture(scope="module")
async def fair() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server with fairness on and one partition a queue."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_CLI),
        data_converter=data_converter({}),
        search_attributes=[BATCH_ID],
        dev_server_extra_args=[*MATCHING_CONFIG, *ONE_PARTITION],
    )
    try:
        yield env
    finally:
        await env.shutdown()


ONE_APP = f"t-{uuid.uuid4().hex[:10]}"
THREE_APPS = [f"t-{uuid.uuid4().hex[:10]}" for _ in range(3)]


@dataclass
class Fleet2:
    """Two worker processes on one task queue, pacing creates as on real Fly."""

    settings: Settings
    workers: list[WorkerProcess]


@pytest.fixture(scope="module")
def two_workers(
    plain: WorkflowEnvironment, localfly: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet2]:
    """Started once for the module's tests (the client's limits on, as with a Fly token)."""
    settings = settings_for(plain.client.service_client.config.target_host)
    logs = tmp_path_factory.mktemp("workers")
    env = {"SORTIE_FLY_RATE_LIMIT": "on", "SORTIE_FLY_APPS": ",".join([ONE_APP, *THREE_APPS])}
    workers = [
        WorkerProcess(settings, localfly.url, logs / f"worker-{n}.log", env=env) for n in (1, 2)
    ]
    try:
        for worker in workers:
            worker.start()
        yield Fleet2(settings, workers)
    finally:
        for worker in workers:
            worker.stop()


async def test_two_workers_keep_to_one_apps_create_rate(
    plain: WorkflowEnvironment, localfly: Any, two_workers: Fleet2, enforced: None
) -> None:
    temporal = plain
    settings = two_workers.settings
    queue = create_queue(settings.task_queue, ONE_APP)
    await eventually(
        lambda: _at_least(pollers(temporal.client, queue), 2), what="both workers polling"
    )
    spec = parse_batch(
        {
            "name": f"o{uuid.uuid4().hex[:8]}",
            "app": ONE_APP,
            "max_machines": 8,
            "defaults": {"image": "alpine", "command": "true"},
            "jobs": [{"id": f"job-{i}"} for i in range(8)],
        }
    )
    submitted = await batches.submit(temporal.client, settings, spec, tuning=TUNING)
    await batches.batch_handle(temporal.client, submitted.batch_id).result()
    report = await batches.results(temporal.client, submitted.batch_id)
    assert [r.state for r in report.results] == ["succeeded"] * 8, report.results
    made = localfly.machines(ONE_APP)
    assert sorted(m["metadata"][META_JOB] for m in made) == [f"job-{i}" for i in range(8)]
    assert all(m["state"] == "destroyed" for m in made)
    stats = localfly.stats(ONE_APP)
    assert stats["rate_limited"] == 0, stats


async def test_three_apps_share_a_batch_each_at_its_own_rate(
    plain: WorkflowEnvironment, localfly: Any, two_workers: Fleet2, enforced: None
) -> None:
    # Two workers, 60 jobs over three apps, at most 12 machines: creates are what limits the
    # batch, so each app's pacer sets the pace (its bucket: 2 at once, then 1 a second).
    apps, jobs, cap = THREE_APPS, 60, 12
    settings = two_workers.settings
    queues = [create_queue(settings.task_queue, app) for app in apps]
    await eventually(lambda: _all_polled(plain.client, queues, 2), what="both workers polling")
    spec = parse_batch(
        {
            "name": f"a{uuid.uuid4().hex[:8]}",
            "apps": apps,
            "max_machines": cap,
            "defaults": {"image": "alpine", "command": ["sleep", "1"]},
            "jobs": [{"id": f"job-{i}"} for i in range(jobs)],
        }
    )
    submitted = await batches.submit(plain.client, settings, spec, tuning=TUNING)
    await batches.batch_handle(plain.client, submitted.batch_id).result()
    report = await batches.results(plain.client, submitted.batch_id)
    assert report.status == "completed" and report.succeeded == jobs, report
    # Jobs take the apps in turn, and every result names its machine's app.
    assert [r.app for r in report.results] == [apps[i % 3] for i in range(jobs)]
    made = {app: localfly.machines(app) for app in apps}
    every = [m for machines in made.values() for m in machines]
    assert Counter(m["metadata"][META_JOB] for m in every) == dict.fromkeys(
        (f"job-{i}" for i in range(jobs)), 1
    ), "one machine per job"
    assert all(m["state"] == "destroyed" for m in every)
    assert most_at_once(every) <= cap
    # Never faster than Fly allows: not one 429 in any app.
    assert sum(localfly.stats(app)["rate_limited"] for app in apps) == 0
    # And no slower, by the times localfly saw the creates: past Fly's burst of 3, each app
    # kept 1 a second (at least 0.9 of it, for a loaded machine; the bench measures it).
    for app in apps:
        created = sorted(_when(m["created_at"]) for m in made[app])
        assert (len(created) - 3) / (created[-1] - created[0]) >= 0.9, (app, created)
    # Each app's creates overlap the others': three apps create at once, not one after another.
    first = {app: min(m["created_at"] for m in made[app]) for app in apps}
    last = {app: max(m["created_at"] for m in made[app]) for app in apps}
    assert max(first.values()) < min(last.values()), (first, last)


def most_at_once(machines: list[dict[str, Any]]) -> int:
    """The most machines that existed at once, by when localfly created and destroyed each."""
    changes = sorted(
        [(_when(m["created_at"]), 1) for m in machines]
        + [(_when(m["destroyed_at"]), -1) for m in machines]
    )
    live = most = 0
    for _, change in changes:
        live += change
        most = max(most, live)
    return most


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def _all_polled(client: Client, queues: list[str], count: int) -> bool:
    return all([await pollers(client, queue) >= count for queue in queues])


async def _at_least(count: Any, wanted: int) -> bool:
    return bool(await count >= wanted)


async def test_a_small_batch_behind_a_large_one_starts_its_jobs_among_the_large_ones(
    fair: WorkflowEnvironment,
) -> None:
    # One app's create queue, paced, holds a backlog of the large batch's creates when the
    # small batch arrives: fairness by batch gives the small one its turns at once, where first
    # come first served would start its jobs after all thirty. Fairness is the server's
    # (its switch on) and exact on a queue of one partition; with the default four it is kept
    # within each partition only (docs/how-it-runs.md, "Pacing creates").
    temporal = fair
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
    # First come, first served puts them last (30th to 32nd, seen with the fairness key taken
    # out); how many of the large batch's creates go first depends on how fast the small one's
    # check reaches the queue (12 to 15 seen), so the bound is "among": before the last three.
    assert max(smalls) < len(order) - len(smalls), f"the small batch's creates came at {smalls}"
