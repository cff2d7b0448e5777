"""Fly's formats as localfly writes and reads them: ULIDs, RFC 3339 times, Go durations."""

from __future__ import annotations

import contextlib
import secrets
import time
from datetime import UTC, datetime

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    """A 26-character ULID: 48 bits of milliseconds, 80 random bits."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    return "".join(CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def rfc3339(moment: float, precise: bool = False) -> str:
    """Fly's timestamps: RFC 3339 in UTC, whole seconds (or microseconds when precise)."""
    text = datetime.fromtimestamp(moment, UTC).isoformat(
        timespec="microseconds" if precise else "seconds"
    )
    return text.replace("+00:00", "Z")


def parse_duration(value: object, default: float) -> float:
    """A stop timeout: a Go duration string ("10s", "500ms") or nanoseconds as a number."""
    if value is None or value == "":
        return default
    if isinstance(value, int | float):
        return float(value) / 1e9
    text = str(value).strip()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            with contextlib.suppress(ValueError):
                return float(text[: -len(unit)]) * units[unit]
    try:
        return float(text) / 1e9
    except ValueError:
        return default
