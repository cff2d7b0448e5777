"""The machine activities on their own, against localfly, through Temporal's ActivityEnvironment."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.testing import ActivityEnvironment

from activities.machine_models import (
    CollectResultInput,
    FinishJobInput,
    WaitMachineInput,
    WaitOutcome,
)
from activities.machines import MachineActivities
from fly import FlyClient, InitConfig, MachineConfig, RestartConfig
from sortie.models import MachineRef
from sortie.secrets import SecretStore
from sortie.settings import Settings
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
        collect=CollectResultInput(machine=ref, job_id="j"),
    )
