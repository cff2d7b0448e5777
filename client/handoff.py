"""A prompt job handed to a person: its repositories with its change, and its Claude session.

`starter.py handoff ID JOB` rebuilds on one's own machine what the job's machine had at its end:
each repository cloned at the commit the job started from with the job's change applied, laid
out as the machine's workspace was, and the job's Claude session put where the CLI looks for it
(`~/.claude/projects/<the directory, every other character than a letter or digit a dash>/`,
or under CLAUDE_CONFIG_DIR), so that `claude --resume <session id>` in that directory goes on
where the job stopped.

The session archive the machine left (sessions/<batch>/<job>/...: claude-home/, a patch per
repository and a manifest of them) holds both; it is kept while the batch runs, and after it
closes only with the batch's `keep_sessions`. Without it the repositories come from the job's
stored changes (changes/...), which are kept, and there is no session to resume.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from client.changes import StoredChanges, latest_turn
from sortie.models import JobResult
from sortie.store import ObjectStore


class HandoffError(RuntimeError):
    """The job cannot be handed off: why, in words for the person who asked."""


@dataclass(frozen=True)
class Repo:
    """One repository of the job: where it goes, its origin, its start commit and its change."""

    path: str
    url: str
    commit: str
    patch: bytes


@dataclass
class Handoff:
    """What was rebuilt: the directory to run in, the session and the command that continues."""

    workspace: Path
    cwd: Path
    session_id: str | None
    session_file: Path | None = None
    repos: list[Repo] = field(default_factory=list)

    @property
    def command(self) -> str | None:
        """The one command that continues the job, or None without a session."""
        if self.session_id is None or self.session_file is None:
            return None
        return f"cd {_quoted(self.cwd)} && claude --resume {self.session_id}"


def project_dir(cwd: Path, environ: dict[str, str] | None = None) -> Path:
    """Where the Claude CLI keeps the sessions of `cwd`."""
    env = os.environ if environ is None else environ
    home = Path(env["CLAUDE_CONFIG_DIR"]) if env.get("CLAUDE_CONFIG_DIR") else None
    base = home or Path(env.get("HOME") or Path.home()) / ".claude"
    return base / "projects" / re.sub(r"[^A-Za-z0-9]", "-", str(cwd))


async def handoff(store: ObjectStore, batch_id: str, result: JobResult, workspace: Path) -> Handoff:
    """Rebuild the job's workspace in `workspace` and restore its session; HandoffError if not."""
    turn = latest_turn(result)
    if turn.session_id is None and turn.changes is None:
        raise HandoffError(
            f"job {result.job_id} of {batch_id} has no session nor stored change to hand off "
            "(a command job, or one that has not finished)"
        )
    workspace = await asyncio.to_thread(workspace.absolute)
    if await asyncio.to_thread(_used, workspace):
        raise HandoffError(f"{workspace} is not empty: name a new directory with --dir")
    archive = await store.get(turn.archive_ref) if turn.archive_ref else None
    if archive is not None:
        repos, sessions = _from_archive(archive, turn.session_id)
    else:
        repos, sessions = await _from_changes(store, turn), {}
    done = Handoff(workspace=workspace, cwd=workspace, session_id=turn.session_id, repos=repos)
    await asyncio.to_thread(_rebuild, done, sessions)
    return done


def _used(workspace: Path) -> bool:
    return workspace.exists() and any(workspace.iterdir())


def _rebuild(done: Handoff, sessions: dict[str, bytes]) -> None:
    """Check the repositories out and put the session where the CLI finds it."""
    done.workspace.mkdir(parents=True, exist_ok=True)
    for repo in done.repos:
        _checkout(repo, done.workspace / repo.path)
    if len(done.repos) == 1:  # the machine ran Claude in its one repository, else the workspace
        done.cwd = done.workspace / done.repos[0].path
    if done.session_id is not None and sessions:
        target = project_dir(done.cwd.resolve())
        for name, data in sessions.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        done.session_file = target / f"{done.session_id}.jsonl"


def _from_archive(archive: bytes, session_id: str | None) -> tuple[list[Repo], dict[str, bytes]]:
    """The repositories (manifest and patches) and the session's files in a session archive."""
    manifest: dict[str, object] = {}
    patches: dict[str, bytes] = {}
    sessions: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()
                parts = name.parts
                if str(name) == "manifest.json":
                    manifest = json.loads(data)
                elif parts[0] == "repos" and name.suffix == ".patch":
                    patches[str(PurePosixPath(*parts[1:]))[: -len(".patch")]] = data
                elif session_id and parts[:2] == ("claude-home", "projects") and len(parts) > 3:
                    inside = PurePosixPath(*parts[3:])  # below the machine's project directory
                    if inside.parts[0] in (f"{session_id}.jsonl", session_id):
                        sessions[str(inside)] = data
    except (OSError, tarfile.TarError, ValueError) as error:
        raise HandoffError(f"the job's session archive cannot be read: {error}") from None
    listed = manifest.get("repos")
    repos = [
        Repo(str(r["path"]), str(r["url"]), str(r["commit"]), patches.get(str(r["path"]), b""))
        for r in (listed if isinstance(listed, list) else [])
        if isinstance(r, dict)
    ]
    return repos, sessions


async def _from_changes(store: ObjectStore, turn: JobResult) -> list[Repo]:
    """The repositories from the job's stored changes, when its session archive is gone."""
    data = await store.get(turn.changes.ref) if turn.changes and turn.changes.ref else None
    if data is None:
        raise HandoffError(
            f"job {turn.job_id}: neither its session archive nor its change is stored any more "
            "(keep_sessions keeps the archive after the batch closes)"
        )
    stored = StoredChanges.model_validate_json(data)
    return [
        Repo(r.path, r.url or "", r.commit or "", r.data() if r.patch else b"")
        for r in stored.repos
        if r.url and r.commit
    ]


def _checkout(repo: Repo, where: Path) -> None:
    """Clone the repository at its start commit and apply the job's change to it."""

    def git(*args: str, cwd: Path | None = None, data: bytes | None = None) -> None:
        ran = subprocess.run(["git", *args], cwd=cwd, input=data, capture_output=True, check=False)
        if ran.returncode != 0:
            why = ran.stderr.decode("utf-8", errors="replace").strip()[-500:]
            raise HandoffError(f"git {args[0]} for {repo.path} failed: {why}")

    git("clone", "--quiet", "--", repo.url, str(where))
    git("checkout", "--quiet", "--detach", repo.commit, cwd=where)
    if repo.patch.strip():
        git("apply", "--binary", "--whitespace=nowarn", "-", cwd=where, data=repo.patch)


def _quoted(path: Path) -> str:
    text = str(path)
    return (
        text if re.fullmatch(r"[A-Za-z0-9_./-]+", text) else "'" + text.replace("'", "'\\''") + "'"
    )
