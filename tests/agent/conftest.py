"""Fixtures of the agent's tests: repositories on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent.test_entrypoint import git


@pytest.fixture
def bare(tmp_path: Path) -> tuple[Path, str]:
    """A bare repository on disk (the origin a branch is pushed to) and its one commit."""
    work = tmp_path / "seed"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "app.py").write_text("print('hi')\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "initial", cwd=work)
    origin = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(work), str(origin), cwd=tmp_path)
    return origin, git("rev-parse", "HEAD", cwd=work)
