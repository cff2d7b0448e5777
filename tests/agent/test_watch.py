"""The entrypoint's watch over the CLI's stream: one log line per event, the result kept, a
stalled CLI stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.watch import describe, watch

INIT = {"type": "system", "subtype": "init", "session_id": "s-1", "model": "m", "tools": ["Bash"]}
TOOL = {
    "type": "assistant",
    "message": {
        "id": "msg_1",
        "content": [
            {"type": "tool_use", "name": "Bash", "input": {"command": "ls", "description": "List"}}
        ],
    },
}
DONE = {"type": "user", "message": {"content": [{"type": "tool_result", "is_error": False}]}}
TEXT = {
    "type": "assistant",
    "message": {"id": "msg_2", "content": [{"type": "text", "text": "ok"}]},
}
RETRY = {
    "type": "system",
    "subtype": "api_retry",
    "attempt": 1,
    "max_retries": 3,
    "error_status": 429,
}
RESULT = {"type": "result", "subtype": "success", "is_error": False, "session_id": "s-1"}


def test_each_event_is_one_human_line() -> None:
    turns: set[str] = set()
    lines = [
        line for event in (INIT, TOOL, DONE, RETRY, TEXT, RESULT) for line in describe(event, turns)
    ]
    assert lines == [
        "claude: session s-1 (m, 1 tools)",
        "claude: turn 1: uses Bash: List",
        "claude: tool done",
        "claude: API retry 1 of 3 (429)",
        "claude: turn 2: says: ok",
    ]


def _cli(tmp_path: Path, body: str) -> subprocess.Popen[bytes]:
    script = tmp_path / "cli.py"
    script.write_text("import json, sys, time\n" + body)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)


def test_the_result_is_kept_and_nothing_raw_is_printed(tmp_path: Path) -> None:
    said: list[str] = []
    events = "".join(f"print(json.dumps({e!r}), flush=True)\n" for e in (INIT, TOOL, RESULT))
    watched = watch(_cli(tmp_path, events + "print('a plain complaint')\n"), 30, said.append)
    assert (watched.exit_code, watched.stalled, watched.session_id) == (0, False, "s-1")
    assert watched.result == json.loads(json.dumps(RESULT))
    assert watched.other == ["a plain complaint"]
    assert not any(line.startswith("{") or "{" in line for line in said), said


def test_a_cli_silent_past_its_stall_timeout_is_stopped(tmp_path: Path) -> None:
    said: list[str] = []
    # After its first event it only retries, on and on (a minute of them, then its result):
    # were retries taken for progress it would never stall, and would end with that result.
    # How many retries are read before it is stopped depends on the machine's load; that it
    # is stopped, not.
    body = f"print(json.dumps({INIT!r}), flush=True)\n"
    body += "for _ in range(300):\n"
    body += f"    print(json.dumps({RETRY!r}), flush=True); time.sleep(0.2)\n"
    body += f"print(json.dumps({RESULT!r}), flush=True)\n"
    watched = watch(_cli(tmp_path, body), 1.0, said.append)
    assert watched.stalled and watched.result is None and watched.session_id == "s-1"
    assert watched.exit_code != 0
    assert "claude: no event for 1s: stalled, stopping it" in said
    assert "claude: API retry 1 of 3 (429)" in said, "its retries are logged, not progress"


def test_no_stall_timeout_waits_as_long_as_it_takes(tmp_path: Path) -> None:
    body = f"time.sleep(1.5)\nprint(json.dumps({RESULT!r}), flush=True)\n"
    watched = watch(_cli(tmp_path, body), None, lambda _: None)
    assert not watched.stalled and watched.result is not None
