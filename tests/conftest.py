"""Shared fixtures: a real Temporal dev server, a real localfly, a real S3-protocol server (moto)
and workers on fresh queues.

Also guards the suite's exit status against the Temporal SDK's occasional crash during
interpreter finalisation (temporalio/sdk-python#300): pytest's own verdict is recorded when the
session finishes and the process leaves with exactly that status, before finalisation can
crash. A real failure still exits non-zero; a crash after a green run cannot turn it red.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.secrets import SecretStore
from client.stack import MATCHING_CONFIG, LocalS3
from fly import FlyClient, FlySettings, FlyToken
from sortie.codec import data_converter
from sortie.labels import BATCH_ID
from sortie.settings import Settings
from sortie.store import close_shared
from tests.helpers.anthropic_api import AnthropicApi
from tests.helpers.stack import (
    AGENT_IMAGES,
    CLAUDE_CODE_BIN,
    STANDIN_BIN,
    SUGGEST_CONTINUE_AS_NEW_AT,
    TEMPORAL_CLI,
    Sortie,
    running_worker,
)

if TYPE_CHECKING:
    from localfly.process import LocalFlyProcess


_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _exit_status is None or os.environ.get("SORTIE_NO_EXIT_GUARD"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


@pytest.fixture(scope="session", autouse=True)
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """moto's S3 server for the session, its bucket made, named in the environment as Tigris
    would: every worker, starter and Settings the tests make share it, as on several hosts."""
    with LocalS3(tmp_path_factory.mktemp("s3") / "s3.log") as s3:
        saved = {name: os.environ.get(name) for name in s3.env()}
        os.environ.update(s3.env())
        try:
            yield s3
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
async def shared_stores_closed(object_store: LocalS3) -> AsyncIterator[None]:
    """The store clients the session opened are closed at its end, on its event loop."""
    yield
    await close_shared()


@pytest.fixture(scope="session")
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    """One real dev server for the whole session, with the BatchId search attribute."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_CLI),
        data_converter=data_converter({}),  # the one Sortie's clients use, unencrypted
        search_attributes=[BATCH_ID],
        # Suggest continue-as-new early, so every larger test exercises it.
        dev_server_extra_args=[
            "--dynamic-config-value",
            f"limit.historyCount.suggestContinueAsNew={SUGGEST_CONTINUE_AS_NEW_AT}",
            *MATCHING_CONFIG,
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def localfly() -> Iterator[LocalFlyProcess]:
    """One localfly for the session; tests isolate themselves by app name."""
    from localfly.process import LocalFlyProcess

    with LocalFlyProcess(images=AGENT_IMAGES, path=[STANDIN_BIN]) as process:
        yield process


@pytest.fixture(scope="session")
def anthropic_api() -> Iterator[AnthropicApi]:
    """The fake Anthropic Messages API on loopback, for the session."""
    with AnthropicApi() as api:
        yield api


@pytest.fixture(scope="session")
def claude_localfly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFlyProcess]:
    """A localfly whose machines run the real Claude Code CLI (`make claude-code` installs it)."""
    from localfly.process import LocalFlyProcess

    if not (CLAUDE_CODE_BIN / "claude").exists():
        pytest.fail(f"the real Claude Code CLI is not in {CLAUDE_CODE_BIN}: run `make claude-code`")
    log = tmp_path_factory.mktemp("claude-localfly") / "localfly.log"
    with LocalFlyProcess(images=AGENT_IMAGES, path=[CLAUDE_CODE_BIN], log=log) as process:
        yield process


@pytest.fixture
def claude_credentials(request: pytest.FixtureRequest) -> dict[str, int | str | None]:
    """The worker's credentials for the real CLI (API keys or OAuth tokens), each with the HTTP
    status the fake API refuses it with (None: it answers; a string: the key of a usage limit,
    see AnthropicApi.limited_url); one that answers unless the test says otherwise (indirect)."""
    given: dict[str, int | str | None] | None = getattr(request, "param", None)
    return given or {"ANTHROPIC_API_KEY": None}


@pytest.fixture
async def claude_code(
    temporal: WorkflowEnvironment,
    claude_localfly: LocalFlyProcess,
    anthropic_api: AnthropicApi,
    claude_credentials: dict[str, int | str | None],
    tmp_path: Path,
) -> AsyncIterator[Sortie]:
    """A worker whose prompt jobs run the real CLI on localfly machines, against the fake API:
    each credential's ANTHROPIC_BASE_URL_n points at it."""
    env: dict[str, str] = {}
    for name, status in claude_credentials.items():
        oauth = name.startswith("CLAUDE_CODE_OAUTH_TOKEN")
        env[name] = f"sk-ant-{'oat01' if oauth else 'api03'}-test-{uuid.uuid4().hex}"
        number = name.removeprefix("CLAUDE_CODE_OAUTH_TOKEN").removeprefix("ANTHROPIC_API_KEY")
        env[f"ANTHROPIC_BASE_URL{number}"] = (
            anthropic_api.limited_url(status)
            if isinstance(status, str)
            else anthropic_api.base_url(status)
        )
    host, port = temporal.client.service_client.config.target_host.rsplit(":", 1)
    settings = Settings(
        temporal_address=f"{host}:{port}",
        task_queue=f"claude-{uuid.uuid4().hex}",
        shutdown_grace_s=1.0,
        state_dir=tmp_path / "state",
    )
    fly_settings = FlySettings(
        api_base_url=claude_localfly.url, logs_base_url=claude_localfly.url, rate_limit=False
    )
    async with (
        FlyClient.open(fly_settings, FlyToken("localfly-test")) as fly,
        running_worker(temporal.client, settings, fly, SecretStore(env)),
    ):
        yield Sortie(temporal.client, settings, claude_localfly, fly, anthropic_api, env)


@pytest.fixture
def app_name(request: pytest.FixtureRequest) -> str:
    """A Fly app name unique to the test, so localfly's counts are the test's own."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def fly_client(localfly: LocalFlyProcess) -> AsyncIterator[FlyClient]:
    """A Fly client pointed at localfly."""
    settings = FlySettings(api_base_url=localfly.url, logs_base_url=localfly.url, rate_limit=False)
    async with FlyClient.open(settings, FlyToken("localfly-test")) as fly:
        yield fly


@pytest.fixture
def worker_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The worker's environment for secrets: one Claude credential, or the test's (indirect)."""
    given: dict[str, str] | None = getattr(request, "param", None)
    return given or {"CLAUDE_CODE_OAUTH_TOKEN": f"sk-ant-oat01-test-{uuid.uuid4().hex}"}


@pytest.fixture
async def sortie(
    temporal: WorkflowEnvironment,
    localfly: LocalFlyProcess,
    fly_client: FlyClient,
    worker_env: dict[str, str],
    tmp_path: Path,
) -> AsyncIterator[Sortie]:
    """A worker on a fresh task queue, running for the test."""
    host, port = temporal.client.service_client.config.target_host.rsplit(":", 1)
    settings = Settings(
        temporal_address=f"{host}:{port}",
        task_queue=f"sortie-{uuid.uuid4().hex}",
        shutdown_grace_s=1.0,
        state_dir=tmp_path / "state",
    )
    async with running_worker(temporal.client, settings, fly_client, SecretStore(worker_env)):
        yield Sortie(temporal.client, settings, localfly, fly_client)
