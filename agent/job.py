"""The job a machine runs, read from SORTIE_JOB: its repos, its checkouts, what a restore got."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

MAX_ITERATIONS = 10


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
    network: tuple[str, ...] | None = ()
    """The domains the agent may reach besides its repositories' hosts; None: any."""
    secrets: tuple[str, ...] = ()
    """The names of the job's secrets: the entrypoint's, never the agent's."""


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
    network = data.get("network", [])
    if network is not None and not _strings(network):
        raise JobError("'network' must be a list of domains or null (open)")
    secrets = data.get("secrets") or []
    if not _strings(secrets):
        raise JobError("'secrets' must be a list of names")
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
        network=None if network is None else tuple(network),
        secrets=tuple(secrets),
    )


def _strings(value: Any) -> bool:
    """Whether `value` is a list of strings."""
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
