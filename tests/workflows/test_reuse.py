"""Machines that serve many jobs (`reuse_machines`): each job on a fresh root filesystem, exactly
once, and no machine left behind, whatever happens to its batch.

Machines are counted at localfly (its admin API lists every machine it ever made).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from client import batches
from sortie.labels import META_REUSE
from sortie.models import Tuning
from sortie.spec import BatchSpec, parse_batch
from tests.helpers.batches import finish, start
from tests.helpers.fleet import run_fleet_batch
from tests.helpers.stack import Sortie
from tests.helpers.waiting import eventually
from workflows.batch import BatchWorkflow
from workflows.batch_models import MaxMachinesRequest, PauseRequest

TUNING = Tuning(heartbeat_timeout_s=5, heartbeat_every_s=1, create_timeout_s=10)
CLEAN_ROOT = (
    'left=$(ls -A "$LOCALFLY_ROOT"); if [ -n "$left" ]; then echo "found $left"; exit 9; fi; '
    'echo "$SORTIE_JOB_ID" > "$LOCALFLY_ROOT/left-by-$SORTIE_JOB_ID"; echo "ran $SORTIE_JOB_ID"'
)
"""A job that fails if it finds anything an earlier job left under its machine's root."""


@pytest.fixture(autouse=True)
def no_faults(localfly: Any) -> Iterator[None]:
    localfly.set_faults({})
    yield
    localfly.set_faults({})


def reusing(app: str, jobs: list[dict[str, Any]], **fields: Any) -> BatchSpec:
    defaults = {"image": "alpine", "timeout": "60s", "retries": 1, "log_tail": "always"}
    defaults.update(fields.pop("defaults", {}))
    return parse_batch(
        {
            "name": f"r{uuid.uuid4().hex[:8]}",
            "app": app,
            "reuse_machines": True,
            "defaults": defaults,
            "jobs": jobs,
            **fields,
        }
    )


def clean_root_jobs(count: int, then: str = "") -> list[dict[str, Any]]:
    return [{"id": f"job-{i:03d}", "command": CLEAN_ROOT + then} for i in range(count)]


def live(s: Sortie, app: str) -> list[dict[str, Any]]:
    return [m for m in s.localfly.machines(app) if m["state"] != "destroyed"]


async def test_a_job_never_sees_an_earlier_jobs_files(sortie: Sortie, app_name: str) -> None:
    spec = reusing(app_name, clean_root_jobs(12), max_machines=3, chunk_size=4)
    report = await finish(sortie, await start(sortie, TUNING, spec))

    assert report.succeeded == 12, [(r.job_id, r.error, r.log_tail) for r in report.results]
    for result in report.results:
        assert f"ran {result.job_id}" in "\n".join(result.log_tail)
    made = sortie.localfly.machines(app_name)
    assert len(made) <= 4 and all(m["metadata"][META_REUSE] == "1" for m in made)
    ran_on = {r.machine_id for r in report.results}
    assert ran_on <= {m["id"] for m in made}
    assert sum(r.machine_reused for r in report.results) == 12 - len(made)
    assert not live(sortie, app_name)
    assert report.machines_created == len(made)


def marking(marks: Any, count: int, seconds: float = 0.2) -> list[dict[str, Any]]:
    """Jobs that each add a line to their own file outside any machine: a run leaves one."""
    return [
        {"id": f"job-{i:03d}", "command": f"echo ran >> {marks}/job-{i:03d}; sleep {seconds}"}
        for i in range(count)
    ]


def runs(marks: Any) -> dict[str, int]:
    return {path.name: len(path.read_text().splitlines()) for path in marks.iterdir()}


