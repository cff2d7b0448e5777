"""The error table: what the real CLI (2.1.330) printed against Anthropic's error answers, and
the verdicts it gets; the bounds a prompt job's CLI gets by default."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from sortie.claude import CLI_ENV, AgentReport, CliResult, ErrorKind, classify
from workflows.guards import is_storm

GATEWAY = "127.0.0.1:34121"
REAL = [
    # (subtype, api_error_status, result) as `claude -p --output-format json` reported them.
    (
        "success",
        429,
        "API Error: Request rejected (429) · This request would exceed the rate limit for your "
        "organization of 50 requests per minute",
        ErrorKind.RATE_LIMIT,
    ),
    (
        "success",
        529,
        "API Error: Repeated 529 Overloaded errors. The API is at capacity — this is usually "
        f"temporary. Try again in a moment. If it persists, check your inference gateway "
        f"({GATEWAY}).",
        ErrorKind.OVERLOADED,
    ),
    (
        "success",
        503,
        "API Error: Repeated 529 Overloaded errors. The API is at capacity — this is usually "
        f"temporary. Try again in a moment. If it persists, check your inference gateway "
        f"({GATEWAY}).",
        ErrorKind.OVERLOADED,
    ),
    ("success", 429, "You've hit your 5-hour limit · resets 4:29pm (UTC)", ErrorKind.RATE_LIMIT),
    ("success", 401, "Invalid API key · Fix external API key", ErrorKind.AUTH),
    ("success", 403, "Credit balance is too low", ErrorKind.AUTH),
    (
        "success",
        400,
        "API Error: 400 messages: text content blocks must be non-empty",
        ErrorKind.INVALID_REQUEST,
    ),
    ("error_max_turns", None, "", ErrorKind.MAX_TURNS),
    ("error_max_budget_usd", None, "", ErrorKind.BUDGET),
    ("error_during_execution", None, "An error occurred while executing", ErrorKind.OTHER),
]
WORDS_ONLY = [
    # Without a status (older CLIs, the stand-in): the words decide.
    ('API Error: 429 {"type":"error","error":{"type":"rate_limit_error"}}', ErrorKind.RATE_LIMIT),
    ("Claude AI usage limit reached|1796660954", ErrorKind.RATE_LIMIT),
    ("You've hit your 5-hour limit · resets 3pm (Europe/Paris)", ErrorKind.RATE_LIMIT),
    ("Invalid API key · Please run /login", ErrorKind.AUTH),
    ("OAuth token has expired. Please obtain a new token or refresh", ErrorKind.AUTH),
    ("API Error: Repeated 529 Overloaded errors", ErrorKind.OVERLOADED),
    ("API Error: 400 invalid_request_error", ErrorKind.INVALID_REQUEST),
    ("Exceeded USD budget (1)", ErrorKind.BUDGET),
    ("Request timed out.", ErrorKind.OTHER),
]


@pytest.mark.parametrize(("subtype", "status", "text", "kind"), REAL)
def test_the_cli_s_real_reports_get_their_kind(
    subtype: str, status: int | None, text: str, kind: ErrorKind
) -> None:
    report = AgentReport(
        exit_code=1,
        claude=CliResult(
            type="result", subtype=subtype, is_error=True, api_error_status=status, result=text
        ),
    )
    assert report.error_kind() is kind


@pytest.mark.parametrize(("text", "kind"), WORDS_ONLY)
def test_without_a_status_the_words_decide(text: str, kind: ErrorKind) -> None:
    assert classify("success", None, text) is kind


def test_which_kinds_are_storms_and_which_blame_the_credential() -> None:
    storms = {kind for kind in ErrorKind if is_storm(kind.value)}
    assert storms == {
        ErrorKind.RATE_LIMIT,
        ErrorKind.OVERLOADED,
        ErrorKind.AUTH,
        ErrorKind.CREDENTIALS_RESTING,
    }
    assert {kind for kind in ErrorKind if kind.credential_fault} == {
        ErrorKind.RATE_LIMIT,
        ErrorKind.AUTH,
    }


def test_a_stall_a_missing_result_and_a_schema_miss() -> None:
    assert AgentReport(exit_code=143, stalled=True).error_kind() is ErrorKind.STALLED
    assert AgentReport(exit_code=0).error_kind() is ErrorKind.NO_REPORT
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fits = AgentReport(exit_code=0, claude=CliResult(structured_output={"n": 1}))
    assert fits.error_kind() is None and fits.structured_problem(schema) is None
    wrong = AgentReport(exit_code=0, claude=CliResult(structured_output={"n": "one"}))
    assert "at n: 'one' is not of type 'integer'" in (wrong.structured_problem(schema) or "")
    missing = AgentReport(exit_code=0, claude=CliResult(result="prose"))
    assert "no structured output" in (missing.structured_problem(schema) or "")


def test_the_cli_gets_bounded_retries_by_default() -> None:
    retries = int(CLI_ENV["CLAUDE_CODE_MAX_RETRIES"])
    assert 1 <= retries <= 4, "a burst is ridden out, a refusal comes back within seconds"
    assert CLI_ENV["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert json.dumps(CLI_ENV)  # plain strings: a machine's environment


@pytest.mark.parametrize(
    ("given", "read"),
    [
        (1796660954, datetime(2026, 12, 7, 16, 29, 14, tzinfo=UTC)),
        ("2026-12-07T16:29:14Z", datetime(2026, 12, 7, 16, 29, 14, tzinfo=UTC)),
        ("sk-ant-oat01-not-a-time", None),
        ({"value": 3}, None),
    ],
)
def test_a_reports_reset_is_a_time_or_nothing(given: object, read: datetime | None) -> None:
    # Whatever the machine sends, only a time reaches history: anything else is dropped and
    # the report is still read.
    payload = {"exit_code": 1, "claude": {"is_error": True, "result": "x"}, "resets_at": given}
    report = AgentReport.parse(json.dumps(payload).encode())
    assert report.error is None and report.claude is not None
    assert report.resets_at == read
