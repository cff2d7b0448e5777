"""The GitHub Actions example: its shape, and its steps' scripts run as a runner would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.stack import ROOT

EXAMPLE = ROOT / "examples" / "ci" / "github-actions.yml"


def workflow() -> dict[Any, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return data


def steps() -> list[dict[str, Any]]:
    [job] = workflow()["jobs"].values()
    found: list[dict[str, Any]] = job["steps"]
    return found


def step(containing: str) -> dict[str, Any]:
    [found] = [s for s in steps() if containing in s.get("run", "") + s.get("uses", "")]
    return found


def run_step(
    script: str, tmp_path: Path, path: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a step's script as the runner does (`bash -e`), in the repository's root."""
    summary = tmp_path / "summary.md"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "SORTIE_"))},
        "PATH": f"{path}:{os.environ['PATH']}",
        "GITHUB_STEP_SUMMARY": str(summary),
        "BATCH_FILE": "examples/demo.yaml",
        "RESULTS": str(tmp_path / "results.json"),
    }
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_example_waits_for_the_batch_and_always_uploads_its_results() -> None:
    data = workflow()
    triggers = data["on"] if "on" in data else data[True]  # YAML 1.1 reads `on` as true
    assert "workflow_dispatch" in triggers
    [job] = data["jobs"].values()
    assert {"TEMPORAL_ADDRESS", "BATCH_FILE", "RESULTS"} <= job["env"].keys()
    assert "secrets.TEMPORAL_ADDRESS" in job["env"]["TEMPORAL_ADDRESS"]
    submit = step("starter.py submit")
    assert "--wait" in submit["run"] and "--json" in submit["run"]
    assert '> "$RESULTS"' in submit["run"], "the JSON document is the results file"
    assert "continue-on-error" not in submit, "exit 1 must fail the step"
    upload = step("actions/upload-artifact")
    assert upload["if"] == "always()", "results are kept when the batch failed too"
    assert upload["with"]["path"] == "${{ env.RESULTS }}"
    names = [s.get("uses", s.get("run", "")) for s in steps()]
    assert names.index(upload["uses"]) > names.index(submit["run"])
    assert names.index(step("starter.py validate")["run"]) < names.index(submit["run"])


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (0, ""),
        (1, "::error::the batch has failed or cancelled jobs"),
        (2, "::error::bad input"),
        (3, "::error::starter.py crashed (exit 3)"),
    ],
)
def test_the_submit_step_fails_on_a_failed_batch_and_keeps_the_results(
    tmp_path: Path, code: int, said: str
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    python = fake / "python"
    python.write_text(f'#!/bin/sh\necho "$*" > "{tmp_path}/argv"\necho "{{}}"\nexit {code}\n')
    python.chmod(0o755)
    ran = run_step(step("starter.py submit")["run"], tmp_path, str(fake))
    assert ran.returncode == code, ran.stderr
    assert (tmp_path / "argv").read_text().split() == [
        "starter.py",
        "submit",
        "examples/demo.yaml",
        "--wait",
        "--json",
    ]
    assert (tmp_path / "results.json").read_text() == "{}\n"
    assert said in ran.stdout
    if code == 0:
        assert (tmp_path / "summary.md").read_text() == "every job succeeded\n"


def test_the_validate_step_checks_the_default_batch_without_a_server(tmp_path: Path) -> None:
    ran = run_step(step("starter.py validate")["run"], tmp_path, str(Path(sys.executable).parent))
    assert ran.returncode == 0, ran.stderr
    assert " is valid: demo on Fly app " in ran.stdout.splitlines()[0]


def test_actionlint_finds_nothing() -> None:
    actionlint = Path(sys.executable).parent / "actionlint"  # a dev dependency (pyproject.toml)
    ran = subprocess.run(
        [str(actionlint), "-no-color", str(EXAMPLE)], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
