"""What a prompt-job machine runs: clone the repos, run Claude Code headless, upload the outcome.

Standard library only: the machine image holds python3, git, node and the `claude` CLI.
What the orchestrator needs leaves through the object store, never through the logs: the
session archive (sessions and workspace changes, so a later run can resume) is PUT to
SORTIE_ARCHIVE_URL, then the report to SORTIE_REPORT_URL, presigned URLs the worker minted for
this attempt (no credential of the store reaches the machine); a follow-up's archive comes from
SORTIE_RESTORE_URL. With `verify` the job checks its own work (agent/verify.py); its changes
per repository go to SORTIE_CHANGES_URL and, with `push_branch`, to a branch of each
repository's origin (agent/changes.py). Uploads are retried on network errors, 5xx, 408 and
429; a report that never lands fails the job on the worker. A `file://` URL writes a local
file (running by hand, tests).
The CLI and `verify` run in Claude Code's sandbox (agent/sandbox.py), without the secrets the
entrypoint keeps for itself (the store's URLs, GITHUB_TOKEN, the job's named secrets).
Exit codes: claude's own, 2 for a bad job, 3 when the workspace cannot be prepared, 4 when
`verify` still failed after the last iteration, 5 when a branch could not be pushed, 6 when the
sandbox cannot start, 127 when `claude` is not on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from agent import artifacts, changes, limits, sandbox, verify
from agent.job import (
    Checkout,
    Job,
    JobError,
    RepoSpec,
    Restored,
    SetupError,
    _basic_auth,
    parse_job,
)
from agent.transfer import RESTORE_LIMIT, Transfers, _add_bytes, _archivable
from agent.watch import Watched, watch

REPORT_URL = "SORTIE_REPORT_URL"
ARCHIVE_URL = "SORTIE_ARCHIVE_URL"
RESTORE_URL = "SORTIE_RESTORE_URL"
STORE_URLS: tuple[str, ...] = (REPORT_URL, ARCHIVE_URL, RESTORE_URL, changes.CHANGES_URL)
STORE_URLS += (verify.SPEND_URL, *artifacts.URLS)
"""Presigned URLs: secrets, never printed, and kept from claude's environment."""
CLAUDE_CREDENTIALS = ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_API_KEY")
SECRET_ENV = ("GITHUB_TOKEN", *CLAUDE_CREDENTIALS, *STORE_URLS)
ARCHIVE_LIMIT = RESTORE_LIMIT
"""Most bytes a session archive may hold unpacked: what a restore accepts, so any archive made
restores. ~/.claude keeps each session's whole JSONL transcript (every message and tool result)
and a snapshot of every file Claude edited, which a long session takes to many MB; the archive
is built on disk and streamed, so a machine's 256 MB of memory need not hold it."""
ERROR_LIMIT = 4000
EXIT_BAD_JOB = 2
EXIT_SETUP = 3
EXIT_NO_CLAUDE = 127
REDACTED = "[redacted]"

_DIFF = (
    "diff",
    "--cached",
    "--binary",
    "--no-color",
    "--no-ext-diff",
    "--src-prefix=a/",
    "--dst-prefix=b/",
)
_USERINFO = re.compile(r"(://)[^/@\s:]+:[^/@\s]+@")


