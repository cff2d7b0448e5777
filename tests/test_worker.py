"""The worker's own set-up, apart from the workflows and activities it runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.helpers.stack import ROOT
from worker import cache_workflow_bytecode


def test_the_worker_leaves_bytecode_for_the_sandbox_to_import() -> None:
    # The sandbox imports a workflow's module for each workflow run; with bytecode on disk that
    # import skips compiling, even where PYTHONDONTWRITEBYTECODE keeps Python from writing it.
    source = ROOT / "workflows" / "chunk.py"
    cached = Path(importlib.util.cache_from_source(str(source)))
    cached.unlink(missing_ok=True)

    cache_workflow_bytecode()

    assert cached.exists() and cached.stat().st_size > 0
