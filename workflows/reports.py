"""How a chunk reports to its batch: numbered reports by signal, never waited for on the way.

A chunk reports at once when the batch must act on it (slots it asked back, a job to judge),
and otherwise at its own times every `report_every_s`, with the slots it has no more use for:
the batch sets that period and staggers the chunks' times (`report_phase_s`), so all its chunks
together send it REPORTS_PER_S reports a second at most, however many started at once. A turn
the chunk gets to long after it passed (its worker or the server stalled) is missed: that report
waits for the chunk's next turn (once), so a stall does not bring every report due meanwhile
together. Its end is no report: the batch hears it as the chunk's result. A report the
batch's run refused (it took all the signals the server allows one run) is sent again later,
and the next run hears it: `seq` keeps the newest counts, and what a report gives back adds
up in any order. A batch that is gone (terminated) cannot be told anything: the chunk stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from sortie.models import Counts, MachineRef
    from workflows.chunk_models import ChunkReport
    from workflows.messaging import Delivery, deliver

REPORTS_PER_S = 2.0
"""Progress reports a batch takes from all its chunks together, per second at most, by their
turns. Every report takes the batch's lock on the server; at about 20 a second a dev server
throttled the batch as a busy workflow (BusyWorkflow), its chunk starts waited 10 s each in the
server's queue and the batch never got to continue-as-new (docs/benchmarks.md, 20,000 jobs).
Temporal's guidance for one workflow is about 5 signals a second; at 4 a second, 100 chunks'
reports reached the batch up to 2.5 times as fast in its busiest 10 s (delayed by a busy worker,
they land together), so 2 leaves that room. With 10 chunks or fewer the 5 s floor decides."""
REPORT_EVERY_S = 5.0
"""A chunk's progress reaches its batch at most this late when few chunks run."""
MISSED_S = 10.0
"""A turn the chunk gets to more than this late is missed: the report goes at its next turn."""
EPOCH = datetime.fromtimestamp(0, UTC)


def report_every(max_machines: int, chunks: int) -> float:
    """Seconds between a chunk's progress reports: the chunks that may run at once share
    REPORTS_PER_S between them."""
    return max(REPORT_EVERY_S, min(max_machines, chunks) / REPORTS_PER_S)


def report_phase(index: int, max_machines: int, chunks: int) -> float:
    """When in each period chunk `index` reports: chunks that may run at once take turns
    1 / REPORTS_PER_S apart, so chunks started together do not report together."""
    at_once = max(1, min(max_machines, chunks))
    return (index % at_once) * report_every(max_machines, chunks) / at_once


def next_turn(after: datetime, phase: timedelta, every: timedelta) -> datetime:
    """A chunk's first turn to report after `after`: its phase in a period."""
    since = (after - EPOCH - phase) // every + 1
    return EPOCH + phase + since * every


def missed(turn: datetime, now: datetime) -> bool:
    """Whether a chunk got to its turn so late that reporting now would crowd the batch: its
    worker or the server stalled, and other chunks' reports due meanwhile come at once too."""
    return now - turn > timedelta(seconds=MISSED_S)


class Reporter:
    """A chunk's reports to its batch: `now` asks the chunk for its counts, whether it wants
    more slots, and the slots (and stopped machines) it gives back; `gone` stops the chunk
    when the batch is gone."""

    def __init__(
        self,
        index: int,
        every_s: float,
        phase_s: float,
        now: Callable[[], tuple[Counts, bool, int, list[MachineRef]]],
        gone: Callable[[str], None],
    ) -> None:
        self._index, self._every = index, timedelta(seconds=every_s)
        self._now, self._gone = now, gone
        self._seq = 0
        self._last = workflow.now()
        """The next turn is the first after this: the last report, or a turn missed."""
        self._phase = timedelta(seconds=phase_s % every_s)
        self._sends: list[asyncio.Task[None]] = []
        self._due: asyncio.Task[None] | None = None
        self._unreported = False
        self._closed = False
        self.errors: dict[str, int] = {}
        """Attempts that ended with a storm error since the last report, by kind."""
        self.resting_until: datetime | None = None
        """The earliest end of a credential rest a job met since the last report."""

    def rested(self, until: datetime | None) -> None:
        """A job found every credential resting until `until`: the next report says so."""
        if until is not None and (self.resting_until is None or until < self.resting_until):
            self.resting_until = until

    def send(self) -> int | None:
        """Tell the batch how far the chunk is, without waiting for delivery; the report's
        number, or None when there is no batch to tell (a follow-up turn runs alone) or the
        chunk's reports are closed (what it gives back then travels in its result)."""
        self._unreported = False
        parent = workflow.info().parent
        if parent is None or self._closed:
            return None
        self._last = workflow.now()
        self._seq += 1
        counts, wants_more, released, machines = self._now()
        report = ChunkReport(
            index=self._index,
            seq=self._seq,
            released=released,
            machines=machines,
            wants_more=wants_more,
            counts=counts,
            errors=self.errors,
            resting_until=self.resting_until,
        )
        self.errors, self.resting_until = {}, None
        self._sends.append(asyncio.create_task(self._deliver(parent.workflow_id, report)))
        return report.seq

    def soon(self) -> None:
        """Report at this chunk's next time, so progress reaches the batch at most
        `report_every_s` (and one turn) late, even when no slot frees."""
        self._unreported = True
        if self._due is None or self._due.done():
            self._due = asyncio.create_task(self._send_when_due())

    async def close(self) -> None:
        """Wait until every report sent has arrived, and send no more: the chunk's result, its
        end, comes after them, and gives back what a grant brings later (the slots, the
        machines), so the batch never frees a slot whose machine is still on its way."""
        if self._due is not None:
            self._due.cancel()
        await asyncio.gather(*self._sends)
        self._closed = True
        await asyncio.gather(*self._sends)  # sent while the first ones travelled

    async def _send_when_due(self) -> None:
        """Report at this chunk's next turn; a turn missed waits for the next one, once."""
        missed_once = False
        while self._unreported:
            turn, now = next_turn(self._last, self._phase, self._every), workflow.now()
            if turn > now:
                await workflow.sleep(turn - now, summary="report progress to the batch")
            elif missed(turn, now) and not missed_once:
                missed_once, self._last = True, now
            else:
                self.send()

    async def _deliver(self, batch_id: str, report: ChunkReport) -> None:
        """Signal the batch until it hears the report, or stop the chunk if it is gone."""
        batch = workflow.get_external_workflow_handle(batch_id)
        while (delivery := await deliver(batch.signal("chunk_report", report))) is Delivery.REFUSED:
            await workflow.sleep(
                self._every, summary="the batch took no more signals: tell it again"
            )
        if delivery is Delivery.GONE:
            self._gone("the batch is no longer running")
