"""The command line as people run it: every command, its exit code and what it prints.

Commands run as processes: piped, where output is plain lines, and in a pseudo-terminal
(pexpect), where rich draws bars and tables. Bad input of every kind exits 2 without a
traceback; a real crash still shows one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pexpect
import pytest

from client import batches
from sortie import reaping
from starter import EXIT_CODES, refused
from tests.helpers.cli import run_cli as piped
from tests.helpers.stack import ROOT, Sortie
from tests.helpers.waiting import eventually

ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07)")
BOLD_RED = "\x1b[1;31m"
NO_SERVER = "127.0.0.1:1"
"""Nothing listens there: a command that needs no server must not try one."""


def base_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's Fly, Temporal or Sortie settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TEMPORAL_", "SORTIE_"))
    }
    env.update({"TEMPORAL_ADDRESS": NO_SERVER, "TERM": "xterm-256color", **extra})
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def sortie_env(s: Sortie) -> dict[str, str]:
    """The environment that points the command line at the test's server, queue and store."""
    return base_env(
        TEMPORAL_ADDRESS=s.settings.temporal_address,
        SORTIE_TASK_QUEUE=s.settings.task_queue,
        SORTIE_STATE_DIR=str(s.settings.state_dir),
    )


def in_terminal(
    args: list[str], env: dict[str, str], columns: int = 120, timeout: float = 120
) -> tuple[int, str]:
    """Run `starter.py ARGS` in a pseudo-terminal; its exit status and everything it drew."""
    child = pexpect.spawn(
        sys.executable,
        ["starter.py", *args],
        cwd=str(ROOT),
        env=env,
        dimensions=(50, columns),
        encoding="utf-8",
        timeout=timeout,
    )
    child.expect(pexpect.EOF)
    drawn = str(child.before)
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return child.exitstatus, drawn


