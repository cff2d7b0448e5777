"""The files of a git checkout worth reviewing, as the machines will see them.

Machines clone the checkout's HEAD commit, so the list comes from git's tree at HEAD, not from
the working tree: uncommitted edits and untracked files would not exist on a machine. Binary,
vendored, generated, lock and empty files are left out; `Checkout.excluded` counts them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field

VENDORED_DIRS = frozenset(
    {
        "vendor",
        "vendors",
        "third_party",
        "node_modules",
        "dist",
        "build",
        ".venv",
        "venv",
        "__pycache__",
        "site-packages",
    }
)
"""Directory names whose contents are somebody else's code or build output."""

LOCK_FILES = frozenset(
    {
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        "poetry.lock",
        "Pipfile.lock",
        "pdm.lock",
        "uv.lock",
        "Cargo.lock",
        "Gemfile.lock",
        "composer.lock",
        "go.sum",
    }
)
"""Generated dependency pins: long, machine-written, nothing to review."""

LANGUAGES: dict[str, str] = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".jsx": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".mts": "typescript",
    ".cts": "typescript",
    ".go": "go",
    ".rs": "rust",
    ".java": "java",
    ".kt": "kotlin",
    ".kts": "kotlin",
    ".scala": "scala",
    ".swift": "swift",
    ".cs": "csharp",
    ".php": "php",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hh": "cpp",
    ".hpp": "cpp",
    ".hxx": "cpp",
    ".rb": "ruby",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "rst",
    ".yml": "yaml",
    ".yaml": "yaml",
    ".json": "json",
    ".toml": "toml",
    ".ini": "ini",
    ".cfg": "ini",
    ".html": "html",
    ".htm": "html",
    ".css": "css",
    ".scss": "css",
    ".sass": "css",
    ".less": "css",
    ".sql": "sql",
    ".proto": "protobuf",
    ".tf": "terraform",
}
"""Language by file extension (lower-cased); anything else is `other`."""

LANGUAGE_NAMES: dict[str, str] = {
    "Dockerfile": "dockerfile",
    "Makefile": "make",
    "GNUmakefile": "make",
    "Gemfile": "ruby",
    "Rakefile": "ruby",
}
"""Language by whole file name, for files without a telling extension."""

_REGULAR_MODES = ("100644", "100755")
_ATTRIBUTES = ("linguist-vendored", "linguist-generated")


class AnalysisError(ValueError):
    """A codebase that cannot be analysed, or arguments that make no sense; the message says why."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceFile(StrictModel):
    """One committed file to review."""

    path: str = Field(min_length=1)
    size: int = Field(ge=0)
    language: str


class Checkout(StrictModel):
    """A git checkout's reviewable files at HEAD, and where the machines can clone it from."""

    root: str
    commit: str
    remote: str | None
    dirty: bool
    """Uncommitted changes or untracked files in the work tree: the machines will not see them."""
    scope: str = ""
    """The subdirectory analysed, relative to `root` ("" for the whole repository)."""
    files: list[SourceFile]
    excluded: dict[str, int] = {}
    """How many committed files were left out, by reason."""


def language_of(path: str) -> str:
    """The language of a file, from its name or extension."""
    pure = PurePosixPath(path)
    return LANGUAGE_NAMES.get(pure.name) or LANGUAGES.get(pure.suffix.lower(), "other")


def _git(cwd: Path, *args: str, stdin: bytes | None = None) -> bytes:
    """Run git in `cwd` and return its stdout; AnalysisError when git is missing or fails."""
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(cwd), *args],
            input=stdin,
            capture_output=True,
            check=True,
        )
    except FileNotFoundError:
        raise AnalysisError("git is not installed (or not on PATH)") from None
    except subprocess.CalledProcessError as error:
        message = error.stderr.decode(errors="replace").strip() or f"exit {error.returncode}"
        raise AnalysisError(f"git {args[0]} failed in {cwd}: {message}") from None
    return done.stdout


def _records(output: bytes) -> list[bytes]:
    """The NUL-terminated records of a `-z` output."""
    return [record for record in output.split(b"\0") if record]


def _toplevel(path: Path) -> tuple[Path, bytes]:
    """The work tree's root and PATH's position in it; AnalysisError when PATH is no checkout."""
    if not path.is_dir():
        raise AnalysisError(f"no such directory: {path}")
    try:
        out = _git(path, "rev-parse", "--show-toplevel", "--show-prefix")
    except AnalysisError as error:
        if "not a git repository" in str(error):
            raise AnalysisError(f"not a git repository: {path}") from None
        raise AnalysisError(f"not a git checkout: {path} ({error})") from None
    lines = out.split(b"\n")
    return Path(os.fsdecode(lines[0])), lines[1] if len(lines) > 1 else b""


def _commit(root: Path, ref: str) -> str:
    """The full sha `ref` names; AnalysisError when it names no commit (or none exists yet)."""
    try:
        return _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip()
    except AnalysisError:
        if ref == "HEAD":
            raise AnalysisError(f"the repository has no commit yet: {root}") from None
        raise AnalysisError(f"{ref!r} names no commit in {root}") from None


