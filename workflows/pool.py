"""Stopped machines waiting for their next job (`reuse_machines`): who holds them, and when they go.

A machine that ended its job cleanly stays stopped (no CPU, no RAM billed) and takes a later job
of its batch in the same Fly app: its chunk keeps it with the slot it holds, and hands it to the
batch with the slot when it gives the slot back; the batch lends it on with the slot, or to a
chunk it starts. Every holder keeps its machines in a Pool, in its workflow state (the batch's
across continue-as-new), so they survive worker and server restarts. A machine holds a slot
while it waits: the cap counts stopped machines too. A machine waits `reuse_idle` at most (a
paused chunk's, the batch's), and the batch destroys what the cap no longer allows, what no job
will take, and everything at its end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sortie.models import MachineRef, StrictModel
    from workflows.shielded import complete


class IdleMachine(StrictModel):
    """A stopped machine and since when it waits."""

    machine: MachineRef
    since: datetime


class Pool(StrictModel):
    """Stopped machines that ended their last job cleanly, oldest first."""

    idle: list[IdleMachine] = []

    def __len__(self) -> int:
        return len(self.idle)

    def put(self, machines: list[MachineRef], now: datetime) -> None:
        """Machines that wait from `now` on."""
        self.idle += [IdleMachine(machine=m, since=now) for m in machines]

    def take(self, app: str | None = None) -> MachineRef | None:
        """The newest machine of `app` (of any app when None), or None."""
        for index in range(len(self.idle) - 1, -1, -1):
            if app is None or self.idle[index].machine.app == app:
                return self.idle.pop(index).machine
        return None

    def take_many(self, count: int) -> list[MachineRef]:
        """Up to `count` machines, newest first."""
        taken = [m.machine for m in self.idle[::-1][: max(count, 0)]]
        del self.idle[len(self.idle) - len(taken) :]
        return taken

    def oldest(self, count: int) -> list[MachineRef]:
        """Take the `count` machines that have waited longest."""
        taken = [m.machine for m in self.idle[: max(count, 0)]]
        del self.idle[: len(taken)]
        return taken

    def expired(self, now: datetime, idle_s: float) -> list[MachineRef]:
        """Take the machines that have waited `idle_s` or longer."""
        limit = now - timedelta(seconds=idle_s)
        gone = [m.machine for m in self.idle if m.since <= limit]
        self.idle = [m for m in self.idle if m.since > limit]
        return gone

    def next_expiry(self, idle_s: float) -> datetime | None:
        """When the longest-waiting machine has waited `idle_s`, or None when none waits."""
        return self.idle[0].since + timedelta(seconds=idle_s) if self.idle else None

    def unneeded(self, cap: int, held: int, wanted: bool) -> list[MachineRef]:
        """Take the machines no job will take: all when no chunk wants slots (`wanted`), else
        the longest-waiting ones past the cap, counting the slots `held` elsewhere (lent to
        chunks, or held by machines being destroyed)."""
        return self.oldest(held + len(self.idle) - cap) if wanted else self.drain()

    def drain(self) -> list[MachineRef]:
        """Take every machine."""
        return self.oldest(len(self.idle))


async def retire_idle(
    pool: Pool,
    idle_s: float | None,
    paused: Callable[[], bool | None],
    destroy: Callable[[list[MachineRef]], Awaitable[None]],
) -> None:
    """While `paused()` (a chunk's pause), destroy the machines that waited `idle_s` (a chunk
    that reuses no machine has none); return once it says None (the chunk closes)."""
    wait_s = idle_s or 0.0
    while True:
        await workflow.wait_condition(lambda: paused() is None or bool(paused() and pool))
        if paused() is None:
            return
        expiry = pool.next_expiry(wait_s) or workflow.now()
        try:
            await workflow.wait_condition(
                lambda: not paused() or not pool,
                timeout=max(expiry - workflow.now(), timedelta(0)),
                timeout_summary="destroy machines idle while paused",
            )
        except TimeoutError:
            await complete(destroy(pool.expired(workflow.now(), wait_s)))