async def apiped(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`piped` off the event loop, which runs the test's worker."""
    return await asyncio.to_thread(piped, args, env)


async def aterminal(args: list[str], env: dict[str, str], columns: int = 120) -> tuple[int, str]:
    """`in_terminal` off the event loop, which runs the test's worker."""
    return await asyncio.to_thread(in_terminal, args, env, columns)


def plain(drawn: str) -> str:
    """What a terminal showed, frame after frame: escapes removed, a line per carriage return."""
    return ANSI.sub("", drawn).replace("\r\n", "\n").replace("\r", "\n")


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def write_batch(path: Path, app: str, jobs: list[dict[str, Any]], **fields: Any) -> Path:
    """A JSON batch file of quick alpine jobs."""
    data = {
        "name": f"cli{uuid.uuid4().hex[:8]}",
        "app": app,
        "defaults": {"image": "docker.io/library/alpine:3.20", "timeout": "60s", "retries": 1},
        "jobs": jobs,
        **fields,
    }
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- no server needed


@pytest.mark.parametrize(
    ("args", "code", "first"),
    [
        (["--help"], 0, "usage: starter.py"),
        (["submit", "--help"], 0, "usage: starter.py submit"),
        ([], 2, "usage: starter.py"),
        (["submit"], 2, "usage: starter.py submit"),
        (["frobnicate"], 2, "usage: starter.py"),
        (["status"], 2, "usage: starter.py status"),
        (["set-max-machines", "b", "many"], 2, "usage: starter.py set-max-machines"),
        (["set-max-machines", "b", "0"], 2, "N must be at least 1"),
        (["set-budget", "b", "-1"], 2, "usage: starter.py set-budget"),
        (["set-failure-limit", "b"], 2, "set-failure-limit: give --max-failures"),
        (["set-failure-limit", "b", "--max-failure-rate", "150%"], 2, "usage: starter.py set-"),
        (["reap"], 2, "name the Fly app with --app or FLY_APP"),
        (["analyze", "/nonexistent"], 2, "cannot analyse: no such directory: /nonexistent"),
        (["reap", "--app", "a", "--schedule", "soon"], 2, "cannot reach Temporal"),
        (["status", "batch-x"], 2, f"cannot reach Temporal at {NO_SERVER}"),
    ],
)
def test_help_and_usage_errors_exit_0_and_2_without_a_traceback(
    args: list[str], code: int, first: str
) -> None:
    ran = piped(args, base_env())
    assert ran.returncode == code, ran.stderr
    assert first_line(ran.stdout + ran.stderr).startswith(first)
    assert "Traceback" not in ran.stderr


def test_validate_prints_the_plan_with_its_bounds(tmp_path: Path) -> None:
    batch = tmp_path / "batch.yaml"
    batch.write_text(
        "name: plan\napp: my-app\nmax_machines: 2\nchunk_size: 2\nmax_cost_usd: 3\n"
        "defaults: {timeout: 10m, retries: 1, secrets: [GITHUB_TOKEN]}\n"
        "jobs:\n"
        "  - {id: a, command: 'true'}\n"
        "  - {id: b, command: 'true', secrets: [NPM_TOKEN]}\n"
        "  - {id: c, command: 'true'}\n"
        "  - {id: d, prompt: 'review', max_cost_usd: 0.5}\n"
        "  - {id: e, prompt: 'review', max_cost_usd: 0.25}\n"
    )
    ran = piped(["validate", str(batch)], base_env())
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert re.fullmatch(r"batch-plan-[0-9a-f]{8} is valid: plan on Fly app my-app", lines[0])
    assert "  jobs:     5 (3 command, 2 prompt)" in lines
    assert "  chunks:   3 of at most 2 jobs" in lines
    assert "  machines: at most 2 at once (max_machines 2)" in lines
    assert "  app:      my-app" in lines
    secrets = next(line for line in lines if line.startswith("  secrets:"))
    assert "GITHUB_TOKEN, NPM_TOKEN" in secrets and "Claude credential" in secrets
    # Each job: 2 tries of a 5m boot and a 10m run, 30m; five of them on two machines.
    time = next(line for line in lines if line.startswith("  time:"))
    assert time.startswith("  time:     at most 1h 30m (one job at most 30m")
    cost = next(line for line in lines if line.startswith("  cost:"))
    assert "at most $0.75" in cost and "budget $3.00" in cost


def test_validate_reports_field_and_cross_field_problems_at_once(tmp_path: Path) -> None:
    batch = tmp_path / "bad.yaml"
    batch.write_text(
        "name: Not A Name\napp: ok\n"
        "jobs:\n"
        "  - {id: a, command: 'true', retries: 99}\n"
        "  - {id: a, command: 'true'}\n"
        "  - {id: b, command: 'true', prompt: 'both'}\n"
        "  - {id: c, timeout: forever, prompt: 'hi'}\n"
    )
    ran = piped(["validate", str(batch)], base_env())
    assert ran.returncode == 2 and ran.stdout == ""
    assert ran.stderr.splitlines() == [
        f"{batch} is not a valid batch file:",
        "  - name: String should match pattern '^[a-z0-9][a-z0-9-]{0,39}$'",
        "  - job 'a' (jobs[0]): retries: Input should be less than or equal to 10",
        "  - job 'c' (jobs[3]): timeout: invalid duration 'forever' (use e.g. 90s, 30m, 1h30m)",
        "  - job 'a' (jobs[1]): id: duplicate job id (first at jobs[0])",
        "  - job 'b' (jobs[2]): set exactly one of command or prompt",
    ]


def test_validate_refuses_a_max_memory_fly_does_not_give(tmp_path: Path) -> None:
    batch = tmp_path / "oom.yaml"
    batch.write_text(
        "name: oom\napp: ok\njobs:\n"
        "  - {id: a, command: 'true', max_memory: 8gb}\n"
        "  - {id: b, command: 'true', on_oom: twice}\n"
    )
    ran = piped(["validate", str(batch)], base_env())
    assert ran.returncode == 2 and ran.stdout == ""
    assert ran.stderr.splitlines()[1:] == [
        "  - job 'b' (jobs[1]): on_oom: Input should be 'grow' or 'same'",
        "  - job 'a' (jobs[0]): max_memory: 8192 MB is more than Fly gives 1 shared CPU (2048 MB)",
    ]


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_unreadable_and_non_utf8_files_exit_2(tmp_path: Path, command: str) -> None:
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\u00e9\napp: a\n".encode("latin-1"))
    (tmp_path / "broken.json").write_text('{"name": ')
    expected = {
        "binary.yaml": "not UTF-8 text (byte 0x89 at offset 0): save it as UTF-8",
        "latin1.yaml": "not UTF-8 text (byte 0xe9 at offset 9): save it as UTF-8",
        "broken.json": "not valid JSON",
        "absent.yaml": "cannot read: No such file or directory",
        ".": "cannot read: Is a directory",
    }
    for name, problem in expected.items():
        ran = piped([command, str(tmp_path / name)], base_env())
        assert ran.returncode == 2, (name, ran.stderr)
        assert ran.stderr.splitlines()[1].startswith(f"  - {problem}"), ran.stderr
        assert "Traceback" not in ran.stderr


def test_a_real_crash_still_shows_its_traceback() -> None:
    crash = (
        "from sortie.temporal import run_main\n"
        "async def main() -> int:\n"
        "    raise ZeroDivisionError('a bug')\n"
        "run_main(main())\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", crash], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 1
    assert "Traceback" in ran.stderr and "ZeroDivisionError: a bug" in ran.stderr
    leave = "from sortie.temporal import run_main\nimport sys\n"
    leave += "async def main() -> int:\n    sys.exit('stopped: why')\nrun_main(main())\n"
    ran = subprocess.run(
        [sys.executable, "-c", leave], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (ran.returncode, ran.stderr) == (1, "stopped: why\n")


def test_each_refusal_exits_with_its_own_code_whatever_its_place_in_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # No entry is shadowed by an earlier one it is a case of (BatchRejected is a
    # BatchNotReadable, yet exits 2, not 1).
    for i, (kind, _, _) in enumerate(EXIT_CODES):
        assert not [k for k, _, _ in EXIT_CODES[:i] if issubclass(kind, k)], kind
    assert refused(batches.BatchRejected("refused: no credential")) == 2
    assert refused(batches.BatchNotReadable("terminated")) == 1
    assert refused(batches.RetryRefused("batch is still running")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "refused: no credential",
        "terminated",
        "cannot retry: batch is still running",
    ]


# ---------------------------------------------------------------- against a real worker


async def test_watch_in_a_terminal_draws_a_bar_that_reaches_100_percent(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    env = sortie_env(sortie)
    jobs = [{"id": f"j{i}", "command": "sleep 1"} for i in range(4)]
    batch = write_batch(tmp_path / "batch.json", app_name, jobs, max_machines=2, chunk_size=2)
    submitted = await apiped(["submit", str(batch)], env)
    assert submitted.returncode == 0, submitted.stderr
    head = re.fullmatch(
        r"submitted (batch-cli\w+-[0-9a-f]{8}) \(4 jobs\)", first_line(submitted.stdout)
    )
    assert head, submitted.stdout
    batch_id = head.group(1)

    code, drawn = await aterminal(["watch", batch_id], env)
    shown = plain(drawn)
    assert code == 0, shown
    assert first_line(shown).startswith("Web UI: http")
    bars = [line for line in shown.splitlines() if line.startswith(batch_id) and "%" in line]
    assert bars, shown
    assert re.search(r"━+ 100% 4/4 .*✓ 4  ✗ 0  machines 0(/2)?  completed$", bars[-1]), bars[-1]
    assert re.search(r"\bJOB\b.*\bSTATE\b.*\bEXIT\b", shown), "the results table follows"
    assert f"{batch_id}: completed; 4 jobs, 4 succeeded, 0 failed" in shown


async def test_a_narrow_terminal_gets_bars_and_tables_that_fit(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    env = sortie_env(sortie)
    jobs = [{"id": "ok", "command": "true"}, {"id": "bad", "command": "exit 3"}]
    batch = write_batch(tmp_path / "batch.json", app_name, jobs, defaults={"retries": 0})
    code, drawn = await aterminal(["submit", str(batch), "--wait"], env, columns=60)
    shown = plain(drawn)
    assert code == 1, shown
    assert re.search(r"^batch .*━ 100% .*✗ 1", shown, re.MULTILINE), shown
    assert f"{BOLD_RED}✗ 1" in drawn, "failures are drawn in red"
    assert f"{BOLD_RED}failed" in drawn, "the failed job's state is red in the table"
    for line in shown.splitlines():
        if not line.startswith("Web UI:"):
            assert len(line) <= 60, line


async def test_steering_reading_and_listing_through_the_cli(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    env = sortie_env(sortie)
    # Long enough that none ends while the test steers it, however loaded the machine: cancelled.
    jobs = [{"id": f"s{i}", "command": "sleep 600", "timeout": "30m"} for i in range(4)]
    batch = write_batch(tmp_path / "batch.json", app_name, jobs, max_machines=2, chunk_size=2)
    submitted = await apiped(["submit", str(batch), "--json"], env)
    assert submitted.returncode == 0, submitted.stderr
    document = json.loads(submitted.stdout)
    assert document.keys() == {"batch_id", "created", "status"} and document["created"]
    batch_id = document["batch_id"]
    again = await apiped(["submit", str(batch)], env)
    assert again.returncode == 0
    assert first_line(again.stdout) == (
        f"{batch_id} was already submitted (running); use --new to run the file again as a "
        "new batch"
    )

    async def two_running() -> bool:
        view = await batches.progress_view(sortie.client, batch_id)
        return view.running == 2

    await eventually(two_running, timeout=60, what="two running jobs")
    # Commands that only read run side by side (each is a process of its own).
    status, (code, drawn), as_json = await asyncio.gather(
        apiped(["status", batch_id], env),
        aterminal(["status", batch_id], env),
        apiped(["status", batch_id, "--json"], env),
    )
    assert status.returncode == 0, status.stderr
    assert first_line(status.stdout).startswith("Web UI: http")
    assert status.stdout.splitlines()[1] == f"{batch_id}  running"
    assert "0/4 done" in status.stdout and "running 2" in status.stdout
    assert code == 0 and re.search(r"━ +0% 0/4 .*machines \d/2", plain(drawn)), plain(drawn)
    assert re.search(r"chunk 0000 .*running 1, slots 1", plain(drawn)), "a bar per running chunk"
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["counts"]["total"] == 4

    for args, said in [
        (["pause", batch_id, "--reason", "lunch"], f"sent pause to {batch_id}"),
        (["set-max-machines", batch_id, "3"], f"sent set-max-machines to {batch_id}"),
        (["set-budget", batch_id, "2.5"], f"sent set-budget to {batch_id}"),
        (["resume", batch_id], f"sent resume to {batch_id}"),
    ]:
        ran = await apiped(args, env)
        assert (ran.returncode, first_line(ran.stdout)) == (0, said), ran.stderr

    async def steered() -> bool:
        view = await batches.progress_view(sortie.client, batch_id)
        return view.max_machines == 3 and view.max_cost_usd == 2.5 and not view.paused

    await eventually(steered, what="the new cap and budget, resumed")

    listed, (code, drawn), so_far = await asyncio.gather(
        apiped(["list"], env),
        # Wide enough for whole ids and links however many batches the session's server lists.
        aterminal(["list"], env, columns=240),
        apiped(["results", batch_id], env),
    )
    assert listed.returncode == 0, listed.stderr
    mine = [line for line in listed.stdout.splitlines() if line.startswith(batch_id)]
    assert len(mine) == 1 and " running " in mine[0] and mine[0].endswith(batch_id)
    assert code == 0 and re.search(r"BATCH\s+┃\s+STATUS", plain(drawn)), plain(drawn)
    assert batch_id in plain(drawn) and "workflows/" in plain(drawn)

    assert so_far.returncode == 0, "nothing failed yet: a running batch is not a failed one"
    assert "4 jobs, 0 succeeded, 0 failed" in so_far.stdout.splitlines()[-1]

    cancelled = await apiped(["cancel", batch_id, "--reason", "done here"], env)
    assert (cancelled.returncode, first_line(cancelled.stdout)) == (0, f"sent cancel to {batch_id}")
    watched = await apiped(["watch", batch_id], env)
    assert watched.returncode == 1, "a batch with cancelled jobs"
    lines = watched.stdout.splitlines()
    assert lines[0].startswith("Web UI: http")
    # The cancel's reason shows with the state, as a pause's does.
    done = f"{batch_id} cancelled (done here): 4/4 done"
    assert any(line.startswith(done) for line in lines), lines
    assert "━" not in watched.stdout and "\x1b" not in watched.stdout, "plain when piped"

    results, as_json, one, unknown, not_analysis, reaped, scheduled = await asyncio.gather(
        apiped(["results", batch_id], env),
        apiped(["results", batch_id, "--json"], env),
        apiped(["results", batch_id, "--job", "s0"], env),
        apiped(["results", batch_id, "--job", "nope"], env),
        apiped(["findings", batch_id], env),
        apiped(["reap", "--app", app_name, "--dry-run"], env),
        apiped(["reap", "--app", app_name, "--schedule", "1h"], env),
    )
    assert results.returncode == 1
    table = results.stdout.splitlines()
    assert table[1].split() == [
        *["JOB", "STATE", "EXIT", "TRIES", "MACHINE", "TIME", "COST", "SESSION"],
        "ERROR/ANSWER",
    ]
    assert table[-1].startswith(f"{batch_id}: cancelled; 4 jobs, 0 succeeded, 0 failed")
    document = json.loads(as_json.stdout)
    assert document["cancelled"] == 4 and document["cancel_reason"] == "done here"
    assert one.returncode == 0 and "== s0 turn 1: cancelled" in one.stdout
    assert unknown.returncode == 2 and f"batch {batch_id} has no job 'nope'" in unknown.stderr

    assert not_analysis.returncode == 2
    assert f"cannot analyse: {batch_id} is not an analysis batch" in not_analysis.stderr

    assert reaped.returncode == 0, reaped.stderr
    assert first_line(reaped.stdout).startswith(f"{app_name}: ")
    assert "orphaned, would destroy 0" in reaped.stdout
    assert scheduled.returncode == 0, scheduled.stderr
    schedule = reaping.schedule_id(app_name)
    assert first_line(scheduled.stdout) == f"schedule {schedule} sweeps {app_name} every 1h"
    handle = sortie.client.get_schedule_handle(schedule)
    described = await handle.describe()
    await handle.delete()
    assert [i.every for i in described.schedule.spec.intervals] == [timedelta(hours=1)]


async def test_a_batch_the_worker_refuses_and_a_batch_that_does_not_exist_exit_2(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    env = sortie_env(sortie)
    jobs = [{"id": "a", "command": "true", "secrets": ["SORTIE_TEST_ABSENT_SECRET"]}]
    batch = write_batch(tmp_path / "batch.json", app_name, jobs)
    refused = await apiped(["submit", str(batch), "--wait"], env)
    assert refused.returncode == 2, refused.stderr
    assert "refused by the worker" in refused.stderr
    assert "SORTIE_TEST_ABSENT_SECRET" in refused.stderr and "Traceback" not in refused.stderr
    batch_id = first_line(refused.stdout).split()[1]
    commands = ("status", "results", "watch")
    for command, ran in zip(
        commands, await asyncio.gather(*(apiped([c, batch_id], env) for c in commands)), strict=True
    ):
        assert ran.returncode == 2, (command, ran.stderr)
        assert "refused by the worker" in ran.stderr

    none = (
        ["status", "batch-none"],
        ["watch", "batch-none"],
        ["pause", "batch-none"],
        ["results", "batch-none"],
        ["findings", "batch-none"],
        ["followup", "batch-none", "a", "again"],
    )
    for args, ran in zip(
        none, await asyncio.gather(*(apiped(args, env) for args in none)), strict=True
    ):
        assert ran.returncode == 2, (args, ran.stderr)
        assert first_line(ran.stderr).startswith("no such batch:"), ran.stderr
        assert "Traceback" not in ran.stderr


async def test_prompt_jobs_submit_wait_in_a_terminal_then_followup(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    env = sortie_env(sortie)
    batch = tmp_path / "prompts.json"
    name = f"clip{uuid.uuid4().hex[:6]}"
    batch.write_text(
        json.dumps(
            {
                "name": name,
                "app": app_name,
                "max_cost_usd": 5,
                "keep_sessions": "1h",
                "defaults": {"timeout": "2m", "retries": 0},
                "jobs": [{"id": "ask", "prompt": "hello [[cost:0.25]]"}],
            }
        )
    )
    code, drawn = await aterminal(["submit", str(batch), "--wait"], env)
    shown = plain(drawn)
    assert code == 0, shown
    assert re.search(r"100% 1/1 .*\$0\.2500", shown), "the bar shows the cost"
    batch_id = first_line(shown).split()[1]

    started = await apiped(["followup", batch_id, "ask", "and then?"], env)
    assert started.returncode == 0, started.stderr
    assert first_line(started.stdout) == f"started {batch_id}-followup-ask-2"
    assert "== ask turn 2: succeeded" in started.stdout
    refused = await apiped(["followup", batch_id, "nope", "x"], env)
    assert refused.returncode == 2 and "has no job 'nope'" in refused.stderr


async def test_a_prompt_job_whose_report_never_arrives_makes_submit_wait_exit_1(
    sortie: Sortie, app_name: str, tmp_path: Path
) -> None:
    batch = tmp_path / "withheld.json"
    jobs = [{"id": "lost", "prompt": "hello"}]
    batch.write_text(
        json.dumps(
            {
                "name": f"cliw{uuid.uuid4().hex[:6]}",
                "app": app_name,
                "defaults": {"timeout": "2m", "retries": 0},
                "jobs": jobs,
            }
        )
    )
    sortie.localfly.set_faults({"machines": [{"kind": "withhold_report", "count": 1}]})
    try:
        done = await apiped(["submit", str(batch), "--wait"], sortie_env(sortie))
    finally:
        sortie.localfly.set_faults({})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 succeeded, 1 failed" in done.stdout, done.stdout
    assert "report never reached" in done.stdout, "the row says why"


def test_validate_warns_of_jobs_whose_network_is_open(tmp_path: Path) -> None:
    batch = tmp_path / "batch.yaml"
    batch.write_text(
        "name: net\napp: my-app\n"
        "jobs:\n"
        "  - {id: a, prompt: 'review', network: {allow: [pypi.org]}}\n"
        "  - {id: b, prompt: 'research', network: open}\n"
    )
    ran = piped(["validate", str(batch)], base_env())
    assert ran.returncode == 0, ran.stderr
    [warning] = [line for line in ran.stdout.splitlines() if "warning:" in line]
    assert "network: open for 1 prompt job(s) (b)" in warning
