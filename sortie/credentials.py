"""The worker's pool of Claude credentials, used round-robin and rested after failures.

Credentials come from the worker's environment only: `CLAUDE_CODE_OAUTH_TOKEN`,
`ANTHROPIC_API_KEY`, and numbered ones such as `CLAUDE_CODE_OAUTH_TOKEN_2`. A prompt job's
machine gets one of them under its canonical name; history records only which one (its name). A
credential whose job failed with an authentication or rate-limit error is set aside for a while
so the next jobs use the others.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^(CLAUDE_CODE_OAUTH_TOKEN|ANTHROPIC_API_KEY)(_\d+)?$")
DEFAULT_REST_S = 300.0


@dataclass(frozen=True)
class Credential:
    """One credential: its variable name here, the name the CLI reads, and its value."""

    name: str
    variable: str
    value: str

    def __repr__(self) -> str:
        return f"Credential({self.name})"


class NoCredential(LookupError):
    """The worker has no Claude credential at all."""


class ClaudePool:
    """Round-robin over the worker's Claude credentials, skipping rested ones while it can."""

    def __init__(
        self,
        credentials: list[Credential],
        *,
        rest_s: float = DEFAULT_REST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._credentials = credentials
        self._rest_s = rest_s
        self._clock = clock
        self._next = 0
        self._rested_until: dict[str, float] = {}
        self.on_rest: list[Callable[[str], None]] = []
        """Told the name (never the value) of each credential set aside, e.g. for metrics."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClaudePool:
        """Every Claude credential in the environment, in a stable order."""
        env = os.environ if environ is None else environ
        found = [
            Credential(name=name, variable=match.group(1), value=env[name])
            for name in sorted(env)
            if (match := _NAME.fullmatch(name)) and env[name]
        ]
        rest = float(env.get("SORTIE_CREDENTIAL_REST", DEFAULT_REST_S))
        return cls(found, rest_s=rest)

    def __repr__(self) -> str:
        return f"ClaudePool({[c.name for c in self._credentials]})"

    def __len__(self) -> int:
        return len(self._credentials)

    def values(self) -> list[str]:
        """Every credential value, for scrubbing text that leaves the worker."""
        return [c.value for c in self._credentials]

    def take(self) -> Credential:
        """The next credential not resting; when all rest, the one that recovers first."""
        if not self._credentials:
            raise NoCredential(
                "no Claude credential on the worker: set CLAUDE_CODE_OAUTH_TOKEN or "
                "ANTHROPIC_API_KEY (or numbered ones, e.g. CLAUDE_CODE_OAUTH_TOKEN_2)"
            )
        now = self._clock()
        count = len(self._credentials)
        for step in range(count):
            candidate = self._credentials[(self._next + step) % count]
            if self._rested_until.get(candidate.name, 0.0) <= now:
                self._next = (self._next + step + 1) % count
                return candidate
        return min(self._credentials, key=lambda c: self._rested_until.get(c.name, 0.0))

    def which(self, env: Mapping[str, str]) -> str | None:
        """The name of the pool credential a machine's environment carries, if any."""
        values = set(env.values())
        return next((c.name for c in self._credentials if c.value in values), None)

    def rest(self, name: str) -> None:
        """Set a credential aside after an auth or rate-limit failure."""
        self._rested_until[name] = self._clock() + self._rest_s
        for observer in self.on_rest:
            observer(name)

    def resting(self) -> list[str]:
        """Names of the credentials set aside right now."""
        now = self._clock()
        return sorted(n for n, until in self._rested_until.items() if until > now)
