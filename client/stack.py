"""Local processes of a Sortie stack: a Temporal dev server persisting to a SQLite file, and the
object store (moto's S3 server) on loopback.

Used by `make demo`, the benchmarks, the suite and the crash tests, which kill and restart them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sortie.store import OFFLINE_BUCKET, OFFLINE_KEY, OFFLINE_REGION

TEMPORAL_CLI = Path(sys.executable).parent / "temporal"
SQLITE_PRAGMAS = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
"""Write-ahead log, synced at checkpoints: every commit survives the server being killed (the
crash tests do that), and writes stop queueing behind one fsync each. Only a crash of the
machine itself can lose the last commits, which a production deployment leaves to PostgreSQL."""


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


MATCHING_CONFIG = ["--dynamic-config-value", "matching.enableFairness=true"]
"""Fairness on: tasks of a queue's backlog go out in turns by fairness key (a batch's id), not
first come first served; without it the dev server keeps priority keys but not fairness.
Nothing else: each Fly app's create rate is held by its pacer workflow (activities/pacing.py), on a
server with default partitions as on this one, and the bench measures both (--plain-server)."""


class DevServer:
    """A Temporal dev server persisting to a SQLite file, restartable on the same file."""

    def __init__(
        self,
        db: Path,
        log: Path,
        *,
        port: int | None = None,
        ui_port: int | None = None,
        extra: list[str] | None = None,
        matching: list[str] | None = None,
    ) -> None:
        """`matching`: the matching settings it runs with (default MATCHING_CONFIG; [] for a
        plain `temporal server start-dev`, as Temporal Cloud gives none)."""
        self.db = db
        self.log = log
        self.port = port or free_port()
        self.ui_port = ui_port
        self.extra = extra or []
        self.matching = MATCHING_CONFIG if matching is None else matching
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """host:port of its frontend."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> DevServer:
        """Start (or restart) the server and wait until its frontend serves requests."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(TEMPORAL_CLI),
                    "server",
                    "start-dev",
                    *(
                        ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
                        if self.ui_port
                        else ["--headless"]
                    ),
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--db-filename",
                    str(self.db),
                    "--search-attribute",
                    "BatchId=Keyword",
                    "--log-level",
                    "error",
                    *SQLITE_PRAGMAS,
                    *self.matching,
                    *self.extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not (listening("127.0.0.1", self.port) and self.healthy()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dev server did not start; see {self.log}")
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        """Whether the frontend serves requests: it accepts connections a moment before that
        and answers "Frontend is not healthy yet" meanwhile."""
        check = subprocess.run(
            [str(TEMPORAL_CLI), "operator", "cluster", "health", "--address", self.address],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return check.returncode == 0 and check.stdout.strip() == "SERVING"

    def kill(self) -> None:
        """SIGKILL the server."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalS3:
    """moto's S3 in server mode on loopback, with the bucket made: the offline object store.

    A real S3-protocol server, so the worker, the starter and the agent's presigned uploads run
    the same client code as against Tigris or MinIO.
    """

    def __init__(
        self,
        log: Path,
        *,
        port: int | None = None,
        bucket: str = OFFLINE_BUCKET,
        check_keys: bool = False,
    ) -> None:
        self.log = log
        self.port = port or free_port()
        self.bucket = bucket
        self.check_keys = check_keys
        """Refuse unknown access keys (moto's IAM checks) once the bucket is made."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables Tigris' `fly storage create` would set, pointing here."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "BUCKET_NAME": self.bucket,
            "AWS_REGION": OFFLINE_REGION,
            "AWS_ACCESS_KEY_ID": OFFLINE_KEY,
            "AWS_SECRET_ACCESS_KEY": OFFLINE_KEY,
        }

    def start(self, timeout: float = 30) -> LocalS3:
        """Start the server, wait until it answers, and create the bucket."""
        env = dict(os.environ)
        if self.check_keys:  # the one request let through unchecked is the bucket's creation
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "1"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not listening("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the S3 server did not start; see {self.log}")
            time.sleep(0.05)
        httpx.put(f"{self.url}/{self.bucket}", timeout=10).raise_for_status()
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
