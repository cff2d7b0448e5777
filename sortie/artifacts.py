"""A job's artifacts: where they are kept, what a result says of them, and how they are written out.

The machine's agent (agent/artifacts.py) uploads the files a job's `artifacts` globs name as one
tar.gz, then an index of them, through presigned URLs the worker minted; the worker reads the
index into the job's result (`Artifacts`); `starter.py artifacts` writes the files out, their
paths kept.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from sortie.store import ObjectStore

DEFAULT_MAX_BYTES = 100 << 20
"""`artifacts_max` unless the job says otherwise: 100 MB a job."""
LISTED = 10
"""Files a result names one by one (it rides in the chunk's history); the index lists all."""
PATH_CHARS = 200
"""How much of a listed file's path a result keeps (the index keeps it whole)."""
GRACE_MOST_S = 60.0
GRACE_LEAST_S = 3.0


class ArtifactsUnavailable(LookupError):
    """The job has no artifacts to write out, or they are no longer in the store."""


class ArtifactFile(BaseModel):
    """One file: its path relative to the job's working directory, and its size in bytes."""

    model_config = ConfigDict(extra="ignore")

    path: str
    size: int = 0
    why: str | None = None
    """Why it was left out: `artifacts_max`, `holds a secret`, or it could not be read."""


class ArtifactIndex(BaseModel):
    """What the agent uploaded beside the files: every file in the archive, and those left out."""

    model_config = ConfigDict(extra="ignore")

    files: list[ArtifactFile] = []
    bytes: int = 0
    left_out: list[ArtifactFile] = []
    left_out_count: int = 0
    left_out_bytes: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    timed_out: bool = False
    error: str | None = None


class Artifacts(BaseModel):
    """A job attempt's artifacts as its result keeps them: the archive's key, counts, names."""

    model_config = ConfigDict(extra="forbid")

    ref: str
    """The tar.gz in the object store."""
    index_ref: str
    count: int = 0
    bytes: int = 0
    files: list[ArtifactFile] = []
    """The first LISTED files; `starter.py artifacts` writes (and names) them all."""
    left_out_count: int = 0
    left_out_bytes: int = 0
    collected_at_timeout: bool = False
    error: str | None = None

    def describe(self) -> str:
        """`3 files, 1.2 MB (2 left out)`, as the results show it."""
        text = f"{self.count} file{'' if self.count == 1 else 's'}, {size_text(self.bytes)}"
        if self.left_out_count:
            text += f" ({self.left_out_count} left out, {size_text(self.left_out_bytes)})"
        return text


def listing(kept: Artifacts) -> list[str]:
    """The files a result names, with sizes, and how many more there are."""
    lines = [f"  {f.path}  {size_text(f.size)}" for f in kept.files]
    if kept.count > len(kept.files):
        lines.append(f"  ... and {kept.count - len(kept.files)} more")
    return lines


def size_text(count: int) -> str:
    """Bytes as people read them: 512 B, 12.3 KB, 1.0 MB."""
    value = float(count)
    for unit in ("B", "KB", "MB"):
        if value < 1024 or unit == "MB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} MB"


def artifacts_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where a job attempt's artifacts are kept, beside its answer: one tar.gz."""
    return f"artifacts/{batch_id}/{job_id}/t{turn}-a{attempt}.tar.gz"


def index_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where the index of a job attempt's artifacts is kept."""
    return f"artifacts/{batch_id}/{job_id}/t{turn}-a{attempt}.json"


def grace_s(timeout_s: float) -> float:
    """How long before a job's deadline its artifacts are collected: a tenth of its timeout,
    at least 3 s and at most a minute, for the upload to land before the machine is destroyed."""
    return min(GRACE_MOST_S, max(GRACE_LEAST_S, timeout_s / 10))


def from_index(payload: bytes, ref: str, index_ref: str) -> Artifacts | None:
    """The result's view of an uploaded index (None when it is garbled)."""
    try:
        index = ArtifactIndex.model_validate(json.loads(payload))
    except (ValueError, ValidationError):
        return None
    return Artifacts(
        ref=ref,
        index_ref=index_ref,
        count=len(index.files),
        bytes=index.bytes,
        files=[f.model_copy(update={"path": f.path[:PATH_CHARS]}) for f in index.files[:LISTED]],
        left_out_count=index.left_out_count,
        left_out_bytes=index.left_out_bytes,
        collected_at_timeout=index.timed_out,
        error=index.error,
    )


def extract(archive: bytes, out: Path) -> list[tuple[str, int]]:
    """Write an artifacts archive's files under `out`, their paths kept; refuse any member that
    would land outside it. Returns each file written and its size."""
    written: list[tuple[str, int]] = []
    root = out.resolve()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            pure = PurePosixPath(member.name)
            if not member.isfile() or pure.is_absolute() or ".." in pure.parts:
                continue
            target = (root / pure).resolve()
            if not target.is_relative_to(root):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with handle, target.open("wb") as sink:
                while piece := handle.read(1 << 20):
                    sink.write(piece)
            written.append((pure.as_posix(), member.size))
    return written


class Kept(Protocol):
    """What of a job's result says where its artifacts are (sortie.models.JobResult)."""

    job_id: str
    artifacts: Artifacts | None


async def write_out(
    store: ObjectStore, jobs: Sequence[tuple[Kept, Path]], *, single: bool
) -> list[str]:
    """Write each job's artifacts into its directory; a line per job for people to read.

    With one job asked for (`single`), having none is an error; over a batch, jobs without
    artifacts are skipped.
    """
    lines: list[str] = []
    for result, out in jobs:
        kept = result.artifacts
        if kept is None:
            if single:
                raise ArtifactsUnavailable(
                    f"job {result.job_id} kept no artifacts (it names none, or its machine "
                    "uploaded none)"
                )
            continue
        archive = await store.get(kept.ref)
        if archive is None:
            raise ArtifactsUnavailable(f"job {result.job_id}: {kept.ref} is no longer stored")
        written = await asyncio.to_thread(extract, archive, out)
        total = sum(size for _, size in written)
        lines.append(f"wrote {len(written)} files of {result.job_id} ({size_text(total)}) to {out}")
        lines += [f"  {name}  {size_text(count)}" for name, count in written]
        if kept.left_out_count:
            index = await store.get(kept.index_ref)
            parsed = ArtifactIndex.model_validate_json(index) if index else ArtifactIndex()
            lines.append(
                f"  left out: {kept.left_out_count} files, {size_text(kept.left_out_bytes)}"
            )
            lines += [f"    {f.path}  {size_text(f.size)}  ({f.why})" for f in parsed.left_out]
        if kept.error:
            lines.append(f"  {kept.error}")
    if not lines:
        lines.append("no job of the batch kept artifacts")
    return lines
