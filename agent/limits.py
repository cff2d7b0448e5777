"""When a refused credential's usage limit resets, from what the Claude CLI printed.

The report carries the answer as epoch seconds, a time and nothing else: the worker rests the
credential until then. In order of trust:
- the CLI's `rate_limit_event` (stream-json) with `status: rejected` names `resetsAt` exactly;
  CLI 2.1.330 prints it when the API refuses a subscription (OAuth) credential with
  `anthropic-ratelimit-unified-status: rejected` and `anthropic-ratelimit-unified-reset`;
- older CLIs end their result text with `Claude AI usage limit reached|<epoch>`;
- the result text `… · resets 4:29pm (UTC)` or `resets Dec 9, 3pm (Europe/Paris)` names the
  minute only: the limit counts as reset at the end of that minute.
An API key refused with 429 gets none of these from the CLI (it does not pass the API's
`anthropic-ratelimit-*-reset` headers on): the worker rests it for its fixed span.
Standard library only, like the rest of the entrypoint.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_EPOCH = re.compile(r"usage limit reached\|(\d{9,11})", re.IGNORECASE)
_CLOCK = re.compile(
    r"resets (?:at )?(?:(?P<month>[A-Z][a-z]{2}) (?P<day>\d{1,2}),? (?:at )?)?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s?(?P<half>am|pm)(?: \((?P<zone>[^)]+)\))?",
    re.IGNORECASE,
)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


def rejected_until(event: dict[str, Any]) -> int | None:
    """The reset a `rate_limit_event` names, when it says the credential was refused."""
    info = event.get("rate_limit_info")
    if event.get("type") != "rate_limit_event" or not isinstance(info, dict):
        return None
    resets = info.get("resetsAt")
    if info.get("status") != "rejected" or isinstance(resets, bool):
        return None
    return int(resets) if isinstance(resets, int | float) and resets > 0 else None


def reset_time(event_reset: int | None, result: dict[str, Any] | None, now: datetime) -> int | None:
    """Epoch seconds when the refused credential's limit resets, or None when the CLI said not."""
    if event_reset is not None:
        return event_reset
    text = result.get("result") if isinstance(result, dict) else None
    if not isinstance(text, str):
        return None
    if match := _EPOCH.search(text):
        return int(match.group(1))
    if match := _CLOCK.search(text):
        return _next_clock(match, now)
    return None


def _next_clock(match: re.Match[str], now: datetime) -> int | None:
    """The end of the named minute, at its next occurrence from `now` in the named zone."""
    zone: tzinfo = UTC
    if match.group("zone"):
        try:
            zone = ZoneInfo(match.group("zone").strip())
        except (ZoneInfoNotFoundError, ValueError):
            zone = UTC
    hour = int(match.group("hour")) % 12 + (12 if match.group("half").lower() == "pm" else 0)
    minute = int(match.group("minute") or 0)
    if hour > 23 or minute > 59:
        return None
    local = now.astimezone(zone)
    try:
        moment = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if match.group("month"):
            month = _MONTHS.index(match.group("month").lower()[:3]) + 1
            moment = moment.replace(month=month, day=int(match.group("day")))
            if moment + timedelta(minutes=1) <= local:
                moment = moment.replace(year=moment.year + 1)
    except ValueError:
        return None
    while moment + timedelta(minutes=1) <= local:
        moment += timedelta(days=1)
    return int((moment + timedelta(minutes=1)).timestamp())
