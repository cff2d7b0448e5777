"""Kill the worker or the server mid-batch: the batch resumes where it stopped.

Each test runs real `worker.py` processes (and, for the server test, a real dev server on a
SQLite file) against a real localfly, kills one at a chosen moment, starts it again, and then
checks, from localfly's own list of every machine it ever made: every job has exactly one
result, no job attempt got two machines, and no machine is left alive.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from client import batches
from client.stack import DevServer
from sortie.spec import parse_batch
from tests.helpers.batches import TUNING, check_exactly_once, settings_for, spec_for
from tests.helpers.processes import WorkerProcess
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.slow


FORGETFUL: dict[str, Any] = {"destroyed_visible_s": 0}
"""localfly forgets a destroyed machine at once (404): no outcome may lean on Fly remembering."""


# Fast failure detection, so a killed worker's activities are retried within seconds.
@pytest.fixture(autouse=True)
def no_faults(localfly: Any) -> Iterator[None]:
    localfly.set_faults(FORGETFUL)
    yield
    localfly.set_faults({})


def calls(localfly: Any, app: str, action: str) -> int:
    return int(localfly.stats(app)["calls"].get(action, 0))


async def kill_and_finish(
    first: WorkerProcess,
    second: WorkerProcess,
    localfly: Any,
    temporal: WorkflowEnvironment,
    batch_id: str,
) -> batches.BatchReport:
    """SIGKILL the first worker, start the second (Fly forgetting destroyed machines at once),
    and read the batch's results once it closes."""
    first.kill()
    localfly.set_faults(FORGETFUL)
    second.start()
    await batches.batch_handle(temporal.client, batch_id).result()
    return await batches.results(temporal.client, batch_id, store=second.settings.blob_store())


