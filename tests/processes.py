"""Real processes the crash tests kill: a worker, and a Temporal dev server on a SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sortie.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TEMPORAL_CLI = Path(sys.executable).parent / "temporal"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class WorkerProcess:
    """`python worker.py` in its own process group, offline against a localfly."""

    def __init__(self, settings: Settings, localfly_url: str, log: Path) -> None:
        self.settings = settings
        self.localfly_url = localfly_url
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start a new worker process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TEMPORAL_"))}
        env.update(
            TEMPORAL_ADDRESS=self.settings.temporal_address,
            SORTIE_TASK_QUEUE=self.settings.task_queue,
            SORTIE_LOCALFLY_URL=self.localfly_url,
            SORTIE_SHUTDOWN_GRACE=str(self.settings.shutdown_grace_s),
        )
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "worker.py")],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup of any kind."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator stopping the worker would; return its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Make sure nothing is left running."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


class DevServer:
    """A Temporal dev server persisting to a SQLite file, restartable on the same file."""

    def __init__(self, db: Path, log: Path, extra: list[str] | None = None) -> None:
        self.db = db
        self.log = log
        self.port = free_port()
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """host:port of its frontend."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> DevServer:
        """Start (or restart) the server and wait until it accepts connections."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(TEMPORAL_CLI),
                    "server",
                    "start-dev",
                    "--headless",
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
                    *self.extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dev server did not start; see {self.log}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Make sure nothing is left running."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
