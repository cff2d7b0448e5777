"""Reading when a refused credential's usage limit resets from what the CLI printed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.limits import rejected_until, reset_time

NOW = datetime(2026, 12, 7, 16, 28, 47, tzinfo=UTC)
RESET = 1796660954  # 16:29:14 UTC


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_the_cli_s_rate_limit_event_names_the_reset_exactly() -> None:
    # As CLI 2.1.330 printed it for a subscription refused with the unified headers.
    event = {
        "type": "rate_limit_event",
        "rate_limit_info": {"status": "rejected", "resetsAt": RESET, "rateLimitType": "five_hour"},
    }
    assert rejected_until(event) == RESET
    assert (
        reset_time(RESET, {"result": "You've hit your 5-hour limit · resets 4:29pm"}, NOW) == RESET
    )
    warning = {**event, "rate_limit_info": {"status": "allowed_warning", "resetsAt": RESET}}
    assert rejected_until(warning) is None, "a warning refuses nothing"
    assert rejected_until({"type": "result", "rate_limit_info": {"status": "rejected"}}) is None


@pytest.mark.parametrize(
    ("text", "reset"),
    [
        (f"Claude AI usage limit reached|{RESET}", datetime.fromtimestamp(RESET, UTC)),
        # Only the minute is named: the limit counts as reset at the end of it.
        ("You've hit your 5-hour limit · resets 4:29pm (UTC)", at("2026-12-07T16:30:00Z")),
        ("You've hit your limit · resets 3pm (Europe/Paris)", at("2026-12-08T15:01:00+01:00")),
        ("You've hit your limit · resets 11pm (Europe/Paris)", at("2026-12-07T23:01:00+01:00")),
        ("You've hit your weekly limit · resets Dec 9, 3pm (UTC)", at("2026-12-09T15:01:00Z")),
        ("You've hit your limit · resets 9:05am", at("2026-12-08T09:06:00Z")),
        ("You've hit your limit · resets 3pm (Mars/Olympus)", at("2026-12-08T15:01:00Z")),
    ],
)
def test_the_result_text_names_the_reset_when_no_event_did(text: str, reset: datetime) -> None:
    assert reset_time(None, {"result": text}, NOW) == int(reset.timestamp())


@pytest.mark.parametrize(
    "result",
    [
        {"result": "API Error: Request rejected (429) · Rate limited"},
        {"result": "resets 25:99pm"},
        {"result": None},
        None,
    ],
)
def test_nothing_is_read_where_the_cli_named_no_reset(result: dict[str, object] | None) -> None:
    assert reset_time(None, result, NOW) is None