def _remote(root: Path) -> str | None:
    """The url of `origin`, None when there is no such remote."""
    if "origin" not in _git(root, "remote").decode().split():
        return None
    return _git(root, "remote", "get-url", "origin").decode().strip() or None


def _binary_paths(root: Path, commit: str) -> set[bytes]:
    """Paths at HEAD that git's diff machinery deems binary (numstat shows them as `-`)."""
    empty_tree = _git(root, "hash-object", "-t", "tree", "--stdin", stdin=b"").decode().strip()
    out = _git(
        root,
        "diff",
        "--numstat",
        "-z",
        "--no-renames",
        "--no-textconv",
        "--no-ext-diff",
        "--no-relative",
        empty_tree,
        commit,
    )
    binary: set[bytes] = set()
    for record in _records(out):
        added, _, rest = record.partition(b"\t")
        _, _, path = rest.partition(b"\t")
        if added == b"-":
            binary.add(path)
    return binary


def _attributed(root: Path, paths: list[bytes]) -> dict[bytes, str]:
    """Paths that git attributes mark linguist-vendored or -generated, with the reason."""
    if not paths:
        return {}
    # `--source HEAD` needs git 2.40; the index holds HEAD's .gitattributes unless one is staged.
    stdin = b"\0".join(paths)
    out = _git(root, "check-attr", "-z", "--stdin", "--cached", *_ATTRIBUTES, stdin=stdin)
    fields = out.split(b"\0")
    marked: dict[bytes, str] = {}
    for i in range(0, len(fields) - 2, 3):
        path, attribute, value = fields[i], fields[i + 1].decode(), fields[i + 2]
        if value in (b"set", b"true") and path not in marked:
            marked[path] = attribute.removeprefix("linguist-")
    return marked


def _dirty(root: Path, prefix: bytes) -> bool:
    """Whether the work tree (within the analysed subdirectory) differs from HEAD."""
    pathspec = ["--", ":(literal)" + os.fsdecode(prefix)] if prefix else []
    return bool(_git(root, "status", "--porcelain", "-z", *pathspec).strip(b"\0"))


def _excluded_reason(path: str, mode: str, size: int) -> str | None:
    """Why a committed file is not worth reviewing, from its path, mode and size alone."""
    if mode not in _REGULAR_MODES:
        return "not a regular file"
    pure = PurePosixPath(path)
    if any(part in VENDORED_DIRS for part in pure.parts[:-1]):
        return "vendored"
    if pure.name in LOCK_FILES:
        return "lock file"
    if size == 0:
        return "empty"
    return None


def read_checkout(path: Path, ref: str = "HEAD") -> Checkout:
    """The reviewable files committed at `ref` in PATH, a checkout or a directory inside one."""
    root, prefix = _toplevel(path.resolve())
    commit = _commit(root, ref)
    # Ignored files are never committed, so a listing of the commit's tree leaves them out.
    listing = _git(root, "ls-tree", "-r", "-z", "-l", "--full-tree", commit)
    excluded: dict[str, int] = {}
    candidates: list[tuple[bytes, str, int]] = []
    for record in _records(listing):
        meta, _, raw_path = record.partition(b"\t")
        mode, _kind, _sha, size_text = meta.decode().split()
        if not raw_path.startswith(prefix):
            continue
        try:
            name = raw_path.decode()
        except UnicodeDecodeError:
            excluded["undecodable name"] = excluded.get("undecodable name", 0) + 1
            continue
        size = int(size_text) if size_text.isdigit() else 0
        reason = _excluded_reason(name, mode, size)
        if reason:
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        candidates.append((raw_path, name, size))
    binary = _binary_paths(root, commit) if candidates else set()
    marked = _attributed(root, [raw for raw, _, _ in candidates if raw not in binary])
    files: list[SourceFile] = []
    for raw_path, name, size in candidates:
        reason = "binary" if raw_path in binary else marked.get(raw_path)
        if reason:
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        files.append(SourceFile(path=name, size=size, language=language_of(name)))
    files.sort(key=lambda f: f.path)
    return Checkout(
        root=str(root),
        commit=commit,
        remote=_remote(root),
        dirty=ref == "HEAD" and _dirty(root, prefix),
        scope=prefix.decode(errors="replace").rstrip("/"),
        files=files,
        excluded=dict(sorted(excluded.items())),
    )


def changed_files(checkout: Checkout, since: str) -> set[str]:
    """Paths added, changed or deleted between commit `since` and the checkout's commit.

    A rename counts as a deletion and an addition, so both parts it touches are reviewed again.
    """
    root = Path(checkout.root)
    try:
        _git(root, "cat-file", "-e", f"{since}^{{commit}}")
    except AnalysisError:
        raise AnalysisError(
            f"commit {since[:12]} is not in {root}: fetch it, or analyse without --since"
        ) from None
    diff = _git(root, "diff", "--name-only", "-z", "--no-renames", since, checkout.commit)
    return {os.fsdecode(record) for record in _records(diff)}