class Scrubber:
    """Replaces secret values (and the header form of the GitHub token) in anything printed."""

    def __init__(self, env: Mapping[str, str]) -> None:
        values = {env[name] for name in SECRET_ENV if env.get(name)}
        if token := env.get("GITHUB_TOKEN"):
            values.add(_basic_auth(token))
        self._values = sorted(values, key=len, reverse=True)

    def text(self, text: str) -> str:
        """`text` with every secret and URL password replaced."""
        for value in self._values:
            text = text.replace(value, REDACTED)
        return _USERINFO.sub(rf"\1{REDACTED}@", text)

    def holds(self, data: bytes) -> bool:
        """Whether `data` holds a secret value as it is (a file Claude wrote one into)."""
        return any(value.encode() in data for value in self._values)

    def value(self, value: Any) -> Any:
        """A JSON-like value with every string scrubbed, so no secret reaches the logs."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        return value


class Machine(Transfers):
    """One run of the entrypoint: its environment, output and workspace."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.scrub = Scrubber(env)
        self.root = Path(env.get("LOCALFLY_ROOT") or "/")
        self.workspace = Path(env.get("SORTIE_WORKSPACE") or self.root / "workspace").absolute()
        self.home = Path(env.get("HOME") or Path.home())
        self.git_env = {**self.env, "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never"}
        self.checkouts: list[Checkout] = []
        self.sandbox: sandbox.Sandbox | None = None

    # Output -------------------------------------------------------------------------------

    def result(
        self,
        exit_code: int,
        claude: dict[str, Any] | None,
        error: str | None,
        session_archive: bool = False,
        work: Mapping[str, Any] | None = None,
        watched: Watched | None = None,
    ) -> int:
        """Upload the report (secrets scrubbed) and hand back the exit code, whatever happened:
        a report that did not land fails the job on the worker."""
        body = {
            "exit_code": exit_code,
            "claude": claude,
            "error": error,
            "repos": [checkout.describe() for checkout in self.checkouts],
            "session_archive": session_archive,
            **(work or {}),
        }
        if watched is not None and watched.stalled:
            body.update(stalled=True, session_id=watched.session_id)
        resets = limits.reset_time(watched.resets_at if watched else None, claude, _now())
        if resets is not None:
            body["resets_at"] = resets
        if self.upload(REPORT_URL, "report", json.dumps(self.scrub.value(body)).encode("utf-8")):
            self.note("report uploaded")
        return exit_code

    def fail(self, exit_code: int, error: str) -> int:
        """Report a failure that kept claude from running."""
        self.note(f"error: {error}")
        return self.result(exit_code, None, self.scrub.text(error))

    # Git ----------------------------------------------------------------------------------

    def git(
        self,
        args: Sequence[str],
        cwd: Path,
        url: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run git, echoing its scrubbed output to stderr; `url` gets the token header."""
        argv = ["git", *self._auth(url), *args]
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env or self.git_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        for stream in (proc.stdout if args[0] not in ("diff", "rev-parse") else b"", proc.stderr):
            for line in stream.decode("utf-8", errors="replace").splitlines():
                self.note(f"git: {line}")
        return proc

    def _auth(self, url: str | None) -> list[str]:
        """`-c http.<origin>/.extraHeader=...` for an HTTP(S) URL when GITHUB_TOKEN is set.

        Scoped to the repo's own origin so the token never goes to any other host.
        """
        token = self.env.get("GITHUB_TOKEN")
        if not token or url is None:
            return []
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return []
        origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"
        return ["-c", f"http.{origin}.extraHeader=Authorization: Basic {_basic_auth(token)}"]

    def git_ok(self, args: Sequence[str], cwd: Path, url: str | None = None) -> bytes:
        """Run git and return its stdout, or raise SetupError naming the command."""
        proc = self.git(args, cwd, url)
        if proc.returncode != 0:
            raise SetupError(f"git {args[0]} failed (exit {proc.returncode}) in {cwd}")
        return proc.stdout

    def clone(self, spec: RepoSpec) -> Checkout:
        """Clone one repo into the workspace, check out its commit, and record HEAD."""
        dest = self.workspace / spec.path
        if dest.exists() or dest.is_symlink():
            self.note(f"removing stale {dest}")
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            else:
                dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        branch = [f"--branch={spec.branch}"] if spec.branch else []
        url = spec.url
        proc = self.git(["clone", *branch, "--", url, str(dest)], self.workspace, url)
        if proc.returncode != 0:
            raise SetupError(f"git clone of {url} failed (exit {proc.returncode})")
        checkout = ["checkout", "--detach"]
        if spec.commit and self.git([*checkout, spec.commit], dest).returncode != 0:
            # Not in the clone (e.g. an unadvertised commit): ask for it by name.
            self.git_ok(["fetch", "origin", spec.commit], dest, url)
            self.git_ok([*checkout, "FETCH_HEAD"], dest)
        head = self.git_ok(["rev-parse", "HEAD"], dest).decode("ascii").strip()
        return Checkout(url=url, path=spec.path, commit=head, dir=dest)

    def patch(self, checkout: Checkout) -> bytes:
        """The workspace's changes since the recorded commit, untracked files included.

        A throwaway index keeps whatever the agent staged in the real one untouched.
        """
        git_dir = checkout.dir
        index = self.git_ok(["rev-parse", "--git-path", "index"], git_dir).decode().strip()
        with tempfile.TemporaryDirectory(prefix="sortie-index-") as tmp:
            scratch = Path(tmp) / "index"
            if (git_dir / index).is_file():
                shutil.copyfile(git_dir / index, scratch)
            env = {**self.git_env, "GIT_INDEX_FILE": str(scratch)}
            staged = self.git(["add", "-A"], git_dir, env=env)
            if staged.returncode != 0:
                raise SetupError(f"git add failed (exit {staged.returncode}) in {git_dir}")
            diff = self.git([*_DIFF, checkout.commit], git_dir, env=env)
            if diff.returncode != 0:
                raise SetupError(f"git diff failed (exit {diff.returncode}) in {git_dir}")
            return diff.stdout

    # Session archives ----------------------------------------------------------------------

    def archive(self, path: Path) -> int:
        """Write the session archive to `path` (claude-home/, repos/<path>.patch, manifest.json)
        and return how many bytes it unpacks to."""
        total = 0

        def counted(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            nonlocal total
            kept = _archivable(info)
            if kept is not None:
                total += kept.size
                if total > ARCHIVE_LIMIT:
                    raise SetupError(f"it unpacks to more than {ARCHIVE_LIMIT} bytes")
            return kept

        with tarfile.open(path, mode="w:gz") as tar:
            claude_home = self.home / ".claude"
            if claude_home.is_dir():
                tar.add(claude_home, arcname="claude-home", filter=counted)
            for checkout in self.checkouts:
                patch = self.patch(checkout)
                total += len(patch)
                if total > ARCHIVE_LIMIT:
                    raise SetupError(f"it unpacks to more than {ARCHIVE_LIMIT} bytes")
                _add_bytes(tar, f"repos/{checkout.path}.patch", patch)
            manifest = {"repos": [checkout.describe() for checkout in self.checkouts]}
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode())
        return total

    def apply(self, checkout: Checkout, patch: bytes) -> None:
        """Replay a restored patch onto a fresh clone."""
        if not patch.strip():
            return
        with tempfile.NamedTemporaryFile(prefix="sortie-", suffix=".patch") as handle:
            handle.write(patch)
            handle.flush()
            self.git_ok(["apply", "--binary", "--whitespace=nowarn", handle.name], checkout.dir)

    # Claude --------------------------------------------------------------------------------

    def run_claude(self, claude: str, job: Job, cwd: Path) -> Watched:
        """Run the CLI headless, its events watched (agent/watch.py): one log line each, the
        result kept, the CLI stopped once it stalls; stderr passed through scrubbed."""
        argv = [claude, "-p", job.prompt, "--output-format", "stream-json", "--verbose"]
        if job.model:
            argv += ["--model", job.model]
        if job.max_turns is not None:
            argv += ["--max-turns", str(job.max_turns)]
        if job.allowed_tools:
            argv += ["--allowedTools", ",".join(job.allowed_tools)]
        if job.max_cost_usd is not None:
            argv += ["--max-budget-usd", f"{job.max_cost_usd:g}"]
        if job.resume_session_id:
            argv += ["--resume", job.resume_session_id]
        if job.json_schema is not None:
            argv += ["--json-schema", json.dumps(job.json_schema)]
        assert self.sandbox is not None, "the sandbox is made before claude runs"
        proc = self.sandbox.start_claude(
            argv,
            cwd=cwd,
            env=self.child_env(keep=CLAUDE_CREDENTIALS),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pump = threading.Thread(target=self._pump, args=(proc.stderr,), daemon=True)
        pump.start()
        with _forward_signals(proc):
            watched = watch(proc, job.stall_timeout_s, self.say)
        pump.join()
        return watched

    def _pump(self, stream: IO[bytes]) -> None:
        """Copy claude's stderr to ours line by line, secrets scrubbed."""
        for raw in stream:
            sys.stderr.write(self.scrub.text(raw.decode("utf-8", errors="replace")))
            sys.stderr.flush()

    # The run -------------------------------------------------------------------------------

    def prepare(self, job: Job) -> None:
        """Restore (when asked), clone every repo and replay restored patches."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        if job.restore_file and self.env.get(RESTORE_URL):
            self.download(RESTORE_URL, self.root / job.restore_file.lstrip("/"))
        restored = self.restore(job.restore_file) if job.restore_file else Restored()
        saved = {repo.path: repo for repo in restored.repos}
        specs = [
            replace(spec, commit=saved[spec.path].commit) if spec.path in saved else spec
            for spec in job.repos
        ]
        asked = {spec.path for spec in specs}
        specs += [repo for repo in restored.repos if repo.path not in asked]
        for spec in specs:
            checkout = self.clone(spec)
            self.checkouts.append(checkout)
            if spec.path in restored.patches:
                self.apply(checkout, restored.patches[spec.path])
        for path in restored.patches.keys() - {spec.path for spec in specs}:
            self.note(f"restore: no repo for patch {path!r}, ignored")

    def run(self) -> int:
        """The whole machine run; returns the process exit code."""
        try:
            job = parse_job(self.env.get("SORTIE_JOB"))
        except JobError as error:
            return self.fail(EXIT_BAD_JOB, f"bad job: {error}")
        claude = shutil.which("claude", path=self.env.get("PATH", os.defpath))
        if claude is None:
            return self.fail(EXIT_NO_CLAUDE, "the claude CLI is not on PATH")
        try:
            self.sandbox = sandbox.Sandbox.make(self.env, job, self.workspace, SECRET_ENV)
        except sandbox.SandboxUnavailable as error:
            self.note(f"error: the sandbox cannot start: {error}")
            body = {"sandbox_unavailable": True}
            return self.result(
                sandbox.EXIT_SANDBOX_UNAVAILABLE, None, f"sandbox: {error}", work=body
            )
        try:
            self.prepare(job)
        except (SetupError, OSError) as error:
            return self.fail(EXIT_SETUP, f"workspace setup failed: {error}")
        cwd = self.checkouts[0].dir if len(self.checkouts) == 1 else self.workspace
        self.note(f"job {job.id}: running claude in {cwd}")
        collector = artifacts.start(self, cwd)
        turn, code, problem, work = self.do_work(claude, job, cwd)
        if collector is not None:
            collector.send()
        archived = self.send_archive()
        self.say(summary(code, turn.output))
        return self.result(code, turn.output, problem, archived, work, turn.watched)

    def claude_turn(self, claude: str, job: Job, cwd: Path) -> verify.Turn:
        """One run of the CLI, watched: its exit code, its result and why there is none."""
        watched = self.run_claude(claude, job, cwd)
        problem = None
        if watched.stalled:
            problem = f"no event from claude for {job.stall_timeout_s:g}s (stall_timeout): stopped"
        elif watched.result is None:
            problem = "\n".join(watched.other)[:ERROR_LIMIT] or "claude printed no result"
        return verify.Turn(watched.exit_code, watched.result, problem, watched)

    def do_work(
        self, claude: str, job: Job, cwd: Path
    ) -> tuple[verify.Turn, int, str | None, dict[str, Any]]:
        """Claude (and the verify loop), then the changes stored and the branch pushed: Claude's
        last turn, the exit code, the failure and what the report adds about the work."""
        work: dict[str, Any] = {}
        failure: str | None = None
        if job.verify is None:
            turn = self.claude_turn(claude, job, cwd)
            finished = turn.ok
        else:
            loop = verify.run(self, job, cwd, lambda asked: self.claude_turn(claude, asked, cwd))
            turn, finished = loop.turn, loop.passed
            work["iterations"] = loop.iterations
            work["verify_failed"] = loop.failed
            if loop.failed:
                failure = loop.failure
        code, problem = turn.code, turn.problem
        if failure is not None:
            code, problem = verify.EXIT_VERIFY_FAILED, failure
        work["changes"], work["changes_uploaded"] = changes.capture(self)
        if job.push_branch and finished:
            withheld = {repo["path"] for repo in work["changes"] if repo.get("withheld")}
            work["push"] = changes.push(self, job.push_branch, job.id, withheld)
            failed = [entry["error"] for entry in work["push"] if entry.get("error")]
            if failed:
                code, problem = changes.EXIT_PUSH_FAILED, "; ".join(failed)
        return turn, code, problem, work

    def child_env(self, keep: Sequence[str] = ()) -> dict[str, str]:
        """The environment of what the job runs (claude, verify): no secret of the entrypoint's
        (presigned URLs, GITHUB_TOKEN, the job's named secrets), nor a Claude credential unless
        kept (the CLI's own, hidden from its commands by the sandbox)."""
        hidden = set(SECRET_ENV) | set(self.sandbox.secrets if self.sandbox else ())
        return {k: v for k, v in self.env.items() if k not in hidden - set(keep)}

    def command_env(self) -> dict[str, str]:
        """The environment of a command job's own command: its secrets are its to use (as
        without the entrypoint), the store's presigned URLs are not."""
        return {k: v for k, v in self.env.items() if k not in STORE_URLS}

    def send_archive(self) -> bool:
        """Build the session archive on disk and upload it, unless too big or it cannot be."""
        with tempfile.TemporaryDirectory(prefix="sortie-archive-") as tmp:
            path = Path(tmp) / "session.tar.gz"
            try:
                self.archive(path)
            except (SetupError, OSError, tarfile.TarError) as error:
                self.note(f"no session archive: {error}")
                return False
            return self.upload(ARCHIVE_URL, "session archive", path)


def _now() -> datetime:
    """The machine's clock, in UTC."""
    return datetime.now(UTC)


def summary(code: int, output: Mapping[str, Any] | None) -> str:
    """The one human line printed before the report is uploaded."""
    if output is None:
        return f"sortie: claude exited {code} without a JSON result"
    turns = output.get("num_turns")
    cost = output.get("total_cost_usd")
    line = f"sortie: claude exited {code}"
    if isinstance(turns, int):
        line += f" after {turns} turns"
    if isinstance(cost, int | float):
        line += f", ${cost:.4f}"
    if output.get("is_error"):
        subtype = output.get("subtype")
        line += f" (error: {subtype})" if subtype and subtype != "success" else " (error)"
    return line


@contextmanager
def _forward_signals(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """While claude runs, pass SIGTERM/SIGINT to it so we still report and archive."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, forward)
    except ValueError:
        pass  # Not the main thread: leave signals alone.
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv: Sequence[str] = ()) -> int:
    """Run the job described by the environment, or the command job `argv` (one with
    artifacts, agent/artifacts.py); the return code is the process's exit code."""
    if argv:
        return artifacts.run_command(Machine(os.environ), argv)
    return Machine(os.environ).run()
