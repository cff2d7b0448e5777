"""The batch's side of `reuse_machines` beside its story (workflows/batch.py): the grants that
carry waiting machines to chunks, and the destroys of waiting machines no job will take.

A waiting machine holds a slot wherever it is: in a chunk's window, in the batch's pool
(workflows/pool.py: the slots no chunk holds), and while it is destroyed, until it is gone. So
the batch's free slots are the cap, less what chunks hold, less the machines being destroyed;
the pool's machines sit in those free slots and go with them when they are lent. A grant no
chunk heard is taken back, and the machines it carried are destroyed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.machine_models import DestroyMachineInput
    from activities.machines import MachineActivities
    from sortie.models import MachineRef
    from workflows import policies, slots
    from workflows.batch_models import BatchInput, BatchState, ChunkState
    from workflows.chunk import ChunkWorkflow
    from workflows.chunk_models import SlotGrant
    from workflows.messaging import Delivery, deliver
    from workflows.shielded import complete


class Retiring:
    """Grants in flight and destroys of waiting machines; `changed` wakes the batch's story."""

    def __init__(self, input: BatchInput, state: BatchState, changed: Callable[[], None]) -> None:
        self._input, self._state, self._changed = input, state, changed
        self.grants: list[asyncio.Task[Delivery]] = []
        self._destroys: list[asyncio.Task[None]] = []
        self.destroying = 0
        """Machines being destroyed: each holds its slot until it is gone."""

    def free(self) -> int:
        """Slots no chunk holds and no machine being destroyed holds."""
        return slots.free_slots(self._state.max_machines, self._state.running()) - self.destroying

    def grant(self, chunk: ChunkState, grant: SlotGrant) -> None:
        """Send a grant or a take-back without waiting: they add up in any order."""
        self.grants = [g for g in self.grants if not g.done()]
        self.grants.append(asyncio.create_task(self._send(chunk, grant)))

    async def _send(self, chunk: ChunkState, grant: SlotGrant) -> Delivery:
        """Signal the grant; one the chunk never heard is taken back, and the machines it
        carried destroyed (one it heard comes back in a report or in the chunk's result)."""
        handle = workflow.get_external_workflow_handle(chunk.workflow_id)
        delivery = await deliver(handle.signal(ChunkWorkflow.grant, grant))
        if delivery is not Delivery.DELIVERED and (grant.grant or grant.machines):
            chunk.slots -= grant.grant
            self.retire(grant.machines)
            self._changed()
        return delivery

    def retire_unneeded(self) -> None:
        """Destroy waiting machines no job will take: all once the batch is cancelled or no
        chunk waits for slots; past the cap (lowered) the longest-waiting ones."""
        state, running = self._state, self._state.running()
        wanted = not state.cancelled and (bool(state.pending) or any(c.wants_more for c in running))
        held = sum(chunk.slots for chunk in running) + self.destroying
        self.retire(state.pool.unneeded(state.max_machines, held, wanted))

    def expiry(self) -> datetime | None:
        """When the longest-waiting machine has waited `reuse_idle` (None: none waits)."""
        return self._state.pool.next_expiry(self._input.reuse_idle_s or 0.0)

    def retire_expired(self) -> None:
        """Destroy the machines that waited `reuse_idle`."""
        self.retire(self._state.pool.expired(workflow.now(), self._input.reuse_idle_s or 0.0))

    def retire(self, machines: list[MachineRef]) -> None:
        """Destroy these machines beside the story; the run waits for them before it ends."""
        self._destroys = [t for t in self._destroys if not t.done()]
        for machine in machines:
            self.destroying += 1
            self._destroys.append(asyncio.create_task(self._destroy(machine)))

    async def _destroy(self, machine: MachineRef) -> None:
        await complete(
            workflow.execute_activity_method(
                MachineActivities.destroy_machine,
                DestroyMachineInput(machine=machine),
                start_to_close_timeout=timedelta(seconds=self._input.tuning.call_timeout_s),
                retry_policy=policies.DESTROY_RETRY,
                summary=f"destroy idle machine {machine.machine_id}",
            )
        )
        self.destroying -= 1
        self._changed()

    async def quiet(self) -> None:
        """Wait until every grant has landed and every destroy is done (a grant no chunk heard
        starts the destroys of the machines it carried)."""
        while pending := [t for t in (*self.grants, *self._destroys) if not t.done()]:
            await asyncio.gather(*pending)