async def test_a_lost_update_response_runs_no_job_twice(
    sortie: Sortie, app_name: str, tmp_path: Any
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # The update starts the machine (Fly's update launches it unless `skip_launch`): a lost
    # update response is the lost start response; Sortie makes no start call of its own.
    lose = {"kind": "lose_response", "endpoints": ["update"], "count": 2}
    sortie.localfly.set_faults({"http": [lose]})
    spec = reusing(app_name, marking(marks, 8), max_machines=2, chunk_size=4)
    report = await finish(sortie, await start(sortie, TUNING, spec))

    assert report.succeeded == 8, [(r.job_id, r.error) for r in report.results]
    assert runs(marks) == {f"job-{i:03d}": 1 for i in range(8)}
    assert sum(r.machine_reused for r in report.results) >= 4
    # A retry found the machine already serving its job: no second update for it.
    assert sortie.localfly.stats(app_name)["calls"]["update"] == sum(
        r.machine_reused for r in report.results
    )
    assert not live(sortie, app_name)


async def test_a_timed_out_jobs_machine_is_not_reused(sortie: Sortie, app_name: str) -> None:
    jobs = [
        {"id": "slow", "command": "sleep 120", "timeout": "2s"},
        {"id": "after", "command": CLEAN_ROOT},
        {"id": "fails", "command": "exit 3"},
        {"id": "next", "command": CLEAN_ROOT},
    ]
    spec = reusing(app_name, jobs, max_machines=1, chunk_size=4)
    report = await finish(sortie, await start(sortie, TUNING, spec))
    slow, after, fails, following = report.results

    assert (slow.state, after.state, fails.state, following.state) == (
        "timed_out",
        "succeeded",
        "failed",
        "succeeded",
    )
    assert not after.machine_reused and after.machine_id != slow.machine_id
    # A job that exited non-zero on its own ended cleanly: its machine takes the next job.
    assert fails.machine_reused and following.machine_reused
    assert following.machine_id == fails.machine_id == after.machine_id
    assert len(sortie.localfly.machines(app_name)) == 2 and not live(sortie, app_name)


async def test_pause_destroys_idle_machines_after_reuse_idle(sortie: Sortie, app_name: str) -> None:
    spec = reusing(
        app_name, clean_root_jobs(12, "; sleep 1"), max_machines=3, chunk_size=4, reuse_idle="3s"
    )
    batch_id = await start(sortie, TUNING, spec)
    handle = batches.batch_handle(sortie.client, batch_id)
    await eventually(lambda: len(live(sortie, app_name)) == 3, what="three live machines")

    await handle.signal(BatchWorkflow.pause, PauseRequest(reason="lunch"))
    # Jobs under way finish (1 s), then their stopped machines wait 3 s: + 10 s of slack.
    await eventually(lambda: not live(sortie, app_name), timeout=15, what="no machine left")
    await handle.signal(BatchWorkflow.resume)
    report = await finish(sortie, batch_id)

    assert report.succeeded == 12, [(r.job_id, r.error) for r in report.results]
    assert not live(sortie, app_name)


async def test_a_lowered_cap_destroys_idle_machines(sortie: Sortie, app_name: str) -> None:
    spec = reusing(
        app_name, clean_root_jobs(30, "; sleep 1"), max_machines=6, chunk_size=10, reuse_idle="3s"
    )
    batch_id = await start(sortie, TUNING, spec)
    handle = batches.batch_handle(sortie.client, batch_id)
    await eventually(lambda: len(live(sortie, app_name)) == 6, what="six live machines")

    await handle.signal(BatchWorkflow.set_max_machines, MaxMachinesRequest(max_machines=2))
    await eventually(lambda: len(live(sortie, app_name)) <= 2, timeout=13, what="two at most")
    sortie.localfly.reset_stats()
    report = await finish(sortie, batch_id)

    assert report.succeeded == 30, [(r.job_id, r.error) for r in report.results]
    assert sortie.localfly.stats(app_name)["max_live_machines"] <= 2
    assert not live(sortie, app_name)


async def test_machines_are_handed_on_from_chunk_to_chunk_within_the_cap(
    temporal: WorkflowEnvironment,
) -> None:
    """Chunks start as others finish: their machines reach the next ones through the batch,
    across its continue-as-new, and the cap counts stopped machines too."""
    fleet, report, _, _ = await run_fleet_batch(
        temporal, jobs=300, max_machines=7, chunk_size=20, fill_to=7, reuse_machines=True
    )

    assert report.succeeded == 300 and fleet.continued_as_new
    assert fleet.most == 7 and fleet.live == 0
    assert fleet.created + fleet.reused == 300
    assert fleet.created <= 7 * 2, fleet.created


async def test_a_job_that_took_its_slot_keeps_the_waiting_machine_its_slot_holds(
    temporal: WorkflowEnvironment,
) -> None:
    """Two jobs end together with one job left to start: the job started in the slot one of them
    freed takes its waiting machine as it starts. It once found none (the chunk had given both
    back with the one slot it no longer needed) and created a third machine beside the two the
    batch held: one over the cap. Each round's first two jobs end at the same moment."""
    for _ in range(4):
        fleet, report, _, _ = await run_fleet_batch(
            temporal, jobs=3, max_machines=2, chunk_size=3, fill_to=2, reuse_machines=True
        )

        assert report.succeeded == 3
        assert (fleet.most, fleet.created, fleet.reused, fleet.live) == (2, 2, 1, 0)
