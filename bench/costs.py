"""What a bench run cost, in measures that do not depend on how loaded the machine is: CPU
seconds of each process (the worker, the dev server, localfly, the S3 server) and, per job,
the workflow tasks and activities in every batch and chunk history."""

from __future__ import annotations

import os
import resource
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User and system CPU seconds a live process has used (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def own_cpu_s() -> float:
    """This process's CPU seconds, every thread: the in-process worker and the bench."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds of named processes (and of this one, as `worker`) between start and stop."""

    def __init__(self, pids: dict[str, list[int]], in_process: bool) -> None:
        self._pids = pids
        self._in_process = in_process
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        read = {name: sum(cpu_s(p) for p in pids) for name, pids in self._pids.items()}
        if self._in_process:
            read["worker"] = read.get("worker", 0.0) + own_cpu_s()
        return read

    def stop(self) -> dict[str, float]:
        """CPU seconds each used since the meter was made."""
        now = self._read()
        return {name: round(now[name] - self._start.get(name, 0.0), 2) for name in now}


def count_events(events: Iterable[HistoryEvent], activities: Counter[str]) -> int:
    """A history's completed workflow tasks; its scheduled activities are added by type."""
    tasks = 0
    for event in events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            tasks += 1
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            activities[event.activity_task_scheduled_event_attributes.activity_type.name] += 1
    return tasks
