"""The machine side of artifacts: which files the globs take, the bound, the secret check, and
a command job's artifacts uploaded at its end or by the deadline watchdog (agent/artifacts.py).

The agent runs as `python -m agent COMMAND...`; its uploads land in local files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from tests.helpers.stack import ROOT
from tests.helpers.waiting import eventually

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def agent_env(base: Path, **request: Any) -> dict[str, str]:
    """The machine's env for a command job with artifacts; uploads go to files under `base`."""
    return {
        "PATH": SYSTEM_PATH,
        "PYTHONPATH": str(ROOT),
        "HOME": str(base),
        "LANG": "C.UTF-8",
        "GITHUB_TOKEN": "ghp_artifactstesttoken0123456789abcdef",
        "SORTIE_ARTIFACTS": json.dumps({"max_bytes": 1 << 20, **request}),
        "SORTIE_ARTIFACTS_URL": f"file://{base / 'artifacts.tar.gz'}",
        "SORTIE_ARTIFACTS_INDEX_URL": f"file://{base / 'index.json'}",
    }


def start(base: Path, command: str, **request: Any) -> subprocess.Popen[str]:
    work = base / "work"
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "sh", "-c", command],
        cwd=work,
        env=agent_env(base, **request),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def members(base: Path) -> dict[str, bytes]:
    with tarfile.open(base / "artifacts.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_a_command_jobs_artifacts_are_uploaded_at_its_end_with_its_exit_code(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "secret-outside.txt"
    outside.write_text("not yours")
    command = (
        "mkdir -p out/deep && printf a > out/a.txt && printf c > out/deep/c.txt "
        f"&& ln -s {outside} out/link.txt && printf x > top.txt "
        "&& head -c 2000000 /dev/zero > out/huge.bin "
        "&& echo $GITHUB_TOKEN > out/token.txt && env | grep -v GITHUB > out/env.txt; exit 3"
    )
    proc = start(tmp_path, command, globs=["out/**", "top.txt", "../*", "/etc/passwd"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    index = json.loads((tmp_path / "index.json").read_text())
    assert [f["path"] for f in index["files"]] == [
        "out/a.txt",
        "out/deep/c.txt",
        "out/env.txt",
        "top.txt",
    ]
    assert {(f["path"], f["why"]) for f in index["left_out"]} == {
        ("out/huge.bin", "artifacts_max"),
        ("out/token.txt", "holds a secret"),
    }
    assert index["timed_out"] is False
    got = members(tmp_path)
    assert got["out/a.txt"] == b"a" and got["out/deep/c.txt"] == b"c"
    assert b"SORTIE_ARTIFACTS_URL" not in got["out/env.txt"], "no presigned URL reaches the job"


def uploaded_index(base: Path) -> dict[str, Any] | None:
    """The index once it is whole (the file is written in place)."""
    try:
        return json.loads((base / "index.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


async def test_near_its_deadline_the_command_is_stopped_its_artifacts_sent_and_the_agent_waits(
    tmp_path: Path,
) -> None:
    (tmp_path / "work" / "out").mkdir(parents=True)
    (tmp_path / "work" / "out" / "progress.txt").write_text("partial\n")
    command = "trap 'echo stopped > ../stopped.txt; exit 143' TERM; sleep 600 & wait"
    proc = start(tmp_path, command, globs=["out"], collect_at=time.time() + 1)
    try:
        index = await eventually(lambda: uploaded_index(tmp_path), timeout=30, what="the index")
        assert index["timed_out"] is True and [f["path"] for f in index["files"]] == [
            "out/progress.txt"
        ]
        assert members(tmp_path) == {"out/progress.txt": b"partial\n"}
        assert (tmp_path / "stopped.txt").exists(), "the command was stopped before collecting"
        # It does not exit: the worker's deadline passes with the machine running, so the job
        # times out as it would have, and the worker destroys the machine.
        assert proc.poll() is None
    finally:
        os.kill(proc.pid, 9)
        proc.communicate(timeout=30)


def test_a_command_that_cannot_start_still_sends_its_index(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "no-such-command-here"],
        cwd=tmp_path / "work",
        env=agent_env(tmp_path, globs=["*"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 127 and "no-such-command-here" in proc.stderr
    assert json.loads((tmp_path / "index.json").read_text())["files"] == []
