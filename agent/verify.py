"""The verify loop: a prompt job checks its own work before it counts as done.

After Claude finishes, the job's `verify` command runs in the checkout Claude worked in, on the
same machine. Exit 0 and the job succeeded. Otherwise, while iterations are left (and the job's
`max_cost_usd` is not spent), Claude continues the same session (`--resume`) with a prompt
carrying the command and the scrubbed tail of its output, then `verify` runs again. Every
iteration is recorded: Claude's exit code, verify's, the seconds it took and the turn's cost.
What the loop has spent so far goes to the object store after every turn (SORTIE_SPEND_URL),
where the worker reads it while the job runs, so the batch's budget counts it as it happens.
Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.entrypoint import Machine
    from agent.job import Job
    from agent.watch import Watched

TAIL_LINES = 40
TAIL_CHARS = 2000
"""How much of a failing check's output goes back to Claude and into the report: its end."""
EXIT_VERIFY_FAILED = 4
"""The entrypoint's exit code when the check still failed after the last iteration."""
EXIT_NOT_RUN = 127
NOT_RUN = ("bwrap: execvp ", "sortie: the check could not be started: ")
"""How bubblewrap (open network) and the bridge (agent/egress.py) say the check did not start."""
SPEND_URL = "SORTIE_SPEND_URL"
"""The presigned PUT URL for what the loop has spent so far (a secret like the others)."""


@dataclass(frozen=True)
class Turn:
    """One run of the Claude CLI: its exit code, its JSON result (or None) and why not."""

    code: int
    output: dict[str, Any] | None
    problem: str | None
    watched: Watched | None = None
    """How the CLI ran (a stall among it), when it ran."""

    @property
    def ok(self) -> bool:
        """Claude finished without an error: its work can be checked."""
        return self.code == 0 and self.output is not None and not self.output.get("is_error")

    def number(self, key: str) -> float:
        """A numeric field of the result (cost, turns), 0 when absent."""
        value = (self.output or {}).get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


@dataclass
class Loop:
    """What the loop did: the last Claude turn, every iteration, and whether the check passed."""

    turn: Turn
    passed: bool = False
    iterations: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    """Why the check never passed, with its last output's tail; None when it passed or Claude's
    own failure ended the loop (then the job fails for Claude's reason)."""

    @property
    def failed(self) -> bool:
        """Claude finished its work but the check did not pass: the job fails `verify_failed`."""
        return self.turn.ok and not self.passed


def shown(command: Sequence[str]) -> str:
    """The command as the batch file wrote it: the shell string, or the argv joined."""
    if len(command) == 3 and list(command[:2]) == ["sh", "-c"]:
        return command[2]
    return shlex.join(command)


def tail(text: str, machine: Machine) -> str:
    """The end of a check's output, bounded in lines and characters, secrets scrubbed."""
    lines = machine.scrub.text(text).splitlines()[-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:]


def check(machine: Machine, command: Sequence[str], cwd: Path) -> tuple[int, str]:
    """Run the check in the checkout, in the job's sandbox: its exit code and the tail of its
    output (both streams). Its whole output goes to the machine's log, scrubbed.
    """

    def refused(host: str) -> None:
        machine.note(f"verify: the network refused {host} (not in the job's allowlist)")

    confined = (
        machine.sandbox.confine_check(command, cwd, refused)
        if machine.sandbox
        else nullcontext(list(command))
    )
    try:
        with confined as argv:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env=machine.child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
            )
    except OSError as error:
        return EXIT_NOT_RUN, f"the check could not be started: {error}"
    output = proc.stdout.decode("utf-8", errors="replace")
    if machine.sandbox and proc.returncode in (1, EXIT_NOT_RUN) and output.startswith(NOT_RUN):
        why = output.strip().removeprefix(NOT_RUN[1])
        return EXIT_NOT_RUN, f"the check could not be started: {why}"
    for line in output.splitlines()[-TAIL_LINES:]:
        sys.stderr.write(machine.scrub.text(f"verify: {line}") + "\n")
    sys.stderr.flush()
    code = proc.returncode
    return (128 - code if code < 0 else code), tail(output, machine)


def fix_prompt(command: Sequence[str], code: int, output: str) -> str:
    """What Claude is told when its work did not pass the check."""
    return (
        f"The check `{shown(command)}` failed with exit code {code} after your changes. "
        f"The end of its output:\n\n```\n{output}\n```\n\n"
        "Fix the work so that the check passes. The check runs again when you finish."
    )


def report_spend(machine: Machine, iterations: list[dict[str, Any]]) -> None:
    """Tell the worker what the loop has spent so far: one try, as the final report is the
    truth and the loop must not wait on the store."""
    if not machine.env.get(SPEND_URL):
        return
    spend = {
        "cost_usd": round(sum(i["cost_usd"] for i in iterations), 6),
        "num_turns": sum(i["num_turns"] for i in iterations),
        "iterations": len(iterations),
    }
    machine.upload(SPEND_URL, "spend", json.dumps(spend).encode("utf-8"), tries=1)


def run(machine: Machine, job: Job, cwd: Path, claude: Callable[[Job], Turn]) -> Loop:
    """Claude, then the check, until it passes or the iterations or the job's budget run out."""
    assert job.verify is not None
    asked, spent = job, 0.0
    loop = Loop(turn=Turn(0, None, None))
    for number in range(1, job.max_iterations + 1):
        started = time.monotonic()
        loop.turn = turn = claude(asked)
        spent += turn.number("total_cost_usd")
        iteration: dict[str, Any] = {
            "claude_exit": turn.code,
            "verify_exit": None,
            "seconds": 0.0,
            "cost_usd": round(turn.number("total_cost_usd"), 6),
            "num_turns": int(turn.number("num_turns")),
        }
        loop.iterations.append(iteration)
        report_spend(machine, loop.iterations)
        if not turn.ok:
            iteration["seconds"] = round(time.monotonic() - started, 3)
            return loop  # Claude's own failure decides the job
        code, output = check(machine, job.verify, cwd)
        iteration["verify_exit"] = code
        iteration["seconds"] = round(time.monotonic() - started, 3)
        machine.note(f"verify (iteration {number} of {job.max_iterations}) exited {code}")
        if code == 0:
            loop.passed = True
            return loop
        left = None if job.max_cost_usd is None else round(job.max_cost_usd - spent, 6)
        why = f"after {number} iteration{'s' if number > 1 else ''}"
        session = (turn.output or {}).get("session_id")
        if left is not None and left <= 0 and number < job.max_iterations:
            why += f" (the job's max_cost_usd of ${job.max_cost_usd:g} is spent)"
        elif not isinstance(session, str) and number < job.max_iterations:
            why += " (Claude named no session to continue)"
        elif number < job.max_iterations:
            asked = replace(
                job,
                prompt=fix_prompt(job.verify, code, output),
                resume_session_id=session,
                max_cost_usd=left,
            )
            continue
        loop.failure = f"verify failed: `{shown(job.verify)}` exited {code} {why}\n{output}"
        return loop
    return loop
