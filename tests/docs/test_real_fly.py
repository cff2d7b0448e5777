"""docs/real-fly.md: what the suite can check of a first batch on real Fly."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from activities.credentials import ClaudePool
from sortie.settings import Settings, fly_connection, temporal_profile
from sortie.spec import parse_batch
from sortie.store import StoreCredentials

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "real-fly.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", GUIDE, re.S | re.M)
WORKER_ENV = [body for lang, body in BLOCKS if body.startswith("# worker environment")]


def guide_env() -> dict[str, str]:
    """Every `export NAME=value` of the guide's worker environment blocks."""
    env: dict[str, str] = {}
    for body in WORKER_ENV:
        for line in body.splitlines():
            if line.startswith("export "):
                name, _, value = shlex.split(line, comments=True)[1].partition("=")
                env[name] = value
    return env


def worker_view(env: Mapping[str, str]) -> dict[str, Any]:
    """What the worker makes of an environment: its settings, Fly, the store, Claude, Temporal."""
    fly, token = fly_connection(env)
    keys = StoreCredentials.from_env(env)
    return {
        "settings": Settings.from_env(env).model_dump(),
        "fly": fly.model_dump(),
        "token": token.authorization(),
        "store_keys": (keys.access_key_id, keys.secret_access_key),
        "claude": (ClaudePool.from_env(env).names(), ClaudePool.from_env(env).values()),
        "temporal": dict(temporal_profile(env).to_client_connect_config()),
    }


def test_every_variable_the_guide_names_is_one_the_worker_reads() -> None:
    env = guide_env()
    assert WORKER_ENV and env
    whole = worker_view(env)
    for name, value in env.items():
        changed = {**env, name: f"{value}2"}
        assert worker_view(changed) != whole, f"the worker does not read {name}"


def test_the_guides_environment_is_all_the_worker_needs_for_fly_the_store_and_claude() -> None:
    view = worker_view(guide_env())
    assert view["fly"]["api_base_url"] == "https://api.machines.dev"  # real Fly, not localfly
    assert view["fly"]["app"] == "my-sortie-jobs"
    assert view["token"].startswith("FlyV1 fm2_")
    store = view["settings"]["store"]
    assert not str(store["endpoint_url"]).startswith("http://127.0.0.1")
    assert (store["bucket"], store["region"]) == ("my-sortie-store", "auto")
    assert all(view["store_keys"])
    assert view["claude"][0] == ["CLAUDE_CODE_OAUTH_TOKEN"]
    assert view["temporal"]["api_key"] and view["settings"]["temporal_namespace"] != "default"


def test_the_compose_env_example_names_every_variable_of_the_guide() -> None:
    example = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?(\w+)=", example, re.M))
    assert set(guide_env()) <= named


@pytest.mark.parametrize(
    "body", [body for lang, body in BLOCKS if lang == "yaml"], ids=["command", "prompt"]
)
def test_the_batch_files_shown_are_valid(body: str) -> None:
    spec = parse_batch(yaml.safe_load(body), "docs/real-fly.md")
    assert spec.fly_apps == ["my-sortie-jobs"]
    assert len(spec.jobs) == 1


def test_the_guide_shows_creating_the_app_the_store_and_the_image() -> None:
    for command in (
        "fly apps create",
        "fly storage create",
        "fly auth docker",
        "docker build -f agent/Dockerfile",
        "docker push",
        "python starter.py doctor",
        "python starter.py watch",
        "python starter.py results",
    ):
        assert command in GUIDE, command
