"""Running `starter.py` as people do, piped, against the test's server, queue and store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.helpers.stack import ROOT, Sortie


def cli_env(s: Sortie, **extra: str) -> dict[str, str]:
    """The environment that points the command line at the test's server, queue and store."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TEMPORAL_", "SORTIE_"))
    }
    env.update(
        TEMPORAL_ADDRESS=s.settings.temporal_address,
        SORTIE_TASK_QUEUE=s.settings.task_queue,
        SORTIE_STATE_DIR=str(s.settings.state_dir),
        SORTIE_LOCALFLY_URL=s.localfly.url,
        **extra,
    )
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `starter.py ARGS` with stdout and stderr piped."""
    return subprocess.run(
        [sys.executable, "starter.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`run_cli` off the event loop, which runs the test's worker."""
    return await asyncio.to_thread(run_cli, args, env)


def batch_file(path: Path, app: str, jobs: list[dict[str, Any]], **fields: Any) -> Path:
    """A JSON batch file of quick alpine command jobs under a fresh name."""
    data = {
        "name": f"ops{uuid.uuid4().hex[:8]}",
        "app": app,
        "defaults": {"image": "docker.io/library/alpine:3.20", "timeout": "60s", "retries": 0},
        "jobs": jobs,
        **fields,
    }
    path.write_text(json.dumps(data))
    return path
