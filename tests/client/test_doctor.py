"""`starter.py doctor`'s checks against real servers: what it says, and that it says no secret."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from client.doctor import Check, diagnose, reaper_schedule, report
from client.stack import free_port
from localfly.process import LocalFlyProcess
from sortie import reaping
from sortie.settings import Settings
from sortie.spec import parse_batch

TOKEN = "fm2_doctor-right-token"


@pytest.fixture(scope="module")
def fly_with_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFlyProcess]:
    """A localfly that, like Fly, refuses every token but one."""
    log = tmp_path_factory.mktemp("doctor") / "localfly.log"
    with LocalFlyProcess(token=TOKEN, log=log) as fly:
        yield fly


def online(fly: LocalFlyProcess, **extra: str) -> dict[str, str]:
    """The suite's store, no Temporal, and `fly` in the place of Fly's API with a token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TEMPORAL_"))}
    env.update(
        TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}",
        FLY_API_TOKEN=f"FlyV1 {TOKEN}",
        FLY_API_BASE_URL=fly.url,
        FLY_LOGS_BASE_URL=fly.url,
    )
    return {**env, **extra}


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


async def test_doctor_names_a_fly_app_that_is_missing_or_a_token_fly_refuses(
    fly_with_token: LocalFlyProcess,
) -> None:
    good = by_name(await diagnose(None, online(fly_with_token, FLY_APP="doctor-a")))
    assert good["Fly"].ok is True and "doctor-a" in good["Fly"].detail
    assert good["Temporal"].ok is False and good["workers"].ok is None  # skipped, not failed

    fly_with_token.set_faults({"missing_apps": ["doctor-b"]})
    try:
        env = online(fly_with_token, FLY_APP="doctor-a", SORTIE_FLY_APPS="doctor-b")
        missing = by_name(await diagnose(None, env))["Fly"]
    finally:
        fly_with_token.set_faults({})
    assert missing.ok is False and "'doctor-b'" in missing.detail
    assert "fly apps create doctor-b" in missing.fix

    env = online(fly_with_token, FLY_APP="doctor-a", FLY_API_TOKEN="FlyV1 fm2_wrong")
    refused = by_name(await diagnose(None, env))["Fly"]
    assert refused.ok is False and "FLY_API_TOKEN" in refused.fix

    nameless = by_name(await diagnose(None, online(fly_with_token)))["Fly"]
    assert nameless.ok is False and "FLY_APP" in nameless.fix


async def test_doctor_checks_a_files_secrets_and_claude_by_name_only(
    fly_with_token: LocalFlyProcess, tmp_path: Path
) -> None:
    spec = parse_batch(
        {
            "name": "doctor",
            "app": "doctor-a",
            "defaults": {"image": "docker.io/library/alpine:3.20", "secrets": ["DOCTOR_SET"]},
            "jobs": [
                {"id": "a", "command": "true", "secrets": ["DOCTOR_UNSET"]},
                {"id": "b", "prompt": "review"},
            ],
        }
    )
    values = {"DOCTOR_SET": "value-of-doctor-set", "AWS_SECRET_ACCESS_KEY": "sortie-offline"}
    env = online(fly_with_token, **values)
    env.pop("CLAUDE_CODE_OAUTH_TOKEN", None)
    env.pop("ANTHROPIC_API_KEY", None)
    checks = await diagnose(spec, env)
    found = by_name(checks)
    assert found["secrets"].ok is False and found["secrets"].detail == "not set: DOCTOR_UNSET"
    assert found["Claude"].ok is False and "prompt jobs" in found["Claude"].detail
    assert found["Fly"].ok is True  # the file's app; its image is not in Fly's registry

    text, code = report(checks, as_json=True)
    assert code == 2
    document = json.loads(text)
    assert document["ok"] is False
    assert [c["name"] for c in document["checks"]] == [
        "Temporal",
        "search attribute",
        "create pacing",
        "workers",
        "reaper schedule",
        "object store",
        "Fly",
        "Claude",
        "secrets",
    ]
    plain, _ = report(checks, as_json=False)
    for value in [TOKEN, "value-of-doctor-set"]:
        assert value not in text and value not in plain


async def test_doctor_says_when_the_reaper_schedule_does_not_exist_yet(
    temporal: WorkflowEnvironment,
) -> None:
    settings = Settings(task_queue=f"doctor-{uuid.uuid4().hex}")
    missing = await reaper_schedule(temporal.client, settings)
    assert missing.ok is None and "orphaned machines are not swept" in missing.detail
    sid = await reaping.ensure_reaper_schedule(temporal.client, settings, "some-app")
    assert sid is not None
    try:
        made = await reaper_schedule(temporal.client, settings)
    finally:
        await temporal.client.get_schedule_handle(sid).delete()
    assert made.ok is True and sid in made.detail
