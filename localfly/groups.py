"""A machine's processes: one process group each, measured and signalled as one."""

from __future__ import annotations

import contextlib
import os

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_by_group(groups: set[int]) -> dict[int, int]:
    """Resident bytes of every process in `groups`, summed by process group (from /proc)."""
    sizes: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        group, pages = int(fields[2]), int(fields[21])
        if group in groups:
            sizes[group] = sizes.get(group, 0) + pages * PAGE
    return sizes


def kill_group(pid: int, signum: int) -> None:
    """Signal a machine's whole process group (its children too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
