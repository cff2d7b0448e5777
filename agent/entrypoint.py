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
Exit codes: claude's own, 2 for a bad job, 3 when the workspace cannot be prepared, 4 when
`verify` still failed after the last iteration, 5 when a branch could not be pushed, 127 when
`claude` is not on PATH.
"""

from __future__ import annotations

import base64
import io
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
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import IO, Any

from agent import changes, verify
from agent.watch import Watched, watch

REPORT_URL = "SORTIE_REPORT_URL"
ARCHIVE_URL = "SORTIE_ARCHIVE_URL"
RESTORE_URL = "SORTIE_RESTORE_URL"
STORE_URLS = (REPORT_URL, ARCHIVE_URL, RESTORE_URL, changes.CHANGES_URL, verify.SPEND_URL)
"""Presigned URLs: secrets, never printed, and kept from claude's environment."""
SECRET_ENV = ("GITHUB_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_API_KEY", *STORE_URLS)
RESTORE_LIMIT = 256 << 20
ARCHIVE_LIMIT = RESTORE_LIMIT
"""Most bytes a session archive may hold unpacked: what a restore accepts, so any archive made
restores. ~/.claude keeps each session's whole JSONL transcript (every message and tool result)
and a snapshot of every file Claude edited, which a long session takes to many MB; the archive
is built on disk and streamed, so a machine's 256 MB of memory need not hold it."""
UPLOAD_TRIES = 6
UPLOAD_BACKOFF_S = 0.5
UPLOAD_TIMEOUT_S = 120
ERROR_LIMIT = 4000
EXIT_BAD_JOB = 2
EXIT_SETUP = 3
EXIT_NO_CLAUDE = 127
MAX_ITERATIONS = 10
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


class JobError(ValueError):
    """SORTIE_JOB is missing, is not JSON, or does not describe a job."""


class SetupError(RuntimeError):
    """The workspace could not be prepared: a clone, checkout or restore failed."""


@dataclass(frozen=True)
class RepoSpec:
    """One repository the job asks for."""

    url: str
    branch: str | None
    path: str
    commit: str | None


@dataclass(frozen=True)
class Job:
    """The job description read from SORTIE_JOB."""

    id: str
    prompt: str
    repos: tuple[RepoSpec, ...]
    model: str | None
    max_turns: int | None
    allowed_tools: tuple[str, ...]
    max_cost_usd: float | None
    resume_session_id: str | None
    restore_file: str | None
    verify: tuple[str, ...] | None = None
    max_iterations: int = 1
    push_branch: str | None = None
    json_schema: dict[str, Any] | None = None
    stall_timeout_s: float | None = None


@dataclass(frozen=True)
class Checkout:
    """A cloned repository and the commit its HEAD resolved to."""

    url: str
    path: str
    commit: str
    dir: Path

    def describe(self) -> dict[str, str]:
        """The repo as reported in the result and the archive manifest."""
        return {"url": self.url, "path": self.path, "commit": self.commit}


@dataclass
class Restored:
    """What a session archive brought back besides the Claude home: repos and their patches."""

    repos: list[RepoSpec] = field(default_factory=list)
    patches: dict[str, bytes] = field(default_factory=dict)


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


def _basic_auth(token: str) -> str:
    """The Basic credential GitHub accepts for a token over HTTPS."""
    return base64.b64encode(f"x-access-token:{token}".encode()).decode("ascii")


