"""A machine's transfers with the object store: presigned uploads and downloads, restores."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from agent.job import (
    JobError,
    RepoSpec,
    Restored,
    SetupError,
    _parse_repo,
)

if TYPE_CHECKING:
    from agent.entrypoint import Scrubber

RESTORE_LIMIT = 256 << 20


UPLOAD_TRIES = 6


UPLOAD_BACKOFF_S = 0.5


UPLOAD_TIMEOUT_S = 120


class Transfers:
    """A machine's output and its transfers: scrubbed lines, presigned uploads and downloads,
    a session archive restored."""

    env: dict[str, str]
    scrub: Scrubber
    root: Path
    home: Path

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


@contextmanager
def _body(body: Path | bytes) -> Iterator[IO[bytes] | bytes]:
    """An upload's body: the bytes, or the file opened afresh for each try."""
    if isinstance(body, bytes):
        yield body
        return
    with body.open("rb") as handle:
        yield handle


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
