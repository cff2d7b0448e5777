"""Connecting by Temporal's own conventions: one envconfig profile serves the CLI and Sortie."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.service import TLSConfig
from temporalio.testing import WorkflowEnvironment

from sortie.settings import Settings, TemporalConfigError
from sortie.temporal import connect, connect_options
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import ROOT

CLOUD_KEY = f"cloud-key-{uuid.uuid4().hex}"


def profile_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "temporal.toml"
    path.write_text(body)
    return path


def test_a_profile_gives_address_namespace_api_key_and_tls(tmp_path: Path) -> None:
    path = profile_file(
        tmp_path,
        f"""
[profile.default]
address = "127.0.0.1:7999"

[profile.cloud]
address = "sortie.a1b2c.tmprl.cloud:7233"
namespace = "sortie.a1b2c"
api_key = "{CLOUD_KEY}"
""",
    )
    env = {"TEMPORAL_CONFIG_FILE": str(path), "TEMPORAL_PROFILE": "cloud"}
    settings = Settings.from_env(env)
    assert (settings.temporal_address, settings.temporal_namespace) == (
        "sortie.a1b2c.tmprl.cloud:7233",
        "sortie.a1b2c",
    )
    options = connect_options(settings, env)
    assert options["target_host"] == "sortie.a1b2c.tmprl.cloud:7233"
    assert options["namespace"] == "sortie.a1b2c"
    assert options["api_key"] == CLOUD_KEY
    assert options["tls"] is True, "an API key turns TLS on"
    assert CLOUD_KEY not in repr(settings) + settings.model_dump_json(), "Settings holds no key"

    default = Settings.from_env({"TEMPORAL_CONFIG_FILE": str(path)})
    assert default.temporal_address == "127.0.0.1:7999"
    assert "api_key" not in connect_options(default, {"TEMPORAL_CONFIG_FILE": str(path)})


def test_variables_override_the_profile_and_name_mtls_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ncert\n")
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nkey\n")
    path = profile_file(tmp_path, '[profile.default]\naddress = "file:7233"\nnamespace = "f"\n')
    env = {
        "TEMPORAL_CONFIG_FILE": str(path),
        "TEMPORAL_ADDRESS": "mtls.example.internal:7233",
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(cert),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(key),
    }
    settings = Settings.from_env(env)
    assert (settings.temporal_address, settings.temporal_namespace) == (
        "mtls.example.internal:7233",
        "f",
    )
    tls = connect_options(settings, env)["tls"]
    assert isinstance(tls, TLSConfig)
    assert (tls.client_cert, tls.client_private_key) == (cert.read_bytes(), key.read_bytes())


def test_nothing_configured_means_a_local_server(tmp_path: Path) -> None:
    env = {"TEMPORAL_CONFIG_FILE": str(tmp_path / "absent.toml")}
    settings = Settings.from_env(env)
    assert (settings.temporal_address, settings.temporal_namespace) == ("localhost:7233", "default")
    assert set(connect_options(settings, env)) == {"target_host", "namespace"}


def test_an_unknown_profile_is_refused_by_name(tmp_path: Path) -> None:
    path = profile_file(tmp_path, '[profile.default]\naddress = "a:1"\n')
    with pytest.raises(TemporalConfigError, match=f"in {path}: .*'nope' not found"):
        Settings.from_env({"TEMPORAL_CONFIG_FILE": str(path), "TEMPORAL_PROFILE": "nope"})


async def test_the_starter_reports_a_bad_profile_as_bad_input(tmp_path: Path) -> None:
    path = profile_file(tmp_path, "[profile.default\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    env["TEMPORAL_CONFIG_FILE"] = str(path)
    starter = await asyncio.create_subprocess_exec(
        *[sys.executable, str(ROOT / "starter.py"), "list"],
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(starter.communicate(), timeout=60)
    assert starter.returncode == 2
    assert f"bad configuration: Temporal configuration in {path}" in err.decode()


@pytest.mark.slow
async def test_worker_and_starter_run_a_batch_through_a_profile_only(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    address = temporal.client.service_client.config.target_host
    path = profile_file(
        tmp_path,
        f'[profile.default]\naddress = "127.0.0.1:1"\n\n'
        f'[profile.dev]\naddress = "{address}"\nnamespace = "default"\n',
    )
    profile = {"TEMPORAL_CONFIG_FILE": str(path), "TEMPORAL_PROFILE": "dev"}
    queue = f"profile-{uuid.uuid4().hex}"
    settings = Settings(task_queue=queue, shutdown_grace_s=1, state_dir=tmp_path / "state")
    assert (await connect(Settings.from_env(profile), profile)).namespace == "default"
    batch = tmp_path / "batch.yaml"
    batch.write_text(
        yaml.safe_dump(
            {
                "name": f"p{uuid.uuid4().hex[:8]}",
                "app": app_name,
                "max_machines": 2,
                "defaults": {"image": "alpine", "timeout": "1m"},
                "jobs": [{"id": f"j{i}", "command": f"echo hi-{i}"} for i in range(3)],
            }
        )
    )
    worker = WorkerProcess(
        settings,
        localfly.url,
        tmp_path / "worker.log",
        env={**profile, "SORTIE_REAPER": "off"},
        unset=("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE"),
    ).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TEMPORAL_"))}
    env.update(profile, SORTIE_TASK_QUEUE=queue)
    try:
        starter = await asyncio.create_subprocess_exec(
            *[sys.executable, str(ROOT / "starter.py"), "submit", str(batch), "--wait", "--json"],
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(starter.communicate(), timeout=120)
    finally:
        worker.stop()
    assert starter.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["succeeded"] == 3 and report["total"] == 3
    assert f"at {address}" in (tmp_path / "worker.log").read_text()


def test_empty_variables_count_as_unset(tmp_path: Path) -> None:
    path = profile_file(tmp_path, '[profile.default]\naddress = "file:7233"\n')
    env = {"TEMPORAL_CONFIG_FILE": str(path), "TEMPORAL_ADDRESS": "", "TEMPORAL_API_KEY": ""}
    settings = Settings.from_env(env)
    assert settings.temporal_address == "file:7233"
    assert "api_key" not in connect_options(settings, env), "a blank .env line is no empty key"
