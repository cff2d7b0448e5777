"""Blobs kept out of workflow history: long answers and session archives.

History holds a job's small result and a key into this store; the worker writes the blob when it
collects the job, and `starter.py results` reads it back in full. Keys are deterministic per
(batch, job, turn, attempt), so a collect retried after a crash rewrites the same blob instead of
adding one. The store is a directory (`SORTIE_STATE_DIR/blobs`); worker and starter share it on
one host, or through a shared volume in production.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class BlobStore:
    """A directory of blobs addressed by slash-separated keys; writes are atomic."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def put(self, key: str, data: bytes) -> str:
        """Write `data` under `key` (replacing any earlier blob) and return the key."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes | None:
        """The blob under `key`, or None when there is none (never written, or expired)."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def prefixes(self, prefix: str) -> list[str]:
        """The keys of the directories directly under `prefix` (e.g. one per batch)."""
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(f"{prefix}/{child.name}" for child in base.iterdir() if child.is_dir())

    def delete(self, prefix: str) -> bool:
        """Delete every blob under `prefix`; return whether there was anything."""
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
            return True
        if path.exists():
            path.unlink()
            return True
        return False

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key) or ".." in key.split("/"):
            raise ValueError(f"invalid blob key {key!r}")
        return self.root / key


def answer_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where a job's full answer is kept."""
    return f"answers/{batch_id}/{job_id}/t{turn}-a{attempt}.txt"


def log_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where the tail of a job attempt's logs is kept."""
    return f"logs/{batch_id}/{job_id}/t{turn}-a{attempt}.txt"


SESSIONS = "sessions"


def session_prefix(batch_id: str) -> str:
    """Where a batch's session archives are kept: deleted with the batch unless kept longer."""
    return f"{SESSIONS}/{batch_id}"


def session_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where the workspace and Claude session a job's turn left are kept."""
    return f"{session_prefix(batch_id)}/{job_id}/t{turn}-a{attempt}.tar.gz"
