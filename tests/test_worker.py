"""The worker's own set-up, apart from the workflows and activities it runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.stack import LocalS3
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


@pytest.mark.parametrize(
    ("store", "why"),
    [
        (
            {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1", "BUCKET_NAME": "sortie"},
            "cannot be reached",
        ),
        ({"BUCKET_NAME": "no-such-bucket"}, "no such bucket"),
    ],
)
def test_a_worker_refuses_a_store_it_cannot_use_before_serving(
    object_store: LocalS3, store: dict[str, str], why: str
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SORTIE_", "TEMPORAL_"))},
        **object_store.env(),
        **store,
        "TEMPORAL_ADDRESS": "127.0.0.1:1",  # never reached: the store is checked first
    }
    done = subprocess.run(
        [sys.executable, "worker.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    endpoint = env["AWS_ENDPOINT_URL_S3"]
    assert f"bucket {env['BUCKET_NAME']!r} at {endpoint}" in done.stderr and why in done.stderr
    assert "Traceback" not in done.stderr
    assert object_store.env()["AWS_SECRET_ACCESS_KEY"] not in done.stderr


def test_a_worker_refuses_keys_the_store_refuses(tmp_path: Path) -> None:
    with LocalS3(tmp_path / "s3.log", check_keys=True) as strict:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SORTIE_", "TEMPORAL_"))},
            **strict.env(),
            "AWS_SECRET_ACCESS_KEY": "not-the-key",
            "TEMPORAL_ADDRESS": "127.0.0.1:1",
        }
        done = subprocess.run(
            [sys.executable, "worker.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert f"bucket 'sortie' at {strict.url}" in done.stderr and "access denied" in done.stderr
    assert "not-the-key" not in done.stderr and "Traceback" not in done.stderr
