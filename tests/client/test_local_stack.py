"""`make up`, `starter.py doctor` and `make down` as a newcomer runs them, on ports of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from client.local_stack import StackPlan
from client.stack import LocalS3, free_port, listening
from localfly.process import LocalFlyProcess

ROOT = Path(__file__).resolve().parents[2]
FIRST_BATCH = ROOT / "examples" / "first-batch.yaml"


def stack_env(state: Path) -> dict[str, str]:
    """A clean environment (no Fly, Temporal, store or Claude settings of the suite's) with the
    stack's four ports free ones and its state directory the test's own."""
    own = ("FLY_", "TEMPORAL_", "SORTIE_", "AWS_", "BUCKET_NAME", "CLAUDE_", "ANTHROPIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.update(
        SORTIE_STATE_DIR=str(state),
        TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}",
        SORTIE_UI_URL=f"http://127.0.0.1:{free_port()}",
        SORTIE_LOCALFLY_URL=f"http://127.0.0.1:{free_port()}",
        SORTIE_LOCAL_S3_URL=f"http://127.0.0.1:{free_port()}",
    )
    return env


def make(target: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def starter(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "starter.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ports(env: dict[str, str]) -> list[int]:
    names = ("TEMPORAL_ADDRESS", "SORTIE_UI_URL", "SORTIE_LOCALFLY_URL", "SORTIE_LOCAL_S3_URL")
    return [int(env[name].rsplit(":", 1)[1]) for name in names]


def failed(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("✗")]


@pytest.mark.slow
def test_make_up_runs_an_own_batch_and_make_down_leaves_nothing_listening(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = stack_env(state)
    try:
        up = make("up", env, timeout=240)  # the bound: up within 4 minutes
        assert up.returncode == 0, up.stdout + up.stderr
        for part in ("Temporal", "Web UI", "localfly", "store", "worker"):
            assert any(line.startswith(part) for line in up.stdout.splitlines()), up.stdout
        assert str(state / "worker.log") in up.stdout
        assert all(listening("127.0.0.1", port) for port in ports(env))

        doctor = starter(["doctor", str(FIRST_BATCH)], env)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        # Eight checks pass; the reaper schedule's passes too once the worker has made it.
        assert "✗" not in doctor.stdout and doctor.stdout.count("✓") >= 8, doctor.stdout

        ran = starter(["submit", str(FIRST_BATCH), "--wait", "--json"], env)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        result = json.loads(ran.stdout)
        assert (result["total"], result["succeeded"]) == (5, 5)
        listed = httpx.get(
            f"{env['SORTIE_UI_URL']}/api/v1/namespaces/default/workflows",
            params={"query": f'WorkflowId="{result["batch_id"]}"'},
            timeout=30,
        )
        assert listed.status_code == 200 and result["batch_id"] in listed.text

        records = {p.name: p.read_text() for p in (state / "up").iterdir()}
        again = make("up", env, timeout=240)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("running, started by make up before") == 4, again.stdout
        assert {p.name: p.read_text() for p in (state / "up").iterdir()} == records

        secrets = {
            "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat-doctor-secret",
            "GITHUB_TOKEN": "ghp_x1y2",
        }
        with_secrets = starter(["doctor", "--json"], {**env, **secrets})
        assert with_secrets.returncode == 0, with_secrets.stdout
        assert json.loads(with_secrets.stdout)["ok"] is True
        assert "CLAUDE_CODE_OAUTH_TOKEN" in with_secrets.stdout
        assert not any(value in with_secrets.stdout for value in secrets.values())

        no_temporal = starter(["doctor"], {**env, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
        assert no_temporal.returncode == 2
        assert [line.split(":")[0] for line in failed(no_temporal.stdout)] == ["✗ Temporal"]

        no_store = starter(
            ["doctor"], {**env, "SORTIE_LOCAL_S3_URL": f"http://127.0.0.1:{free_port()}"}
        )
        assert no_store.returncode == 2
        assert [line.split(":")[0] for line in failed(no_store.stdout)] == ["✗ object store"]
    finally:
        down = make("down", env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [port for port in ports(env) if listening("127.0.0.1", port)]
    assert not list((state / "up").iterdir())
    assert (state / "temporal.db").exists()  # kept for `make ui`


def test_make_down_stops_only_what_make_up_started(tmp_path: Path) -> None:
    # An S3 server of someone else's on the stack's port, and a record naming its pid from an
    # earlier `make up` whose process is gone (the pid reused): `down` leaves it running.
    env = stack_env(tmp_path)
    port = ports(env)[3]
    with LocalS3(tmp_path / "s3.log", port=port) as theirs:
        assert theirs.process is not None
        (tmp_path / "up").mkdir()
        stale = {"pid": theirs.process.pid, "started": "1", "ports": [port]}
        (tmp_path / "up" / "store.json").write_text(json.dumps(stale))
        down = make("down", env, timeout=60)
        assert down.returncode == 0, down.stderr
        assert "stopped" not in down.stdout
        assert listening("127.0.0.1", port) and theirs.process.poll() is None


def test_the_stack_starts_only_what_the_environment_does_not_name_elsewhere(tmp_path: Path) -> None:
    env = stack_env(tmp_path)
    offline = StackPlan.from_env(env)
    assert offline.temporal_port and offline.localfly_port and offline.store_port
    online = StackPlan.from_env(
        {
            **env,
            "FLY_API_TOKEN": "fm2_doctor",
            "BUCKET_NAME": "mine",
            "AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev",
            "TEMPORAL_ADDRESS": "my-namespace.a1b2c.tmprl.cloud:7233",
        }
    )
    assert (online.temporal_port, online.localfly_port, online.store_port) == (None, None, None)
    assert online.state == offline.state == tmp_path.resolve()


@pytest.mark.slow
def test_with_a_fly_token_make_up_starts_no_localfly_and_its_worker_uses_fly(
    tmp_path: Path,
) -> None:
    # "Fly" is a localfly that refuses every token but one, where FLY_API_BASE_URL points.
    token = "fm2_make-up-token"
    with LocalFlyProcess(token=token, log=tmp_path / "fly.log") as fly:
        env = stack_env(tmp_path / "state")
        env.update(
            FLY_API_TOKEN=f"FlyV1 {token}",
            FLY_API_BASE_URL=fly.url,
            FLY_LOGS_BASE_URL=fly.url,
            FLY_APP="my-sortie-app",
        )
        try:
            up = make("up", env, timeout=240)
            assert up.returncode == 0, up.stdout + up.stderr
            assert not any(line.startswith("localfly") for line in up.stdout.splitlines())
            assert "FLY_API_TOKEN is set" in up.stdout
            assert not (tmp_path / "state" / "up" / "localfly.json").exists()
            assert not listening("127.0.0.1", ports(env)[2])

            ran = starter(["submit", str(FIRST_BATCH), "--wait", "--json"], env)
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert json.loads(ran.stdout)["succeeded"] == 5
            machines = fly.machines("my-sortie-app")
            assert len(machines) == 5 and not fly.live_machines("my-sortie-app")
        finally:
            down = make("down", env, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
