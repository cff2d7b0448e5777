"""The worker's Claude credentials, handed out in turn and rested by a pool every worker shares.

Credentials come from the worker's environment only: `CLAUDE_CODE_OAUTH_TOKEN`,
`ANTHROPIC_API_KEY`, and numbered ones such as `CLAUDE_CODE_OAUTH_TOKEN_2`; a numbered one may
carry its own endpoint and model (`ANTHROPIC_BASE_URL_2`, `ANTHROPIC_MODEL_2`; the unnumbered
`ANTHROPIC_BASE_URL` and `ANTHROPIC_MODEL` go with the unnumbered ones), for proxies and
gateways. A prompt job's machine gets one of them under its canonical name; history records only
which one (its name). Which one, and which rest after an authentication or rate-limit error, the
task queue's CredentialPoolWorkflow decides for every worker (workflows/credentials.py), so a
credential rested on one worker is rested on all, and stays rested across restarts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from activities.credential_models import (
    POOL_WORKFLOW,
    REST,
    TAKE,
    CredentialChoice,
    PoolState,
    RestCredential,
    TakeCredential,
)

_NAME = re.compile(r"^(CLAUDE_CODE_OAUTH_TOKEN|ANTHROPIC_API_KEY)(_\d+)?$")
DEFAULT_REST_S = 300.0
BASE_URL = "ANTHROPIC_BASE_URL"
MODEL = "ANTHROPIC_MODEL"


def pool_workflow_id(task_queue: str) -> str:
    """The id of the credential pool the workers of a task queue share."""
    return f"sortie-credentials-{task_queue}"


@dataclass(frozen=True)
class Credential:
    """One credential: its variable name here, the name the CLI reads, its value, and the
    endpoint and model that go with it (if any)."""

    name: str
    variable: str
    value: str
    base_url: str | None = None
    model: str | None = None

    def __repr__(self) -> str:
        return f"Credential({self.name})"

    def machine_env(self) -> dict[str, str]:
        """What a machine's environment gets: the value under its canonical name, and the rest."""
        env = {self.variable: self.value}
        if self.base_url:
            env[BASE_URL] = self.base_url
        if self.model:
            env[MODEL] = self.model
        return env


class NoCredential(LookupError):
    """The worker has no Claude credential at all."""


class CredentialsResting(LookupError):
    """Every Claude credential the worker holds is resting after refusals."""

    def __init__(self, names: list[str], until: datetime | None) -> None:
        when = f" until {until:%H:%M:%S} UTC" if until else ""
        super().__init__(
            f"every Claude credential is resting after rate-limit or auth refusals{when}: "
            f"{', '.join(names)}"
        )
        self.until = until


class ClaudePool:
    """The worker's Claude credentials; the shared pool workflow says which to use and rest."""

    def __init__(self, credentials: list[Credential], *, rest_s: float = DEFAULT_REST_S) -> None:
        self._credentials = {c.name: c for c in credentials}
        self.rest_s = rest_s
        self.on_rest: list[Callable[[str], None]] = []
        """Told the name (never the value) of each credential set aside, e.g. for metrics."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClaudePool:
        """Every Claude credential in the environment, in a stable order."""
        env = os.environ if environ is None else environ
        found = [
            Credential(
                name=name,
                variable=match.group(1),
                value=env[name],
                base_url=env.get(BASE_URL + (match.group(2) or "")) or None,
                model=env.get(MODEL + (match.group(2) or "")) or None,
            )
            for name in sorted(env)
            if (match := _NAME.fullmatch(name)) and env[name]
        ]
        rest = float(env.get("SORTIE_CREDENTIAL_REST", DEFAULT_REST_S))
        return cls(found, rest_s=rest)

    def __repr__(self) -> str:
        return f"ClaudePool({sorted(self._credentials)})"

    def __len__(self) -> int:
        return len(self._credentials)

    def __getitem__(self, name: str) -> Credential:
        return self._credentials[name]

    def names(self) -> list[str]:
        """The credentials' names, sorted."""
        return sorted(self._credentials)

    def values(self) -> list[str]:
        """Every credential value, for scrubbing text that leaves the worker."""
        return [c.value for c in self._credentials.values()]

    async def take(self, client: Client, task_queue: str) -> Credential:
        """The credential the shared pool hands this worker next; raises while all rest."""
        if not self._credentials:
            raise NoCredential(
                "no Claude credential on the worker: set CLAUDE_CODE_OAUTH_TOKEN or "
                "ANTHROPIC_API_KEY (or numbered ones, e.g. CLAUDE_CODE_OAUTH_TOKEN_2)"
            )
        choice = await client.execute_update_with_start_workflow(
            TAKE,
            TakeCredential(names=self.names()),
            start_workflow_operation=_pool_start(task_queue),
            result_type=CredentialChoice,
        )
        if choice.name is None or choice.name not in self._credentials:
            raise CredentialsResting(self.names(), choice.resting_until)
        return self._credentials[choice.name]

    async def rest(
        self,
        client: Client,
        task_queue: str,
        name: str,
        reason: str,
        until: datetime | None = None,
    ) -> None:
        """Set a credential aside for every worker after an auth or rate-limit failure: until
        `until` (when Claude said its usage limit resets), else for `rest_s`."""
        await client.execute_update_with_start_workflow(
            REST,
            RestCredential(name=name, seconds=self.rest_s, reason=reason, until=until),
            start_workflow_operation=_pool_start(task_queue),
        )
        for observer in self.on_rest:
            observer(name)

    def which(self, env: Mapping[str, str]) -> str | None:
        """The name of the pool credential a machine's environment carries, if any."""
        values = set(env.values())
        return next((c.name for c in self._credentials.values() if c.value in values), None)


def _pool_start(task_queue: str) -> WithStartWorkflowOperation[Any, Any]:
    """Start the task queue's pool if it is not running (an update then reaches it at once)."""
    return WithStartWorkflowOperation(
        POOL_WORKFLOW,
        PoolState(),
        id=pool_workflow_id(task_queue),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="Claude credentials: whose turn, and which rest, for every worker",
    )