@pytest.mark.parametrize(
    ("moment", "fault_endpoint"),
    [
        ("creating", "create"),
        ("waiting", None),
        ("collecting", "logs"),
        ("destroying", "destroy"),
    ],
)
async def test_worker_killed_mid_batch_resumes_exactly_once(
    temporal: WorkflowEnvironment,
    localfly: Any,
    app_name: str,
    tmp_path: Path,
    moment: str,
    fault_endpoint: str | None,
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    first = WorkerProcess(settings, localfly.url, tmp_path / "worker-1.log").start()
    second = WorkerProcess(settings, localfly.url, tmp_path / "worker-2.log")
    try:
        if fault_endpoint:
            # Creates and destroys are answered late: done at Fly, unheard when the worker dies.
            kind = "slow" if fault_endpoint == "logs" else "slow_response"
            localfly.set_faults(
                FORGETFUL
                | {"http": [{"kind": kind, "delay_ms": 1500, "endpoints": [fault_endpoint]}]}
            )
        spec = spec_for(app_name)
        submitted = await batches.submit(temporal.client, settings, spec, tuning=TUNING)
        if fault_endpoint:
            await eventually(
                lambda: calls(localfly, app_name, fault_endpoint) >= 1,
                what=f"a {fault_endpoint} call in flight",
            )
        else:
            await eventually(
                lambda: sum(m["state"] == "started" for m in localfly.machines(app_name)) >= 4,
                what="four running machines",
            )
        report = await kill_and_finish(first, second, localfly, temporal, submitted.batch_id)
    finally:
        first.stop()
        second.stop()
    check_exactly_once(localfly, app_name, report)


async def test_worker_stopped_with_sigterm_hands_over_its_waits(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    first = WorkerProcess(settings, localfly.url, tmp_path / "worker-1.log").start()
    second = WorkerProcess(settings, localfly.url, tmp_path / "worker-2.log")
    try:
        submitted = await batches.submit(
            temporal.client, settings, spec_for(app_name, seconds=4), tuning=TUNING
        )
        await eventually(
            lambda: sum(m["state"] == "started" for m in localfly.machines(app_name)) >= 4,
            what="four running machines",
        )
        running_before = {m["id"] for m in localfly.machines(app_name)}
        assert first.terminate() == 0
        assert "handing running waits over" in (tmp_path / "worker-1.log").read_text()
        second.start()
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
        report = await batches.results(
            temporal.client, submitted.batch_id, store=settings.blob_store()
        )
    finally:
        first.stop()
        second.stop()
    check_exactly_once(localfly, app_name, report)
    # The machines that were running when the first worker stopped finished their jobs: the
    # second worker waited on them instead of making new ones.
    finished_on = {r.machine_id for r in report.results}
    assert running_before <= finished_on


async def test_server_killed_mid_batch_resumes_on_the_same_database(
    localfly: Any, app_name: str, tmp_path: Path
) -> None:
    server = DevServer(tmp_path / "temporal.db", tmp_path / "server.log").start()
    settings = settings_for(server.address)
    worker = WorkerProcess(settings, localfly.url, tmp_path / "worker.log").start()
    try:
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        submitted = await batches.submit(
            client, settings, spec_for(app_name, seconds=2), tuning=TUNING
        )
        await eventually(
            lambda: sum(m["state"] == "started" for m in localfly.machines(app_name)) >= 4,
            what="four running machines",
        )
        server.kill()
        server.start()
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        await batches.batch_handle(client, submitted.batch_id).result()
        report = await batches.results(client, submitted.batch_id, store=settings.blob_store())
    finally:
        worker.stop()
        server.stop()
    check_exactly_once(localfly, app_name, report)
    # The kill lost nothing although the server writes through SQLite's write-ahead log.
    with contextlib.closing(sqlite3.connect(tmp_path / "temporal.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("moment", ["updating", "waiting"])
async def test_worker_killed_mid_batch_with_reuse_runs_each_job_once_and_leaves_nothing(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path, moment: str
) -> None:
    """`reuse_machines`: the machines the chunks and the batch hold outlive the worker."""
    settings = settings_for(temporal.client.service_client.config.target_host)
    first = WorkerProcess(settings, localfly.url, tmp_path / "worker-1.log").start()
    second = WorkerProcess(settings, localfly.url, tmp_path / "worker-2.log")
    marks = tmp_path / "marks"
    marks.mkdir()
    plain = spec_for(app_name)
    spec = parse_batch(
        {
            "name": plain.name,
            "app": app_name,
            "max_machines": plain.max_machines,
            "chunk_size": plain.chunk_size,
            "reuse_machines": True,
            "defaults": plain.defaults.model_dump(mode="json", exclude_none=True),
            "jobs": [  # each run leaves a line outside every machine
                {
                    "id": job.id,
                    "command": f"echo ran >> {marks}/{job.id}; {(job.command or [])[-1]}",
                }
                for job in plain.jobs
            ],
        }
    )
    try:
        if moment == "updating":  # an update done at Fly, unheard when the worker dies
            slow = {"kind": "slow_response", "delay_ms": 1500, "endpoints": ["update"]}
            localfly.set_faults(FORGETFUL | {"http": [slow]})
        submitted = await batches.submit(temporal.client, settings, spec, tuning=TUNING)
        await eventually(
            lambda: calls(localfly, app_name, "update") >= 1, what="a machine taking a 2nd job"
        )
        report = await kill_and_finish(first, second, localfly, temporal, submitted.batch_id)
    finally:
        first.stop()
        second.stop()
    assert report.status == "completed" and report.succeeded == len(spec.jobs)
    for i, result in enumerate(report.results):
        assert f"out-{i}" in "\n".join(result.log_tail)
    assert {p.name: len(p.read_text().splitlines()) for p in marks.iterdir()} == {
        job.id: 1 for job in spec.jobs
    }
    made = localfly.machines(app_name)
    assert len(made) < len(spec.jobs) and any(r.machine_reused for r in report.results)
    assert [m["id"] for m in made if m["state"] != "destroyed"] == []
