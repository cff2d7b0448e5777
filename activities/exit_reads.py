"""How machines that just stopped ended, read for many jobs at once: one list call per app.

A job's verdict needs its process's exit (code, signal, OOM kill), and Fly's wait answers with
the state alone: each job cost a get after its wait. Fly's list of an app's machines carries each
machine's events as its get does (only `summary` drops them), so here the jobs of one app whose
waits ended within the same second share one list call, at most one a second per app and
worker (Fly's rate for list). A machine's ending is taken from a list only when it is that job's
own: the machine stopped at the version the job was given (its create or update), with an exit
since that update. A list that lags, fails, is refused (429) or shows anything else leaves the
job to Fly's get, as before; so does a job whose machine's version is not known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fly import FlyClient, FlyError, Machine
from sortie.labels import META_MANAGED
from sortie.models import MachineRef

LIST_EVERY_S = 1.0
"""The least time between two list calls of one app from one worker: Fly's rate for list (one
a second per app, bursts of 3: the burst is left to creates' look-ups and the reaper)."""

LIST_MOST_S = 10.0
"""How long the jobs waiting for a list wait for it before each asks Fly's get instead."""

logger = logging.getLogger(__name__)


@dataclass
class _AppReads:
    """One app's jobs waiting for the next list, and the task that makes it."""

    waiting: list[tuple[MachineRef, asyncio.Future[Machine | None]]] = field(default_factory=list)
    lister: asyncio.Task[None] | None = None
    next_at: float = 0.0


class ExitReads:
    """Reads of machines that just stopped, shared by the jobs of one app within one worker."""

    def __init__(self, fly: FlyClient, *, every: float = LIST_EVERY_S) -> None:
        self._fly = fly
        self._every = every
        self._apps: dict[str, _AppReads] = {}

    async def read(self, ref: MachineRef) -> Machine | None:
        """The machine as the app's next list shows it, if that shows this job's own ending;
        None: ask Fly's get."""
        if ref.version is None:  # nothing to tell this job's ending from an earlier one's
            return None
        app = self._apps.setdefault(ref.app, _AppReads())
        future: asyncio.Future[Machine | None] = asyncio.get_running_loop().create_future()
        app.waiting.append((ref, future))
        if app.lister is None or app.lister.done():
            app.lister = asyncio.create_task(self._list_while_asked(ref.app, app))
        return await future

    async def _list_while_asked(self, name: str, app: _AppReads) -> None:
        """List the app, once for everyone waiting, until nobody waits; whatever goes wrong,
        every job waiting hears None (it asks Fly's get)."""
        taken: list[tuple[MachineRef, asyncio.Future[Machine | None]]] = []
        try:
            while app.waiting:
                await asyncio.sleep(max(0.0, app.next_at - time.monotonic()))
                taken, app.waiting = app.waiting, []
                app.next_at = time.monotonic() + self._every
                listed = await self._listed(name, app)
                for ref, future in taken:
                    if not future.done():
                        future.set_result(own_ending(listed.get(ref.machine_id), ref))
                taken = []
        finally:
            for _, future in [*taken, *app.waiting]:
                if not future.done():
                    future.set_result(None)
            app.waiting = []

    async def _listed(self, name: str, app: _AppReads) -> dict[str, Machine]:
        """The app's stopped Sortie machines by id; none when the list fails (a 429 also puts
        the next list off for as long as Fly asked)."""
        try:
            async with asyncio.timeout(LIST_MOST_S):
                machines = await self._fly.list_machines(
                    name, metadata={META_MANAGED: "1"}, states=["stopped"]
                )
        except TimeoutError:
            logger.info(
                "listing %s took over %g s, its jobs' machines are read one by one",
                name,
                LIST_MOST_S,
            )
            return {}
        except FlyError as error:
            logger.info(
                "listing %s failed, its jobs' machines are read one by one: %s", name, error
            )
            if error.retry_after:
                app.next_at = max(app.next_at, time.monotonic() + error.retry_after)
            return {}
        return {machine.id: machine for machine in machines}


def own_ending(machine: Machine | None, ref: MachineRef) -> Machine | None:
    """The listed machine, if it shows the ending of the job `ref` was given: stopped at the
    job's version, with an exit since the version's update (a list may lag: an older view of a
    reused machine shows its previous job's version, or the update as its newest event)."""
    if ref.version is None or machine is None:
        return None
    if machine.state != "stopped" or machine.current_version != ref.version:
        return None
    return machine if machine.latest_exit_event() is not None else None
