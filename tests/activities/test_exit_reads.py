"""How a job's machine ended: read from the app's list (one for many jobs) when it shows the
job's own ending, else from Fly's get; against localfly, and a lagging list by hand."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.exit_reads import own_ending
from activities.machine_models import (
    CollectResultInput,
    FinishJobInput,
    FinishJobOutput,
    WaitMachineInput,
    WaitOutcome,
)
from activities.machines import MachineActivities
from activities.secrets import SecretStore
from fly import FlyClient, InitConfig, Machine, MachineConfig, RestartConfig
from sortie.labels import META_MANAGED
from sortie.models import MachineRef
from sortie.settings import Settings

OOM = f"oom-{uuid.uuid4().hex[:6]}"
"""Machines whose name holds this are OOM-killed by localfly as they start."""


@pytest.fixture
def faults(localfly: Any) -> Iterator[Any]:
    """The session's localfly, its faults set back to none after the test."""
    yield localfly
    localfly.set_faults({})


def _config(code: int, *, sortie: bool = True) -> MachineConfig:
    """A machine whose process exits `code`; `sortie`: labelled as Sortie labels its machines
    (a machine without the label is not in Sortie's lists: as if listing missed it)."""
    return MachineConfig(
        image="alpine",
        init=InitConfig(exec=["sh", "-c", f"exit {code}"]),
        restart=RestartConfig(policy="no"),
        metadata={META_MANAGED: "1"} if sortie else {},
    )


async def _create(fly: FlyClient, app: str, config: MachineConfig, name: str = "m") -> MachineRef:
    machine = await fly.create_machine(app, config, name=f"{name}-{uuid.uuid4().hex[:6]}")
    return MachineRef(
        app=app, machine_id=machine.id, name=machine.name or "", version=machine.current_version
    )


async def _finish(
    activities: MachineActivities, ref: MachineRef, *, keep: bool = False
) -> FinishJobOutput:
    """Finish a job on `ref`: wait until its machine stops, read how it ended."""
    later = datetime.now(UTC) + timedelta(seconds=60)
    job = f"j-{uuid.uuid4().hex[:6]}"
    input = FinishJobInput(
        wait=WaitMachineInput(machine=ref, job_id=job, deadline=later, boot_deadline=later),
        collect=CollectResultInput(machine=ref, job_id=job, batch_id=f"b-{uuid.uuid4().hex[:6]}"),
        keep=keep,
    )
    return await ActivityEnvironment().run(activities.finish_job, input)


def _gets(localfly: Any, app: str) -> set[str]:
    """The machines Fly's get was asked about."""
    return {r["path"].rsplit("/", 1)[1] for r in localfly.requests(app) if r["endpoint"] == "get"}


async def test_jobs_read_their_exits_from_the_apps_list_and_an_unlisted_machine_from_a_get(
    fly_client: FlyClient, app_name: str, faults: Any
) -> None:
    faults.set_faults({"machines": [{"kind": "oom", "name_contains": OOM}]})
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    listed = [await _create(fly_client, app_name, _config(code)) for code in (0, 3)]
    oom = await _create(fly_client, app_name, _config(0), name=OOM)
    custom = await _create(fly_client, app_name, _config(7, sortie=False))
    refs = [*listed, oom, custom]

    finished = await asyncio.gather(*(_finish(activities, ref, keep=True) for ref in refs))

    assert all(f.waited.outcome is WaitOutcome.EXITED for f in finished), finished
    ended = [(f.collected.exit_code, f.collected.oom_killed) for f in finished if f.collected]
    assert ended == [(0, False), (3, False), (137, True), (7, False)]
    # Only the machine no list showed was read with a get; the others came from lists.
    assert _gets(faults, app_name) == {custom.machine_id}
    assert faults.stats(app_name)["calls"].get("list", 0) >= 1


async def test_a_failing_list_leaves_each_job_to_flys_get(
    fly_client: FlyClient, app_name: str, faults: Any
) -> None:
    faults.set_faults({"http": [{"kind": "status", "status": 503, "endpoints": ["list"]}]})
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    ref = await _create(fly_client, app_name, _config(4))

    finished = await _finish(activities, ref, keep=True)

    assert finished.collected is not None and finished.collected.exit_code == 4
    assert _gets(faults, app_name) == {ref.machine_id}
    assert faults.stats(app_name)["statuses"].get("503", 0) >= 1


async def test_a_reused_machine_shows_its_new_jobs_exit_never_the_last_ones(
    fly_client: FlyClient, app_name: str, faults: Any
) -> None:
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    first = await _create(fly_client, app_name, _config(3))
    kept = await _finish(activities, first, keep=True)
    assert kept.kept and kept.collected is not None and kept.collected.exit_code == 3

    updated = await fly_client.update_machine(
        app_name, first.machine_id, _config(5), current_version=first.version
    )
    second = first.model_copy(update={"version": updated.current_version})
    finished = await _finish(activities, second, keep=True)

    assert finished.collected is not None and finished.collected.exit_code == 5
    assert _gets(faults, app_name) == set()


async def test_a_batch_that_does_not_reuse_machines_reads_each_exit_with_a_get(
    fly_client: FlyClient, app_name: str, faults: Any
) -> None:
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    refs = [await _create(fly_client, app_name, _config(code)) for code in (0, 3)]

    finished = await asyncio.gather(*(_finish(activities, ref) for ref in refs))

    assert [f.collected.exit_code for f in finished if f.collected] == [0, 3]
    assert _gets(faults, app_name) == {ref.machine_id for ref in refs}
    assert faults.stats(app_name)["calls"].get("list", 0) == 0


def _machine(state: str, version: str, *events: dict[str, Any]) -> Machine:
    """A machine as a list shows it; `events` newest first."""
    stamped = [{**e, "timestamp": 1_000 * (len(events) - i)} for i, e in enumerate(events)]
    return Machine.model_validate(
        {"id": "m1", "state": state, "version": version, "events": stamped}
    )


def _exit(code: int) -> dict[str, Any]:
    return {"type": "exit", "status": "stopped", "request": {"exit_event": {"exit_code": code}}}


UPDATE = {"type": "update", "status": "replacing"}
START = {"type": "start", "status": "started"}


def test_a_lagging_list_never_gives_a_job_another_jobs_ending() -> None:
    # A reused machine's second job runs version v2; its first job exited 3 at version v1.
    ref = MachineRef(app="a", machine_id="m1", name="m", version="v2")
    own = _machine("stopped", "v2", _exit(5), START, UPDATE, _exit(3), START)

    assert own_ending(own, ref) is own
    # Older views a list may show: the first job's ending; the update, not yet started; the
    # second job running; and the machine missing from the list.
    assert own_ending(_machine("stopped", "v1", _exit(3), START), ref) is None
    assert own_ending(_machine("stopped", "v2", UPDATE, _exit(3), START), ref) is None
    assert own_ending(_machine("started", "v2", START, UPDATE, _exit(3)), ref) is None
    assert own_ending(None, ref) is None
    # A machine whose version is not known is never read from a list.
    assert own_ending(own, ref.model_copy(update={"version": None})) is None
