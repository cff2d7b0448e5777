"""A real worker process for the crash tests to kill (the dev server is client.stack)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sortie.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """`python worker.py` in its own process group, offline against a localfly."""

    def __init__(
        self,
        settings: Settings,
        localfly_url: str,
        log: Path,
        env: dict[str, str] | None = None,
        unset: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.localfly_url = localfly_url
        self.log = log
        self.env = env or {}
        self.unset = unset
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start a new worker process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TEMPORAL_"))}
        env.update(
            TEMPORAL_ADDRESS=self.settings.temporal_address,
            SORTIE_TASK_QUEUE=self.settings.task_queue,
            SORTIE_LOCALFLY_URL=self.localfly_url,
            SORTIE_SHUTDOWN_GRACE=str(self.settings.shutdown_grace_s),
            SORTIE_STATE_DIR=str(self.settings.state_dir),
        )
        env.update(self.env)
        for name in self.unset:  # e.g. TEMPORAL_ADDRESS, to connect through a profile only
            env.pop(name, None)
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
