"""How a batch divides its `max_machines` slots among its chunks: every window rule, here.

A slot is held from before a machine is created until it is destroyed, so the cap counts
machines that exist. Each running chunk holds a window of slots:
- a chunk starts with an even share of the cap among the chunks still to finish;
- slots that come free (a chunk finished, or gave back the tail it has no job left for) go to
  a chunk waiting to start while fewer chunks run than could each hold a slot, else to the
  running chunk with the most unfinished jobs per slot, so chunks finish together;
- a lowered cap asks slots back from the newest chunks, which give them back as jobs finish.
"""

from __future__ import annotations

import heapq

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.batch_models import ChunkState


def free_slots(cap: int, running: list[ChunkState]) -> int:
    """Slots no chunk holds (negative after the cap was lowered below what chunks hold)."""
    return cap - sum(chunk.slots for chunk in running)


def may_open(cap: int, running: int, unfinished_chunks: int) -> bool:
    """Whether another chunk may start: fewer run than there are slots and chunks to share."""
    return running < min(cap, unfinished_chunks)


def opening_window(cap: int, unfinished_chunks: int, free: int, size: int) -> int:
    """A starting chunk's window: its even share of the cap, within what is free and its size."""
    share = max(1, cap // max(1, min(cap, unfinished_chunks)))
    return max(0, min(share, free, size))


def take_back(cap: int, running: list[ChunkState]) -> dict[int, int]:
    """Slots to ask back from each chunk, newest first, when chunks hold more than the cap."""
    excess = sum(chunk.slots - chunk.owed for chunk in running) - cap
    asks: dict[int, int] = {}
    for chunk in reversed(running):
        ask = min(excess, chunk.slots - chunk.owed)
        if ask > 0:
            asks[chunk.index] = ask
            excess -= ask
    return asks


def lend(free: int, running: list[ChunkState]) -> dict[int, int]:
    """Give each free slot to the chunk with the most unfinished jobs per slot."""
    given: dict[int, int] = {}
    queue: list[tuple[float, int, ChunkState]] = []
    for chunk in running:
        if chunk.wants_more and not chunk.owed:
            heapq.heappush(queue, (-_rounds_left(chunk, 0), chunk.index, chunk))
    while free > 0 and queue:
        _, index, chunk = heapq.heappop(queue)
        extra = given.get(index, 0)
        if chunk.slots + extra >= _unfinished(chunk):
            continue
        given[index] = extra + 1
        free -= 1
        heapq.heappush(queue, (-_rounds_left(chunk, extra + 1), index, chunk))
    return given


def _unfinished(chunk: ChunkState) -> int:
    """Jobs of the chunk not finished at its last report: the most slots it can use."""
    return chunk.counts.pending + chunk.counts.running


def _rounds_left(chunk: ChunkState, extra: int) -> float:
    """Unfinished jobs per slot: how long the chunk has left to run, in rounds of jobs."""
    slots = chunk.slots + extra
    return _unfinished(chunk) / slots if slots else float("inf")
