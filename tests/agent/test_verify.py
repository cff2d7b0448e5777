"""The machine side of jobs that check their work: the verify loop and the change it stores.

The entrypoint runs against the stand-in CLI; its uploads land in local files.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.agent.test_entrypoint import Run, git, job, run_agent

TOKEN = "ghp_verifytesttoken0123456789abcdefABCDEF"


def run_with_changes(tmp_path: Path, description: dict[str, Any], **env: str) -> Run:
    """Run the agent with a changes URL; the changes document is read back into the run."""
    changes = tmp_path / "run" / "changes.json"
    changes.parent.mkdir(parents=True, exist_ok=True)
    changes.unlink(missing_ok=True)
    run = run_agent(tmp_path, description, env={"SORTIE_CHANGES_URL": f"file://{changes}", **env})
    run.result["_changes"] = json.loads(changes.read_text()) if changes.exists() else None
    return run


def sessions(tmp_path: Path) -> list[list[dict[str, Any]]]:
    """Every stand-in session of the run: one JSON line per Claude run in it."""
    projects = tmp_path / "run" / "home" / ".claude" / "projects"
    return [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(projects.glob("*/*.jsonl"))
    ]


def test_a_passing_check_takes_one_iteration_and_the_patch_applies(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, sha = bare
    description = job(
        "Take notes [[write:notes.txt]]",
        [{"url": str(origin)}],
        verify=["sh", "-c", "test -f notes.txt"],
        max_iterations=2,
    )
    run = run_with_changes(tmp_path, description)
    assert run.code == 0, run.stderr
    report = run.result
    assert report["verify_failed"] is False and report["error"] is None
    [iteration] = report["iterations"]
    assert iteration["claude_exit"] == 0 and iteration["verify_exit"] == 0
    assert iteration["cost_usd"] == report["claude"]["total_cost_usd"] > 0
    assert iteration["seconds"] > 0
    assert report["changes"] == [
        {
            "url": str(origin),
            "path": "origin",
            "commit": sha,
            "files": 1,
            "insertions": 1,
            "deletions": 0,
        }
    ]
    assert report["changes_uploaded"] is True
    [stored] = report["_changes"]["repos"]
    patch = base64.b64decode(stored["patch"])
    assert b"notes.txt" in patch
    fresh = tmp_path / "fresh"
    git("clone", "-q", str(origin), str(fresh), cwd=tmp_path)
    subprocess.run(["git", "apply"], input=patch, cwd=fresh, check=True)
    assert (fresh / "notes.txt").read_text().startswith("Take notes")


def test_a_failing_check_resumes_the_session_then_fails_with_its_scrubbed_tail(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, _ = bare
    check = "echo checking; echo token=$GITHUB_TOKEN; echo 'tests: 3 failed'; exit 1"
    description = job("Fix it", [{"url": str(origin)}], verify=["sh", "-c", check])
    description["max_iterations"] = 2
    run = run_with_changes(tmp_path, description, GITHUB_TOKEN=TOKEN)
    assert run.code == 4
    report = run.result
    assert report["verify_failed"] is True
    assert [i["verify_exit"] for i in report["iterations"]] == [1, 1]
    assert report["error"].startswith("verify failed: `" + check + "` exited 1 after 2 iterations")
    # GITHUB_TOKEN is the entrypoint's (clones, pushes): the check never gets it.
    assert "tests: 3 failed" in report["error"] and "token=\n" in report["error"]
    [session] = sessions(tmp_path)  # Claude ran twice, in one session
    assert len(session) == 2
    assert session[1]["prompt"].startswith(f"The check `{check}` failed with exit code 1")
    assert "token=\n" in session[1]["prompt"]
    assert TOKEN not in run.stdout + run.stderr + json.dumps(report)


def test_the_jobs_max_cost_bounds_all_its_iterations(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, _ = bare
    # The check's output carries the stand-in's cost marker into the next prompt: $0.30 a turn.
    # Each iteration's Claude gets what is left as --max-budget-usd ($0.30 the second time, which
    # the turn fits; past it the CLI would stop itself), then nothing is left for a third.
    check = "echo '[[cost:0.3]]'; exit 1"
    description = job(
        "Work [[cost:0.3]]",
        [{"url": str(origin)}],
        verify=["sh", "-c", check],
        max_iterations=5,
        max_cost_usd=0.6,
    )
    run = run_with_changes(tmp_path, description)
    assert run.code == 4
    report = run.result
    assert [i["cost_usd"] for i in report["iterations"]] == [0.3, 0.3]
    assert "max_cost_usd of $0.6 is spent" in report["error"]


def test_the_loop_tells_what_it_spent_after_every_turn(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, _ = bare
    # The check sees only its checkout: the spend lands there, and it writes down what the
    # loop had told by then, turn by turn.
    checkout = tmp_path / "run" / "root" / "workspace" / "origin"
    spend, told = checkout / ".spend.json", checkout / ".told"
    check = "cat .spend.json >> .told; echo >> .told; printenv SORTIE_SPEND_URL >> .leak; exit 1"
    description = job(
        "Work [[cost:0.25]]", [{"url": str(origin)}], verify=["sh", "-c", check], max_iterations=3
    )
    run = run_agent(tmp_path, description, env={"SORTIE_SPEND_URL": f"file://{spend}"})
    assert run.result["verify_failed"] is True, run.stderr
    seen = [json.loads(line) for line in told.read_text().splitlines() if line]
    iterations = run.result["iterations"]
    assert len(seen) == len(iterations) == 3
    for n, told_then in enumerate(seen, start=1):
        so_far = iterations[:n]
        assert told_then["iterations"] == n
        assert told_then["cost_usd"] == round(sum(i["cost_usd"] for i in so_far), 6)
        assert told_then["num_turns"] == sum(i["num_turns"] for i in so_far)
    assert seen[0]["cost_usd"] == 0.25
    assert str(spend) not in run.stderr, "the URL is a secret"
    assert (checkout / ".leak").read_text() == "", "the check never sees the spend URL"


def test_a_check_that_cannot_start_in_its_sandbox_exits_127(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, _ = bare
    description = job("Fix it", [{"url": str(origin)}], verify=["no-such-check-command"])
    run = run_with_changes(tmp_path, description)
    assert run.code == 4
    assert [i["verify_exit"] for i in run.result["iterations"]] == [127]
    assert "could not be started" in run.result["error"]


def test_the_check_runs_confined_to_its_checkout_without_the_network(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, _ = bare
    outside = tmp_path / "outside"
    # Under /tmp it writes to a tmpfs of its own; elsewhere the machine is read-only.
    check = f"touch inside {outside} /etc/sortie-outside; exit 0"
    description = job("Fix it", [{"url": str(origin)}], verify=["sh", "-c", check])
    run = run_with_changes(tmp_path, description)
    assert [i["verify_exit"] for i in run.result["iterations"]] == [0]
    assert not outside.exists() and not Path("/etc/sortie-outside").exists()
    assert run.result["changes"][0]["files"] == 1, "the checkout itself is writable"
    with socket.create_server(("127.0.0.1", 0)) as listening:  # reachable from the machine
        port = listening.getsockname()[1]
        net = f"import socket; socket.create_connection(('127.0.0.1', {port}), 5)"
        description = job("Fix it", [{"url": str(origin)}], verify=["python3", "-c", net])
        run = run_with_changes(tmp_path / "net", description)
    assert "ConnectionRefusedError" in run.result["error"], "the check has no network"