def _optional(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """data[key] when present and of `kind`, None when absent or null; JobError otherwise."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JobError(f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _check_path(path: str, what: str) -> str:
    """A relative path that stays inside its parent directory."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or str(pure) == ".":
        raise JobError(f"{what} {path!r} must be a relative path inside the workspace")
    return str(pure)


def _default_path(url: str) -> str:
    """The directory a clone of `url` gets when the job names none: its basename minus .git."""
    base = re.split(r"[/:\\]", url.rstrip("/"))[-1]
    return base.removesuffix(".git") or "repo"


def _parse_repo(index: int, item: Any) -> RepoSpec:
    """One repos[] entry, validated."""
    if isinstance(item, str):
        item = {"url": item}
    if not isinstance(item, dict) or not isinstance(item.get("url"), str) or not item["url"]:
        raise JobError(f"repos[{index}] needs a non-empty string 'url'")
    url: str = item["url"]
    branch = _optional(item, "branch", str)
    commit = _optional(item, "commit", str)
    for name, ref in (("branch", branch), ("commit", commit)):
        if ref is not None and (not ref or ref.startswith("-") or any(c.isspace() for c in ref)):
            raise JobError(f"repos[{index}].{name} {ref!r} is not a valid git ref")
    path = _check_path(_optional(item, "path", str) or _default_path(url), f"repos[{index}].path")
    return RepoSpec(url=url, branch=branch, path=path, commit=commit)


def parse_job(text: str | None) -> Job:
    """The job from the SORTIE_JOB JSON; unknown keys are ignored."""
    if not text:
        raise JobError("SORTIE_JOB is not set")
    try:
        data = json.loads(text)
    except ValueError as error:
        raise JobError(f"SORTIE_JOB is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise JobError("SORTIE_JOB must be a JSON object")
    for key in ("id", "prompt"):
        if not isinstance(data.get(key), str):
            raise JobError(f"{key!r} must be a string")
    repos_raw = data.get("repos") or []
    if not isinstance(repos_raw, list):
        raise JobError("'repos' must be a list")
    repos = tuple(_parse_repo(i, item) for i, item in enumerate(repos_raw))
    paths = [repo.path for repo in repos]
    if len(set(paths)) != len(paths):
        raise JobError(f"two repos share a path: {paths}")
    tools = data.get("allowed_tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise JobError("'allowed_tools' must be a list of strings")
    max_turns = _optional(data, "max_turns", int)
    max_cost = _optional(data, "max_cost_usd", (int, float))
    restore = _optional(data, "restore_file", str)
    check = _optional(data, "verify", list)
    if check is not None and (not check or not all(isinstance(a, str) for a in check)):
        raise JobError("'verify' must be a non-empty list of strings")
    iterations = _optional(data, "max_iterations", int) or 1
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise JobError(f"'max_iterations' must be 1 to {MAX_ITERATIONS}, not {iterations}")
    branch = _optional(data, "push_branch", str)
    if branch is not None and (not branch or branch.startswith("-") or ".." in branch):
        raise JobError(f"push_branch {branch!r} is not a valid branch name")
    stall = _optional(data, "stall_timeout_s", (int, float))
    if restore is not None and ".." in PurePosixPath(restore).parts:
        raise JobError(f"restore_file {restore!r} must not contain '..'")
    return Job(
        id=data["id"],
        prompt=data["prompt"],
        repos=repos,
        model=_optional(data, "model", str),
        max_turns=max_turns,
        allowed_tools=tuple(tools),
        max_cost_usd=None if max_cost is None else float(max_cost),
        resume_session_id=_optional(data, "resume_session_id", str),
        restore_file=restore,
        verify=tuple(check) if check is not None else None,
        max_iterations=iterations,
        push_branch=branch,
        json_schema=_optional(data, "json_schema", dict),
        stall_timeout_s=None if stall is None else float(stall),
    )


class Machine:
    """One run of the entrypoint: its environment, output and workspace."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.scrub = Scrubber(env)
        self.root = Path(env.get("LOCALFLY_ROOT") or "/")
        self.workspace = Path(env.get("SORTIE_WORKSPACE") or self.root / "workspace").absolute()
        self.home = Path(env.get("HOME") or Path.home())
        self.git_env = {**self.env, "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never"}
        self.checkouts: list[Checkout] = []

    # Output -------------------------------------------------------------------------------

    def note(self, message: str) -> None:
        """A scrubbed diagnostic line on stderr."""
        sys.stderr.write(self.scrub.text(f"sortie: {message}").rstrip("\n") + "\n")
        sys.stderr.flush()

    def say(self, line: str) -> None:
        """A scrubbed human line on stdout."""
        sys.stdout.write(self.scrub.text(line) + "\n")
        sys.stdout.flush()

    def upload(
        self, variable: str, what: str, body: Path | bytes, tries: int = UPLOAD_TRIES
    ) -> bool:
        """PUT `body` to the presigned URL in `variable`, retrying what a retry can help."""
        url = self.env.get(variable)
        if not url:
            self.note(f"no {variable}: the {what} goes nowhere")
            return False
        if url.startswith("file://"):
            target = Path(urllib.parse.urlsplit(url).path)
            target.write_bytes(body.read_bytes() if isinstance(body, Path) else body)
            return True
        size = body.stat().st_size if isinstance(body, Path) else len(body)
        for attempt in range(1, tries + 1):
            try:
                with _body(body) as payload:
                    request = urllib.request.Request(
                        url,
                        data=payload,
                        method="PUT",
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(size),
                        },
                    )
                    with urllib.request.urlopen(request, timeout=UPLOAD_TIMEOUT_S) as answer:
                        answer.read()
                return True
            except urllib.error.HTTPError as error:
                detail = error.read(300).decode("utf-8", errors="replace")
                why = f"HTTP {error.code} {detail}"
                if error.code < 500 and error.code not in (408, 429):
                    self.note(f"{what} upload refused ({why}); not retried")
                    return False
            except (urllib.error.URLError, OSError) as error:
                why = str(getattr(error, "reason", error))
            self.note(f"{what} upload failed (try {attempt} of {tries}): {why}")
            if attempt < tries:
                time.sleep(min(UPLOAD_BACKOFF_S * 2 ** (attempt - 1), 10.0))
        self.note(f"{what} upload gave up after {tries} tries")
        return False

    def download(self, variable: str, target: Path) -> None:
        """GET the presigned URL in `variable` into `target` (a follow-up's archive)."""
        url = self.env[variable]
        target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, UPLOAD_TRIES + 1):
            try:
                with (
                    urllib.request.urlopen(url, timeout=UPLOAD_TIMEOUT_S) as answer,
                    target.open("wb") as out,
                ):
                    shutil.copyfileobj(answer, out)
                return
            except urllib.error.HTTPError as error:
                if error.code < 500 and error.code not in (408, 429):
                    why = f"HTTP {error.code}"
                    raise SetupError(f"the session archive was refused ({why})") from None
            except (urllib.error.URLError, OSError) as error:
                self.note(f"archive download failed (try {attempt}): {error}")
            if attempt < UPLOAD_TRIES:
                time.sleep(min(UPLOAD_BACKOFF_S * 2 ** (attempt - 1), 10.0))
        raise SetupError(f"the session archive could not be downloaded in {UPLOAD_TRIES} tries")

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

    def restore(self, restore_file: str) -> Restored:
        """Unpack claude-home/ into $HOME/.claude; keep the manifest and patches for later."""
        path = self.root / restore_file.lstrip("/")
        restored = Restored()
        claude_home = self.home / ".claude"
        total = 0
        try:
            with tarfile.open(path, mode="r:gz") as tar:
                for member in tar:
                    name = _member_name(member.name)
                    total += member.size
                    if total > RESTORE_LIMIT:
                        raise SetupError(f"{restore_file} unpacks to more than {RESTORE_LIMIT}")
                    if name is None or not (member.isfile() or member.isdir()):
                        self.note(f"restore: skipping {member.name!r}")
                        continue
                    if name.parts[0] == "claude-home":
                        target = claude_home.joinpath(*name.parts[1:])
                        if member.isdir():
                            target.mkdir(parents=True, exist_ok=True)
                        else:
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(_read_member(tar, member))
                            target.chmod(member.mode & 0o700 | 0o600)
                    elif member.isfile() and str(name) == "manifest.json":
                        restored.repos = _manifest_repos(_read_member(tar, member))
                    elif member.isfile() and name.parts[0] == "repos" and name.suffix == ".patch":
                        repo_path = str(PurePosixPath(*name.parts[1:]))[: -len(".patch")]
                        restored.patches[repo_path] = _read_member(tar, member)
        except (OSError, tarfile.TarError, ValueError) as error:
            raise SetupError(f"cannot restore {restore_file}: {error}") from None
        self.note(f"restored {path} ({len(restored.repos)} repos)")
        return restored

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
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=self.child_env(),
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
            self.prepare(job)
        except (SetupError, OSError) as error:
            return self.fail(EXIT_SETUP, f"workspace setup failed: {error}")
        cwd = self.checkouts[0].dir if len(self.checkouts) == 1 else self.workspace
        self.note(f"job {job.id}: running claude in {cwd}")
        turn, code, problem, work = self.do_work(claude, job, cwd)
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

    def child_env(self) -> dict[str, str]:
        """The environment of what the job runs (claude, verify): no presigned URL in it."""
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


@contextmanager
def _body(body: Path | bytes) -> Iterator[IO[bytes] | bytes]:
    """An upload's body: the bytes, or the file opened afresh for each try."""
    if isinstance(body, bytes):
        yield body
        return
    with body.open("rb") as handle:
        yield handle


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


def _archivable(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Keep plain files and directories, never stored credentials; owner details dropped."""
    if not (info.isfile() or info.isdir()) or info.name.endswith(".credentials.json"):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add an in-memory file to a tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _member_name(name: str) -> PurePosixPath | None:
    """A member's path when it is safely relative, else None."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in name:
        return None
    return pure


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes."""
    handle = tar.extractfile(member)
    if handle is None:
        raise tarfile.TarError(f"cannot read {member.name}")
    with handle:
        return handle.read()


def _manifest_repos(data: bytes) -> list[RepoSpec]:
    """The repos a session archive's manifest lists, validated like job repos."""
    manifest = json.loads(data)
    repos = manifest.get("repos") if isinstance(manifest, dict) else None
    if not isinstance(repos, list):
        raise JobError("manifest.json has no 'repos' list")
    return [_parse_repo(i, item) for i, item in enumerate(repos)]


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


def main() -> int:
    """Run the job described by the environment; the return code is the process's exit code."""
    return Machine(os.environ).run()
