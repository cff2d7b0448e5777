"""The machine side of prompt jobs: the entrypoint run against the stand-in CLI, and its uploads."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sortie.claude import AgentReport, ErrorKind

ROOT = Path(__file__).resolve().parents[2]
STANDIN_BIN = ROOT / "tests" / "bin"
SYSTEM_PATH = os.environ.get("PATH", "/usr/bin:/bin")


# The entrypoint ------------------------------------------------------------------------------


@dataclass
class Run:
    """One finished entrypoint process and what it uploaded."""

    code: int
    stdout: str
    stderr: str
    result: dict[str, Any]
    archive: bytes | None


def git(*args: str, cwd: Path) -> str:
    """Run git for test setup, with an identity so commits work anywhere."""
    return subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, str]:
    """A local repository with one commit, and that commit's sha."""
    repo = tmp_path / "origin" / "demo"
    repo.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "README.md").write_text("# demo\n")
    (repo / "app.py").write_text("print('hi')\n")
    (repo / ".gitignore").write_text("*.log\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "initial", cwd=repo)
    return repo, git("rev-parse", "HEAD", cwd=repo)


def run_agent(
    tmp_path: Path,
    job: dict[str, Any] | str,
    name: str = "run",
    path: str | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    """Run `python -m agent` in a fresh root and home; its uploads land in local files."""
    base = tmp_path / name
    (base / "home").mkdir(parents=True, exist_ok=True)
    (base / "root").mkdir(exist_ok=True)
    full_env = {
        "PATH": path if path is not None else f"{STANDIN_BIN}{os.pathsep}{SYSTEM_PATH}",
        "PYTHONPATH": str(ROOT),  # this tree's agent, wherever the package was installed from
        "HOME": str(base / "home"),
        "LOCALFLY_ROOT": str(base / "root"),
        "LANG": "C.UTF-8",
        "CLAUDE_CODE_OAUTH_TOKEN": "oauth-test-token",
        "SORTIE_JOB": job if isinstance(job, str) else json.dumps(job),
        "SORTIE_REPORT_URL": f"file://{base / 'report.json'}",
        "SORTIE_ARCHIVE_URL": f"file://{base / 'archive.tar.gz'}",
        **(env or {}),
    }
    for upload in ("report.json", "archive.tar.gz"):
        (base / upload).unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "agent"],
        cwd=base,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = base / "report.json"
    assert report.exists(), proc.stdout + proc.stderr
    archive = base / "archive.tar.gz"
    return Run(
        proc.returncode,
        proc.stdout,
        proc.stderr,
        json.loads(report.read_text()),
        archive.read_bytes() if archive.exists() else None,
    )


def job(prompt: str, repos: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A job description as the orchestrator would send it."""
    return {"id": "job-1", "prompt": prompt, "repos": repos, **extra}


def test_success(tmp_path: Path, origin: tuple[Path, str]) -> None:
    repo, sha = origin
    run = run_agent(tmp_path, job("Review the code", [{"url": str(repo)}], model="sonnet"))
    assert run.code == 0, run.stderr
    result = run.result
    assert result["exit_code"] == 0 and result["error"] is None
    assert result["repos"] == [{"url": str(repo), "path": "demo", "commit": sha}]
    assert result["session_archive"] is True and run.archive is not None
    claude = result["claude"]
    assert claude["type"] == "result" and claude["subtype"] == "success"
    assert claude["is_error"] is False
    assert "Review the code" in claude["result"]
    assert "README.md, app.py" in claude["result"]
    turns = claude["num_turns"]
    assert f"sortie: claude exited 0 after {turns} turns, $0.0115" in run.stdout
    assert "report uploaded" in run.stderr


def test_commit_branch_path_and_several_repos(tmp_path: Path, origin: tuple[Path, str]) -> None:
    repo, first = origin
    (repo / "later.txt").write_text("later\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "later", cwd=repo)
    repos = [
        {"url": f"file://{repo}", "path": "old", "commit": first},
        {"url": str(repo), "branch": "main", "path": "nested/new"},
    ]
    run = run_agent(tmp_path, job("Compare", repos))
    assert run.code == 0, run.stderr
    assert [r["path"] for r in run.result["repos"]] == ["old", "nested/new"]
    assert run.result["repos"][0]["commit"] == first
    assert run.result["repos"][1]["commit"] == git("rev-parse", "HEAD", cwd=repo)
    # Several repos: claude runs in the workspace root and sees both.
    assert "nested, old" in run.result["claude"]["result"]


def test_error_exit_code_is_preserved(tmp_path: Path, origin: tuple[Path, str]) -> None:
    repo, _ = origin
    run = run_agent(tmp_path, job("Break [[error]]", [{"url": str(repo)}]))
    assert run.code == 1
    assert run.result["exit_code"] == 1
    assert run.result["claude"]["subtype"] == "error_during_execution"
    assert run.result["claude"]["is_error"] is True


def test_no_credentials_means_auth_error(tmp_path: Path) -> None:
    run = run_agent(tmp_path, job("x", []), env={"CLAUDE_CODE_OAUTH_TOKEN": ""})
    assert run.code == 1
    assert run.result["claude"]["result"] == "Invalid API key · Please run /login"
    assert "sortie: claude exited 1 after 0 turns, $0.0000 (error)" in run.stdout


def test_command_line(tmp_path: Path) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    argv_file = tmp_path / "argv.txt"
    (fake / "claude").write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{argv_file}'\n"
        'echo \'{"type": "result", "num_turns": 2, "total_cost_usd": 0.5}\'\n'
    )
    (fake / "claude").chmod(0o755)
    extra = {
        "model": "opus",
        "max_turns": 7,
        "allowed_tools": ["Read", "Bash(git:*)"],
        "max_cost_usd": 1.25,
        "resume_session_id": "abc",
        "json_schema": {"type": "object"},
        "unknown_key": True,
    }
    run = run_agent(tmp_path, job("Do it", [], **extra), path=f"{fake}{os.pathsep}{SYSTEM_PATH}")
    assert run.code == 0, run.stderr
    assert argv_file.read_text().splitlines() == [
        "-p",
        "Do it",
        "--output-format",
        "stream-json",
        "--verbose",
        "--model",
        "opus",
        "--max-turns",
        "7",
        "--allowedTools",
        "Read,Bash(git:*)",
        "--max-budget-usd",
        "1.25",
        "--resume",
        "abc",
        "--json-schema",
        '{"type": "object"}',
        # The repository's own settings files are not loaded; its CLAUDE.md still is.
        "--setting-sources",
        "user",
        "--add-dir",
        str(tmp_path / "run" / "root" / "workspace"),
    ]
    assert "sortie: claude exited 0 after 2 turns, $0.5000" in run.stdout
    assert run.result["repos"] == [] and run.result["claude"]["total_cost_usd"] == 0.5


def test_the_standin_claude_refuses_unknown_flags_and_takes_every_flag_the_agent_passes(
    tmp_path: Path,
) -> None:
    # As the real CLI does: an unknown option stops it before anything runs.
    standin = [sys.executable, str(STANDIN_BIN / "claude")]
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path), "CLAUDE_CODE_OAUTH_TOKEN": "t"}
    refused = subprocess.run(
        [*standin, "-p", "hi", "--no-such-flag"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "unknown option '--no-such-flag'" in refused.stderr
    # Every flag the agent passes is known, and a run past its budget stops as Claude's does.
    extra = {"model": "opus", "max_turns": 7, "allowed_tools": ["Read"], "max_cost_usd": 0.05}
    run = run_agent(tmp_path, job("Do it [[cost:0.2]]", [], **extra))
    claude = run.result["claude"]
    assert (claude["subtype"], claude["is_error"]) == ("error_max_budget_usd", True), run.stderr
    assert AgentReport.model_validate(run.result).error_kind() is ErrorKind.BUDGET


def test_missing_claude(tmp_path: Path, origin: tuple[Path, str]) -> None:
    repo, _ = origin
    run = run_agent(tmp_path, job("Hello", [{"url": str(repo)}]), path=SYSTEM_PATH)
    assert run.code == 127
    assert run.result["exit_code"] == 127 and run.result["claude"] is None
    assert "claude" in run.result["error"]


@pytest.mark.parametrize("bad", ["not json", "[]", '{"id": "x"}', '{"id": 1, "prompt": "p"}', ""])
def test_bad_job(tmp_path: Path, bad: str) -> None:
    run = run_agent(tmp_path, bad)
    assert run.code == 2
    assert run.result["exit_code"] == 2 and run.result["claude"] is None
    assert run.result["error"] and "error" in run.stderr


class _NotFound(BaseHTTPRequestHandler):
    """An HTTP git remote that records requests and has no repositories."""

    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_remote() -> Iterator[str]:
    """A loopback HTTP server answering 404 to every git request."""
    _NotFound.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_github_token_never_printed(tmp_path: Path, http_remote: str) -> None:
    token = "ghs_SuperSecretToken123"
    header = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    run = run_agent(
        tmp_path,
        # The token even appears in the URL path, so git's own error message would carry it.
        job("Hello", [{"url": f"{http_remote}/org/{token}.git"}]),
        env={
            "GITHUB_TOKEN": token,
            "GIT_CURL_VERBOSE": "1",  # makes git print request headers...
            "GIT_TRACE_REDACT": "0",  # ...without git's own redaction
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        },
    )
    assert run.code == 3
    assert run.result["claude"] is None and "clone" in run.result["error"]
    output = run.stdout + run.stderr + json.dumps(run.result)
    assert token not in output and header not in output
    assert "Authorization: Basic [redacted]" in run.stderr
    # The token did reach the server, but only as a header.
    assert _NotFound.seen and all(auth == f"Basic {header}" for _, auth in _NotFound.seen)


def test_token_not_sent_to_local_repos(tmp_path: Path, origin: tuple[Path, str]) -> None:
    repo, _ = origin
    run = run_agent(tmp_path, job("Hi", [{"url": str(repo)}]), env={"GITHUB_TOKEN": "ghs_x1"})
    assert run.code == 0
    assert "ghs_x1" not in run.stdout + run.stderr


def test_archive_and_restore(tmp_path: Path, origin: tuple[Path, str]) -> None:
    repo, sha = origin
    first_prompt = "Take notes [[write:notes.txt]]"
    first = run_agent(tmp_path, job(first_prompt, [{"url": str(repo)}]), name="first")
    assert first.code == 0, first.stderr
    assert first.archive is not None
    session = first.result["claude"]["session_id"]
    with tarfile.open(fileobj=io.BytesIO(first.archive), mode="r:gz") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        patch = tar.extractfile("repos/demo.patch").read()  # type: ignore[union-attr]
    assert manifest == {"repos": [{"url": str(repo), "path": "demo", "commit": sha}]}
    assert any(name.endswith(f"{session}.jsonl") for name in names)
    assert all(name.startswith(("claude-home", "repos/", "manifest.json")) for name in names)
    assert b"notes.txt" in patch

    # Meanwhile the origin moves on: the restore must still start from the archived commit.
    (repo / "README.md").write_text("# changed upstream\n")
    git("commit", "-q", "-am", "upstream", cwd=repo)

    restore = tmp_path / "second" / "root" / "restores" / "job-1.tar.gz"
    restore.parent.mkdir(parents=True)
    restore.write_bytes(first.archive)
    second = run_agent(
        tmp_path,
        job(
            "Continue",
            [{"url": str(repo)}],
            resume_session_id=session,
            restore_file="/restores/job-1.tar.gz",
        ),
        name="second",
    )
    assert second.code == 0, second.stderr
    claude = second.result["claude"]
    assert claude["session_id"] == session
    assert f"resumed session {session} (turn 2)" in claude["result"]
    assert "notes.txt" in claude["result"]
    workspace_repo = tmp_path / "second" / "root" / "workspace" / "demo"
    assert (workspace_repo / "notes.txt").read_text() == first_prompt
    assert (workspace_repo / "README.md").read_text() == "# demo\n"
    assert second.result["repos"][0]["commit"] == sha


def test_resume_of_unknown_session(tmp_path: Path) -> None:
    run = run_agent(tmp_path, job("Again", [], resume_session_id="nope"))
    assert run.code == 1
    assert run.result["claude"]["result"] == "No conversation found with session ID: nope"


def test_restore_refuses_unsafe_members(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("../escape.txt", "/abs.txt", "claude-home/ok.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    restore = tmp_path / "run" / "root" / "r.tgz"
    restore.parent.mkdir(parents=True)
    restore.write_bytes(buffer.getvalue())
    run = run_agent(tmp_path, job("Hi", [], restore_file="r.tgz"))
    assert run.code == 0, run.stderr
    assert (tmp_path / "run" / "home" / ".claude" / "ok.txt").read_text() == "hi"
    assert not (tmp_path / "run" / "escape.txt").exists()
    assert not (tmp_path / "run" / "home" / "escape.txt").exists()
    assert "skipping" in run.stderr


def test_claude_printing_no_json(tmp_path: Path) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "claude").write_text("#!/bin/sh\necho 'not json at all'\nexit 4\n")
    (fake / "claude").chmod(0o755)
    run = run_agent(tmp_path, job("Hi", []), path=f"{fake}{os.pathsep}{SYSTEM_PATH}")
    assert run.code == 4
    assert run.result["claude"] is None and run.result["error"] == "not json at all"
    assert "sortie: claude exited 4" in run.stdout


class _Bucket(BaseHTTPRequestHandler):
    """A loopback upload target: answers `failures` with their statuses first, then 200."""

    failures: list[int] = []
    bodies: dict[str, bytes] = {}
    tries: int = 0

    def do_PUT(self) -> None:
        type(self).tries += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.failures:
            self.send_response(self.failures.pop(0))
            self.end_headers()
            self.wfile.write(b"<Error><Code>Refused</Code></Error>")
            return
        self.bodies[self.path] = body
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def bucket() -> Iterator[str]:
    """The upload target's URL, fresh for the test."""
    _Bucket.failures, _Bucket.bodies, _Bucket.tries = [], {}, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_uploads_are_retried_until_they_land(tmp_path: Path, bucket: str) -> None:
    _Bucket.failures = [503, 500]
    env = {
        "SORTIE_REPORT_URL": f"{bucket}/report?X-Amz-Signature=abc",
        "SORTIE_ARCHIVE_URL": f"{bucket}/archive?X-Amz-Signature=def",
    }
    proc = _run_raw(tmp_path, job("Hi", []), env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(_Bucket.bodies["/report?X-Amz-Signature=abc"])
    assert report["exit_code"] == 0 and report["session_archive"] is True
    assert _Bucket.bodies["/archive?X-Amz-Signature=def"][:2] == b"\x1f\x8b", "a gzip archive"
    assert _Bucket.tries == 4, "two failures retried, then both uploads landed"
    assert "X-Amz-Signature" not in proc.stdout + proc.stderr, "presigned URLs are never printed"


def test_a_refused_upload_is_not_retried_and_keeps_the_exit_code(
    tmp_path: Path, bucket: str
) -> None:
    _Bucket.failures = [403, 403]
    env = {
        "SORTIE_REPORT_URL": f"{bucket}/report?X-Amz-Signature=abc",
        "SORTIE_ARCHIVE_URL": f"{bucket}/archive?X-Amz-Signature=def",
    }
    proc = _run_raw(tmp_path, job("Hi", []), env)
    assert proc.returncode == 0, "claude's own code: the worker decides the job failed"
    assert _Bucket.bodies == {} and _Bucket.tries == 2, "each refused once, never retried"
    assert "report upload refused (HTTP 403" in proc.stderr


def _run_raw(
    tmp_path: Path, job: dict[str, Any], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run the entrypoint with the given upload URLs (the env run_agent sets, overridden)."""
    base = tmp_path / "raw"
    (base / "home").mkdir(parents=True)
    (base / "root").mkdir()
    full_env = {
        "PATH": f"{STANDIN_BIN}{os.pathsep}{SYSTEM_PATH}",
        "PYTHONPATH": str(ROOT),
        "HOME": str(base / "home"),
        "LOCALFLY_ROOT": str(base / "root"),
        "LANG": "C.UTF-8",
        "CLAUDE_CODE_OAUTH_TOKEN": "oauth-test-token",
        "SORTIE_JOB": json.dumps(job),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "agent"],
        cwd=base,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_what_the_job_runs_never_sees_the_store_urls(tmp_path: Path) -> None:
    from agent.entrypoint import STORE_URLS, Machine

    urls = {name: f"https://store.example/{name}?sig=x" for name in STORE_URLS}
    env = {"GITHUB_TOKEN": "ghp_x", "LOCALFLY_ROOT": str(tmp_path), "HOME": str(tmp_path), **urls}
    machine = Machine(env)
    assert "SORTIE_SPEND_URL" in urls, "a verify loop's running spend is a store URL"
    assert not set(machine.child_env()) & {*urls, "GITHUB_TOKEN"}, "claude and verify"
    command = machine.command_env()
    assert command["GITHUB_TOKEN"] == "ghp_x" and not set(command) & set(urls), "a command job"
