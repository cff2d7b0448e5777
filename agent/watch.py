"""Watch a running `claude -p --output-format stream-json --verbose`: its progress, its stalls.

The CLI prints one JSON event a line (system init, assistant messages, tool results, the final
`result` object). Each becomes one human line in the machine's log (never the raw JSON); the
`result` event is kept for the report. When no event arrives for the job's stall timeout, the
CLI is stopped (SIGTERM, then SIGKILL) and the run counts as stalled. The CLI's own API retry
notices are logged but do not count as progress: a CLI that only retries is not moving on.
Standard library only, like the rest of the entrypoint.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from agent.limits import rejected_until

STOP_GRACE_S = 10.0
"""How long a stopped CLI gets to leave after SIGTERM before SIGKILL."""
TEXT_CHARS = 100
"""How much of an answer's text or a tool's input one progress line shows."""


@dataclass
class Watched:
    """What a watched run of the CLI produced."""

    exit_code: int
    result: dict[str, Any] | None = None
    """The final `result` event: the same object `--output-format json` prints."""
    stalled: bool = False
    session_id: str | None = None
    """From the init event: known even when the run never reached its result."""
    other: list[str] = field(default_factory=list)
    """Lines that were not JSON events (the CLI's own complaints), for the report."""
    resets_at: int | None = None
    """When the API refused the credential for its usage limit: the reset, in epoch seconds."""


@dataclass
class _Progress:
    """The state the reader thread shares with the watcher."""

    last_event: float
    turns: set[str] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)


def watch(
    proc: subprocess.Popen[bytes], stall_timeout_s: float | None, say: Callable[[str], None]
) -> Watched:
    """Read the CLI's events until it exits, or stop it once it stalls; `say` prints a line."""
    assert proc.stdout is not None
    watched = Watched(exit_code=0)
    progress = _Progress(last_event=time.monotonic())
    reader = threading.Thread(target=_read, args=(proc.stdout, watched, progress, say), daemon=True)
    reader.start()
    while proc.poll() is None:
        if stall_timeout_s and time.monotonic() - progress.last_event > stall_timeout_s:
            watched.stalled = True
            say(f"claude: no event for {stall_timeout_s:g}s: stalled, stopping it")
            _stop(proc)
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
    code = proc.wait()
    reader.join(STOP_GRACE_S)
    watched.exit_code = 128 - code if code < 0 else code
    return watched


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()


def _read(
    stream: IO[bytes], watched: Watched, progress: _Progress, say: Callable[[str], None]
) -> None:
    """The reader thread: one line of the log per event; the result kept."""
    for raw in stream:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            watched.other.append(line)
            say(f"claude: {line[:300]}")
            continue
        if not (event.get("type") == "system" and event.get("subtype") == "api_retry"):
            progress.last_event = time.monotonic()
        if event.get("type") == "result":
            watched.result = event
        if (until := rejected_until(event)) is not None:
            watched.resets_at = until
        if event.get("type") == "system" and event.get("subtype") == "init":
            session = event.get("session_id")
            watched.session_id = session if isinstance(session, str) else None
        for text in describe(event, progress.turns):
            say(text)
    progress.done.set()


def describe(event: dict[str, Any], turns: set[str]) -> list[str]:
    """The log lines for one event (none for the result: the entrypoint sums it up)."""
    kind, subtype = event.get("type"), event.get("subtype")
    if kind == "result":
        return []
    if kind == "system" and subtype == "init":
        tools = event.get("tools")
        count = len(tools) if isinstance(tools, list) else 0
        return [f"claude: session {event.get('session_id')} ({event.get('model')}, {count} tools)"]
    if kind == "system" and subtype == "api_retry":
        status = event.get("error_status") or event.get("error") or "no answer"
        return [
            f"claude: API retry {event.get('attempt')} of {event.get('max_retries')} ({status})"
        ]
    if (until := rejected_until(event)) is not None:
        resets = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until))
        return [f"claude: usage limit reached, resets at {resets} UTC"]
    message = event.get("message")
    if kind == "assistant" and isinstance(message, dict):
        turns.add(str(message.get("id")))
        return [f"claude: turn {len(turns)}: {_block(b)}" for b in _blocks(message)]
    if kind == "user" and isinstance(message, dict):
        results = [b for b in _blocks(message) if b.get("type") == "tool_result"]
        return [f"claude: tool {'failed' if b.get('is_error') else 'done'}" for b in results]
    return [f"claude: {kind}{f' {subtype}' if subtype else ''}"]


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _block(block: dict[str, Any]) -> str:
    """One content block of an assistant message, in a few words."""
    match block.get("type"):
        case "tool_use":
            given = block.get("input")
            about = ""
            if isinstance(given, dict):
                about = str(given.get("description") or given.get("command") or "")
                about = about or json.dumps(given)
            return f"uses {block.get('name')}: {_short(about)}"
        case "text":
            return f"says: {_short(str(block.get('text') or ''))}"
        case other:
            return str(other)


def _short(text: str) -> str:
    """One line of at most TEXT_CHARS characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= TEXT_CHARS else flat[: TEXT_CHARS - 1] + "…"
