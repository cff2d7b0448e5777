"""Where the suite's tools are, how its dev server is set up, and a worker for one test."""

from __future__ import annotations

import shlex
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio.client import Client

from activities.secrets import SecretStore
from fly import FlyClient
from sortie.settings import Settings
from sortie.spec import DEFAULT_IMAGE
from worker import SortieWorker, build_worker

if TYPE_CHECKING:
    from localfly.process import LocalFlyProcess
    from tests.helpers.anthropic_api import AnthropicApi

BIN = Path(sys.executable).parent
TEMPORAL_CLI = BIN / "temporal"
ROOT = Path(__file__).resolve().parents[2]

SUGGEST_CONTINUE_AS_NEW_AT = 100
"""The dev server suggests continue-as-new this early, so every larger test exercises it."""
STANDIN_BIN = ROOT / "tests" / "bin"
CLAUDE_CODE_BIN = ROOT / ".state" / "claude-code" / "node_modules" / ".bin"
"""The real Claude Code CLI, as `make claude-code` installs it (the version agent/Dockerfile
pins)."""
AGENT_ENTRYPOINT = (
    f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); "
    "runpy.run_module('agent', run_name='__main__', alter_sys=True)"
)
AGENT_IMAGES = {DEFAULT_IMAGE: shlex.join([sys.executable, "-c", AGENT_ENTRYPOINT])}
"""Under localfly the agent image runs our entrypoint (`python -m agent`), and `claude` is the
stand-in. The entrypoint is this tree's: a machine gets none of localfly's environment, so a
bare `python -m agent` would import the agent the venv was installed from, not a `make prove`
scratch copy's (and a job's environment, its PATH too, is left as the job set it)."""


@dataclass
class Sortie:
    """What a test needs to run batches: a client, settings with a fresh queue, localfly."""

    client: Client
    settings: Settings
    localfly: LocalFlyProcess
    fly: FlyClient
    api: AnthropicApi | None = None
    """The fake Messages API the worker's credentials point at (real-CLI tests only)."""
    credentials: dict[str, str] = field(default_factory=dict)
    """The worker's Claude credentials and their values (real-CLI tests only)."""


@asynccontextmanager
async def running_worker(
    client: Client, settings: Settings, fly: FlyClient, secrets: SecretStore | None = None
) -> AsyncIterator[SortieWorker]:
    """Run a worker for the duration of the block."""
    worker = build_worker(client, fly, secrets or SecretStore({}), settings)
    async with worker:
        yield worker
