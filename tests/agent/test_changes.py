"""The machine side of a job's changes: the branch it pushes to origin, and the token git gets.

The entrypoint runs against the stand-in CLI; the origin is a bare repository on disk.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from agent.changes import auth_env
from tests.agent.test_entrypoint import git, job
from tests.agent.test_verify import TOKEN, run_with_changes


def test_push_branch_commits_and_pushes_to_origin_without_the_token(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, sha = bare
    description = job(
        "Take notes [[write:notes.txt]]",
        [{"url": str(origin)}],
        verify=["sh", "-c", "test -f notes.txt"],
        push_branch="sortie/b1/job-1",
    )
    run = run_with_changes(tmp_path, description, GITHUB_TOKEN=TOKEN)
    assert run.code == 0, run.stderr
    [pushed] = run.result["push"]
    assert pushed["branch"] == "sortie/b1/job-1" and len(pushed["commit"]) == 40
    branch = git("--git-dir", str(origin), "rev-parse", "sortie/b1/job-1", cwd=tmp_path)
    assert branch == pushed["commit"]
    assert git("--git-dir", str(origin), "rev-parse", "sortie/b1/job-1~1", cwd=tmp_path) == sha
    files = git("--git-dir", str(origin), "show", "--name-only", "--format=", branch, cwd=tmp_path)
    assert files.splitlines() == ["notes.txt"]
    everything = git("--git-dir", str(origin), "log", "-p", "--all", cwd=tmp_path)
    config = (tmp_path / "run" / "root" / "workspace" / "origin" / ".git" / "config").read_text()
    for text in (everything, config, run.stdout, run.stderr, json.dumps(run.result)):
        assert TOKEN not in text


def test_a_second_push_builds_on_the_branch_it_finds(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, sha = bare
    pushes = []
    for name in ("first.txt", "second.txt"):  # the job run twice: the branch exists the 2nd time
        description = job(
            f"Write [[write:{name}]]", [{"url": str(origin)}], push_branch="sortie/b1/job-1"
        )
        run = run_with_changes(tmp_path, description)
        assert run.code == 0, run.stderr
        pushes.append(run.result["push"][0]["commit"])
    log = git("--git-dir", str(origin), "rev-list", "sortie/b1/job-1", cwd=tmp_path)
    assert log.splitlines() == [pushes[1], pushes[0], sha], "a fast-forward, history kept"


def test_no_push_when_the_check_fails(tmp_path: Path, bare: tuple[Path, str]) -> None:
    origin, _ = bare
    description = job(
        "Take notes [[write:notes.txt]]",
        [{"url": str(origin)}],
        verify=["sh", "-c", "exit 3"],
        max_iterations=1,
        push_branch="sortie/b1/job-1",
    )
    run = run_with_changes(tmp_path, description)
    assert run.code == 4 and "push" not in run.result
    assert run.result["changes"][0]["files"] == 1, "the change is stored whatever the outcome"
    refs = git("--git-dir", str(origin), "branch", "--list", "sortie/*", cwd=tmp_path)
    assert refs == ""


def test_the_token_goes_to_git_by_environment_for_the_origins_host_only() -> None:
    env = {"GITHUB_TOKEN": TOKEN}
    header = auth_env(env, "https://user@github.com/o/r.git")
    assert header["GIT_CONFIG_COUNT"] == "1"
    assert header["GIT_CONFIG_KEY_0"] == "http.https://github.com/.extraHeader"
    encoded = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert header["GIT_CONFIG_VALUE_0"] == f"Authorization: Basic {encoded}"
    assert auth_env(env, "/srv/git/repo.git") == {}
    assert auth_env({}, "https://github.com/o/r.git") == {}


def test_a_change_holding_a_secret_is_neither_stored_nor_pushed(
    tmp_path: Path, bare: tuple[Path, str]
) -> None:
    origin, _ = bare
    description = job(
        f"Write the token {TOKEN} into a file [[write:notes.txt]]",
        [{"url": str(origin)}],
        push_branch="sortie/b1/job-1",
    )
    run = run_with_changes(tmp_path, description, GITHUB_TOKEN=TOKEN)
    assert run.code == 5
    [repo] = run.result["changes"]
    assert repo["withheld"] is True and repo["files"] == 1, "counted, not stored"
    assert run.result["_changes"]["repos"][0]["patch"] is None
    assert run.result["push"][0]["error"] == "the change to origin holds a secret value"
    assert git("--git-dir", str(origin), "branch", "--list", "sortie/*", cwd=tmp_path) == ""
    assert TOKEN not in json.dumps(run.result) + run.stdout + run.stderr
