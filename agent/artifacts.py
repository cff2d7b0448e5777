"""A job's artifacts: the files its `artifacts` globs name, uploaded at its end, whatever happens.

The worker puts in the machine's env what to collect (SORTIE_ARTIFACTS: the globs, the most
bytes, and when to collect at the latest) and two presigned PUT URLs: the files as one tar.gz
(SORTIE_ARTIFACTS_URL) and then their index (SORTIE_ARTIFACTS_INDEX_URL), which says what is in
it, with sizes, and what was left out. The index is uploaded last: it is what the worker reads.

A job that ends by itself (success, failure, a stall) uploads them at its end. A job that runs
into its timeout is destroyed by the worker at its deadline, with no chance to upload: so a
watchdog collects them at `collect_at`, a little before that deadline (for a command job it stops
the command first), and the entrypoint then waits for the worker to destroy the machine, so the
job still ends timed out. Command jobs with artifacts run through this module too (the agent
image's entrypoint is given the command: `python3 -m agent CMD...`).
Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.entrypoint import Machine

ARTIFACTS = "SORTIE_ARTIFACTS"
ARTIFACTS_URL = "SORTIE_ARTIFACTS_URL"
INDEX_URL = "SORTIE_ARTIFACTS_INDEX_URL"
URLS = (ARTIFACTS_URL, INDEX_URL)
"""Presigned URLs: secrets, like the entrypoint's others."""
LISTED_MOST = 1000
"""Most left-out files the index names one by one (the rest are counted)."""
STOP_WAIT_S = 2.0
"""How long a command stopped at its deadline gets between SIGTERM and SIGKILL."""
EXIT_NOT_FOUND = 127
_SCAN = 1 << 20


@dataclass(frozen=True)
class Wanted:
    """What SORTIE_ARTIFACTS asks for."""

    globs: tuple[str, ...]
    max_bytes: int
    collect_at: float | None
    """Epoch seconds: collect then at the latest, before the worker's deadline destroys us."""


def wanted(env: Mapping[str, str]) -> Wanted | None:
    """The job's artifact request, or None when it has none (or it is garbled)."""
    text = env.get(ARTIFACTS)
    if not text:
        return None
    try:
        data = json.loads(text)
        globs = tuple(str(g) for g in data["globs"])
        at = data.get("collect_at")
        return Wanted(globs, int(data["max_bytes"]), None if at is None else float(at))
    except (ValueError, KeyError, TypeError):
        return None


def matches(root: Path, globs: Sequence[str]) -> list[tuple[str, Path]]:
    """Regular files the globs name under `root`, sorted by path: a directory matched gives
    every file under it (so `out/**` and `out` both mean the whole tree); symlinks are skipped,
    so nothing outside the working directory is read."""
    found: dict[str, Path] = {}
    base = root.resolve()
    for pattern in globs:
        pure = PurePosixPath(pattern)
        if pure.is_absolute() or ".." in pure.parts:
            continue
        for match in sorted(root.glob(pattern)):
            for path in _files(match):
                if path.resolve().is_relative_to(base):
                    found.setdefault(path.relative_to(root).as_posix(), path)
    return sorted(found.items())


def _files(path: Path) -> Iterator[Path]:
    if path.is_symlink():
        return
    if path.is_file():
        yield path
    elif path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and not child.is_symlink():
                yield child


