"""The machine activities' wait step: a machine followed with heartbeats until it ends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.fly_calls import fly_errors, patiently
from activities.machine_models import (
    WaitMachineInput,
    WaitMachineOutput,
    WaitOutcome,
)
from fly import (
    ExitEvent,
    FlyClient,
    FlyNotFound,
    FlyWaitTimeout,
    Machine,
    WaitResult,
)
from sortie.models import MachineRef

SETTLED_STATES = ["stopped", "failed", "destroyed"]


BOOTING_STATES = {"created", "creating", "starting"}


_OUTCOMES = {
    "stopped": WaitOutcome.EXITED,
    "failed": WaitOutcome.FAILED,
    "destroyed": WaitOutcome.GONE,
}


class MachineWait:
    """The wait step: a machine followed until it stops, fails, goes or runs past its deadline."""

    _fly: FlyClient

    async def _wait_unless_shutting_down(
        self, input: WaitMachineInput, seen: dict[str, Any]
    ) -> WaitMachineOutput:
        """Wait for the machine; when the worker shuts down, fail so another worker takes over."""
        waiting = asyncio.create_task(self._wait(input, seen))
        shutdown = asyncio.create_task(activity.wait_for_worker_shutdown())
        try:
            await asyncio.wait({waiting, shutdown}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                raise ApplicationError(
                    "worker shutting down; the wait continues on another worker",
                    type="WorkerShutdown",
                    next_retry_delay=timedelta(milliseconds=200),
                )
            with fly_errors(f"wait for machine {input.machine.machine_id}"):
                return waiting.result()
        finally:
            for task in (waiting, shutdown):
                task.cancel()
            await asyncio.gather(waiting, shutdown, return_exceptions=True)

    async def _wait(self, input: WaitMachineInput, seen: dict[str, Any]) -> WaitMachineOutput:
        """Loop Fly waits of at most 60 s until the machine settles or a deadline passes."""
        ref = input.machine
        booted = False
        while True:
            now = datetime.now(UTC)
            if now >= input.deadline:
                return await self._past_deadline(ref, seen)
            budget = (input.deadline - now).total_seconds()
            if not booted:
                budget = min(budget, max((input.boot_deadline - now).total_seconds(), 1.0))
            try:
                result = await patiently(partial(self._fly_wait, ref, budget))
            except FlyWaitTimeout:
                try:
                    machine = await patiently(
                        lambda: self._fly.get_machine(ref.app, ref.machine_id)
                    )
                except FlyNotFound:
                    return WaitMachineOutput(outcome=WaitOutcome.GONE, state=None)
                seen["state"] = machine.state
                booted = machine.state not in BOOTING_STATES
                if not booted and datetime.now(UTC) >= input.boot_deadline:
                    return WaitMachineOutput(outcome=WaitOutcome.BOOT_TIMEOUT, state=machine.state)
                continue
            except FlyNotFound:
                return WaitMachineOutput(outcome=WaitOutcome.GONE, state=None)
            state = result.state
            if state is None:
                state = (await self._get(ref)).state
            seen["state"] = state
            if state == "destroyed" and await self._exited_by_itself(ref):
                # Destroyed after its process ended, by an earlier try of this activity.
                return WaitMachineOutput(outcome=WaitOutcome.EXITED, state=state)
            return WaitMachineOutput(outcome=_OUTCOMES.get(state, WaitOutcome.EXITED), state=state)

    async def _past_deadline(self, ref: MachineRef, seen: dict[str, Any]) -> WaitMachineOutput:
        """The job's time is up; but a retry may find the machine settled before the deadline.

        A retry of this activity (after a worker crash, or Fly errors while collecting) can
        start after the deadline: the job ran in time then, and must not be called timed out.
        """
        try:
            machine = await self._get(ref)
        except FlyNotFound:
            return WaitMachineOutput(outcome=WaitOutcome.GONE, state=None)
        seen["state"] = machine.state
        exit_event = machine.latest_exit_event()
        stopped_on_request = bool(exit_event and exit_event.requested_stop)
        settled = machine.state in ("stopped", "failed") or (
            machine.state == "destroyed" and _exited_by_itself(exit_event)
        )
        if settled and not stopped_on_request:
            outcome = WaitOutcome.FAILED if machine.state == "failed" else WaitOutcome.EXITED
            return WaitMachineOutput(outcome=outcome, state=machine.state)
        return WaitMachineOutput(outcome=WaitOutcome.TIMED_OUT, state=machine.state)

    async def _exited_by_itself(self, ref: MachineRef) -> bool:
        """Whether the machine's process exited on its own, not stopped by a stop or destroy."""
        try:
            machine = await self._get(ref)
        except FlyNotFound:
            return False
        return _exited_by_itself(machine.latest_exit_event())

    async def _fly_wait(self, ref: MachineRef, timeout: float) -> WaitResult:
        """One Fly wait (at most 60 s) for the machine to settle."""
        return await self._fly.wait_machine(
            ref.app, ref.machine_id, SETTLED_STATES, version=ref.version, timeout=timeout
        )

    async def _get(self, ref: MachineRef) -> Machine:
        """The machine as Fly describes it now."""
        return await patiently(lambda: self._fly.get_machine(ref.app, ref.machine_id))


def _exited_by_itself(exit_event: ExitEvent | None) -> bool:
    """An exit with a code that no stop or destroy request caused: the job's own ending."""
    return bool(exit_event and exit_event.exit_code is not None and not exit_event.requested_stop)
