"""Secrets resolved on the worker, by name, at the moment a machine is created.

Batch files and workflow history carry only secret names. Values come from the worker's
environment and go straight into the Fly create request; they are never returned, logged or
heartbeated, and log tails are scrubbed of them before they leave the worker. The object
store's secret key, and any presigned URL (its signature lets the holder write or read one
object), are scrubbed the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from activities.credentials import ClaudePool

REDACTED = "[redacted]"
STORE_SECRET = "AWS_SECRET_ACCESS_KEY"
_PRESIGNED = re.compile(r"\S*[?&]X-Amz-(?:Credential|Signature|Security-Token)=\S*")
"""A presigned S3 URL, whole: it grants what its signature signs until it expires."""


class SecretStore:
    """Reads named secrets, and the pool of Claude credentials, from the worker's environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self.claude = ClaudePool.from_env(self._environ)

    def __repr__(self) -> str:
        return "SecretStore(<values hidden>)"

    def available(self, names: Iterable[str]) -> list[str]:
        """The names among `names` that have a non-empty value here."""
        return sorted(n for n in set(names) if self._environ.get(n))

    def resolve(self, names: Iterable[str]) -> dict[str, str]:
        """Values for `names`; a missing name is a KeyError naming it (never its value)."""
        values: dict[str, str] = {}
        for name in names:
            value = self._environ.get(name)
            if not value:
                raise KeyError(f"secret {name} is not set on the worker")
            values[name] = value
        return values

    def scrub(self, text: str, names: Iterable[str]) -> str:
        """Replace every value of `names`, and every Claude credential, found in `text`."""
        values = [self._environ.get(name) for name in [*names, STORE_SECRET]]
        for value in values + self.claude.values():
            if value and len(value) >= 4:
                text = text.replace(value, REDACTED)
        return redact_presigned(text)


def redact_presigned(text: str) -> str:
    """`text` with every presigned S3 URL replaced whole."""
    return _PRESIGNED.sub(REDACTED, text)