class Collector:
    """Collects and uploads the job's artifacts, once at its end or by its deadline watchdog."""

    def __init__(self, machine: Machine, wanted: Wanted, root: Path) -> None:
        self.machine = machine
        self.wanted = wanted
        self.root = root
        self.fired = threading.Event()
        """Set once the deadline watchdog collected: the job is about to time out."""
        self._lock = threading.Lock()
        self._stop_work: list[subprocess.Popen[bytes]] = []

    def watch(self, work: subprocess.Popen[bytes] | None = None) -> None:
        """Start the deadline watchdog; `work` is the command it stops first."""
        if work is not None:
            self._stop_work.append(work)
        if self.wanted.collect_at is None:
            return
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        assert self.wanted.collect_at is not None
        while (left := self.wanted.collect_at - time.time()) > 0:
            time.sleep(min(left, 1.0))
        self.machine.note("the job's timeout is near: collecting its artifacts now")
        self.fired.set()
        for work in self._stop_work:
            stop(work)
        self.send(timed_out=True)

    def send(self, *, timed_out: bool = False) -> bool:
        """Pack the artifacts, upload them, then their index; False when the upload failed."""
        with self._lock, tempfile.TemporaryDirectory(prefix="sortie-artifacts-") as tmp:
            index = self._pack(Path(tmp) / "artifacts.tar.gz")
            index["timed_out"] = timed_out
            sent = self.machine.upload(ARTIFACTS_URL, "artifacts", Path(tmp) / "artifacts.tar.gz")
            if not sent:
                index.update(files=[], error="the artifacts could not be uploaded")
            body = json.dumps(index).encode()
            indexed = self.machine.upload(INDEX_URL, "artifacts index", body)
            if sent and indexed:
                self.machine.note(f"artifacts uploaded ({len(index['files'])} files)")
            return sent and indexed

    def _pack(self, target: Path) -> dict[str, Any]:
        """Write the tar.gz of the files that fit; the index of what went in and what not."""
        kept: list[dict[str, Any]] = []
        left: list[dict[str, Any]] = []
        total = 0
        with tarfile.open(target, mode="w:gz") as tar:
            for name, path in matches(self.root, self.wanted.globs):
                try:
                    size = path.stat().st_size
                    if total + size > self.wanted.max_bytes:
                        left.append({"path": name, "size": size, "why": "artifacts_max"})
                        continue
                    if self._holds_secret(path):
                        left.append({"path": name, "size": size, "why": "holds a secret"})
                        continue
                    info = tar.gettarinfo(str(path), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with path.open("rb") as handle:
                        tar.addfile(info, handle)
                except OSError as error:
                    left.append({"path": name, "size": 0, "why": f"unreadable: {error.strerror}"})
                    continue
                total += info.size
                kept.append({"path": name, "size": info.size})
        return {
            "files": kept,
            "bytes": total,
            "left_out": left[:LISTED_MOST],
            "left_out_count": len(left),
            "left_out_bytes": sum(item["size"] for item in left),
            "max_bytes": self.wanted.max_bytes,
        }

    def _holds_secret(self, path: Path) -> bool:
        """Whether the file holds a secret value as it is, read in overlapping pieces."""
        overlap = b""
        with path.open("rb") as handle:
            while piece := handle.read(_SCAN):
                if self.machine.scrub.holds(overlap + piece):
                    return True
                overlap = piece[-4096:]
        return False


def start(machine: Machine, root: Path) -> Collector | None:
    """The job's collector with its deadline watchdog running, or None with no artifacts."""
    asked = wanted(machine.env)
    if asked is None:
        return None
    collector = Collector(machine, asked, root)
    collector.watch()
    return collector


def stop(work: subprocess.Popen[bytes]) -> None:
    """Stop a command and everything it started: SIGTERM, then SIGKILL if it lingers."""
    if work.poll() is not None:
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(work.pid, signum)
        except ProcessLookupError:
            return
        try:
            work.wait(timeout=STOP_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(machine: Machine, argv: Sequence[str]) -> int:
    """Run a command job that has artifacts: the command, then its artifacts uploaded.

    The command's output goes to the machine's logs as it would without us; SIGTERM and SIGINT
    (a stop) are passed on to it. At the deadline watchdog, the command is stopped, the artifacts
    go up, and we wait for the worker to destroy the machine: the job ends timed out.
    """
    root = Path.cwd()
    asked = wanted(machine.env) or Wanted((), 0, None)
    collector = Collector(machine, asked, root)
    try:
        work = subprocess.Popen(
            list(argv), env=machine.command_env(), stdin=subprocess.DEVNULL, start_new_session=True
        )
    except OSError as error:
        machine.note(f"cannot run {argv[0]!r}: {error.strerror}")
        collector.send()
        return EXIT_NOT_FOUND

    def forward(signum: int, _frame: object) -> None:
        if work.poll() is None:
            os.killpg(work.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    collector.watch(work)
    code = work.wait()
    if collector.fired.is_set():
        threading.Event().wait()  # the worker destroys the machine at the job's deadline
    sys.stdout.flush()
    collector.send()
    return code if code >= 0 else 128 - code
