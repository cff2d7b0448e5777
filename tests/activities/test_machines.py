"""The machine activities on their own, against localfly, through Temporal's ActivityEnvironment."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.machine_models import (
    CollectResultInput,
    FinishJobInput,
    WaitMachineInput,
    WaitOutcome,
)
from activities.machines import MachineActivities
from activities.secrets import SecretStore
from fly import FlyClient, FlyNotFound, InitConfig, MachineConfig, RestartConfig
from sortie.models import MachineRef
from sortie.settings import Settings
from sortie.store import report_key
from tests.helpers.waiting import eventually


async def test_a_wait_retried_after_the_deadline_finds_the_job_exited_in_time(
    fly_client: FlyClient, app_name: str, tmp_path: Path
) -> None:
    # finish_job retried after the job's deadline (its collect kept meeting 429s, or a worker
    # died): the machine exited long before, so the job succeeded; it did not time out.
    config = MachineConfig(
        image="alpine", init=InitConfig(exec=["true"]), restart=RestartConfig(policy="no")
    )
    machine = await fly_client.create_machine(app_name, config, name=f"m-{uuid.uuid4().hex[:6]}")

    async def stopped() -> bool:
        return (await fly_client.get_machine(app_name, machine.id)).state == "stopped"

    await eventually(stopped, what="the machine's process exited")
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    past = datetime.now(UTC) - timedelta(seconds=1)
    ref = MachineRef(app=app_name, machine_id=machine.id, name=machine.name or "")
    finished = await ActivityEnvironment().run(activities.finish_job, _finish_input(ref, past))

    assert finished.waited.outcome is WaitOutcome.EXITED
    assert finished.collected is not None and finished.collected.exit_code == 0
    assert finished.destroyed


@pytest.fixture
def forgetful(localfly: Any) -> Iterator[None]:
    """localfly forgets a destroyed machine at once: GET answers 404 right after the destroy."""
    localfly.set_faults({"destroyed_visible_s": 0})
    yield
    localfly.set_faults({})


async def test_a_finish_retried_after_its_own_destroy_knows_the_job_ended(
    fly_client: FlyClient, app_name: str, forgetful: None
) -> None:
    # The worker died just after finish_job destroyed the machine; Fly has forgotten it. The
    # retry must not call the job gone (it would run again): it reads what its attempt learned.
    config = MachineConfig(
        image="alpine", init=InitConfig(exec=["true"]), restart=RestartConfig(policy="no")
    )
    machine = await fly_client.create_machine(app_name, config, name=f"m-{uuid.uuid4().hex[:6]}")
    ref = MachineRef(
        app=app_name,
        machine_id=machine.id,
        name=machine.name or "",
        version=machine.current_version,
    )
    later = datetime.now(UTC) + timedelta(seconds=60)
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    first = await ActivityEnvironment().run(activities.finish_job, _finish_input(ref, later))
    assert first.destroyed
    with pytest.raises(FlyNotFound):
        await fly_client.get_machine(app_name, machine.id)

    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2)
    again = await retry.run(activities.finish_job, _finish_input(ref, later))

    assert again.waited.outcome is WaitOutcome.EXITED, again
    assert again.collected is not None and again.collected.exit_code == 0


async def test_a_prompt_jobs_report_settles_a_machine_fly_forgot(
    fly_client: FlyClient, app_name: str, forgetful: None
) -> None:
    # The machine is gone (404) before anyone read it, but its agent's report reached the store:
    # the job ended, it is not run again on a new machine.
    config = MachineConfig(
        image="alpine", init=InitConfig(exec=["true"]), restart=RestartConfig(policy="no")
    )
    machine = await fly_client.create_machine(app_name, config, name=f"m-{uuid.uuid4().hex[:6]}")
    await fly_client.destroy_machine(app_name, machine.id, force=True)
    report = {"exit_code": 0, "claude": {"result": "done", "session_id": "s", "num_turns": 1}}
    batch = f"b-{uuid.uuid4().hex[:6]}"
    await Settings().blob_store().put(report_key(batch, "j", 1, 1), json.dumps(report).encode())
    ref = MachineRef(app=app_name, machine_id=machine.id, name=machine.name or "")
    later = datetime.now(UTC) + timedelta(seconds=60)
    input = _finish_input(ref, later)
    input.collect = input.collect.model_copy(update={"batch_id": batch, "prompt_job": True})
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    finished = await ActivityEnvironment().run(activities.finish_job, input)

    assert finished.waited.outcome is WaitOutcome.EXITED, finished
    assert finished.collected is not None and finished.collected.exit_code == 0
    assert finished.collected.answer is not None and not finished.collected.answer.is_error


async def test_a_wait_past_the_deadline_on_a_running_machine_is_a_timeout(
    fly_client: FlyClient, app_name: str, tmp_path: Path
) -> None:
    config = MachineConfig(
        image="alpine", init=InitConfig(exec=["sleep", "60"]), restart=RestartConfig(policy="no")
    )
    machine = await fly_client.create_machine(app_name, config, name=f"m-{uuid.uuid4().hex[:6]}")
    activities = MachineActivities(fly_client, SecretStore({}), Settings().blob_store())
    past = datetime.now(UTC) - timedelta(seconds=1)
    ref = MachineRef(app=app_name, machine_id=machine.id, name=machine.name or "")
    try:
        finished = await ActivityEnvironment().run(activities.finish_job, _finish_input(ref, past))
    finally:
        await fly_client.destroy_machine(app_name, machine.id, force=True)

    assert finished.waited.outcome is WaitOutcome.TIMED_OUT and finished.collected is None


def _finish_input(ref: MachineRef, deadline: datetime) -> FinishJobInput:
    """Finish job `j` on `ref`, whose deadline (and boot deadline) is `deadline`."""
    return FinishJobInput(
        wait=WaitMachineInput(machine=ref, job_id="j", deadline=deadline, boot_deadline=deadline),
        collect=CollectResultInput(machine=ref, job_id="j", batch_id="b"),
    )
