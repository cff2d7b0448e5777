"""Run `python -m localfly` as a subprocess and drive its admin API (tests, demo, bench)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx

LISTENING = "localfly listening on "


class LocalFlyProcess:
    """A localfly in its own process group; `url` once started."""

    def __init__(
        self,
        *,
        port: int = 0,
        images: dict[str, str] | None = None,
        faults: dict[str, Any] | None = None,
        token: str | None = None,
        log: Path | None = None,
        path: list[Path] | None = None,
    ) -> None:
        self.port = port
        self.path = path or []
        self.images = images or {}
        self.faults = faults
        self.token = token
        self.log = log or Path(tempfile.gettempdir()) / f"localfly-{os.getpid()}.log"
        self.url = ""
        self._process: subprocess.Popen[str] | None = None
        self._admin: httpx.Client | None = None

    def start(self, timeout: float = 30) -> LocalFlyProcess:
        """Start localfly and wait for its listening line."""
        argv = [sys.executable, "-m", "localfly", "--port", str(self.port)]
        for ref, command in self.images.items():
            argv += ["--image", f"{ref}={command}"]
        if self.faults:
            argv += ["--faults", json.dumps(self.faults)]
        if self.token:
            argv += ["--token", self.token]
        env = dict(os.environ)
        if self.path:
            # Machines inherit localfly's PATH: this is how tools such as a stand-in CLI reach them.
            env["PATH"] = os.pathsep.join([*map(str, self.path), env.get("PATH", "")])
        with self.log.open("a") as log:
            self._process = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        line: list[str] = []
        reader = threading.Thread(
            target=lambda: line.append(self._process.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith(LISTENING):
            self.stop()
            raise RuntimeError(f"localfly did not start; see {self.log}")
        self.url = line[0][len(LISTENING) :].strip()
        self._admin = httpx.Client(base_url=self.url, timeout=30)
        return self

    @property
    def pid(self) -> int:
        """Its process id (the id of its process group too)."""
        assert self._process is not None, "localfly is not started"
        return self._process.pid

    def _get(self, path: str, **params: str) -> Any:
        assert self._admin is not None, "localfly is not started"
        response = self._admin.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def set_faults(self, faults: dict[str, Any]) -> None:
        """Replace the fault config."""
        assert self._admin is not None
        self._admin.put("/_localfly/faults", json=faults).raise_for_status()

    def stats(self, app: str | None = None) -> dict[str, Any]:
        """Calls per endpoint, statuses, live and most-ever-live machines."""
        result: dict[str, Any] = self._get("/_localfly/stats", **({"app": app} if app else {}))
        return result

    def requests(self, app: str) -> list[dict[str, Any]]:
        """The app's calls in the order they arrived: when, what, the status and Retry-After."""
        result: list[dict[str, Any]] = self._get("/_localfly/requests", app=app)
        return result

    def reset_stats(self) -> None:
        """Zero the counters; the most-ever-live becomes the current live count."""
        assert self._admin is not None
        self._admin.post("/_localfly/stats/reset").raise_for_status()

    def machines(self, app: str) -> list[dict[str, Any]]:
        """Every machine ever made in the app, destroyed ones included: the ground truth."""
        result: list[dict[str, Any]] = self._get("/_localfly/machines", app=app)
        return result

    def live_machines(self, app: str) -> list[dict[str, Any]]:
        """Machines of the app that are not destroyed."""
        return [m for m in self.machines(app) if m["state"] != "destroyed"]

    def stop(self) -> None:
        """SIGTERM (localfly kills its machines), then SIGKILL after a deadline."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> LocalFlyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
