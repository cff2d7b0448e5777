"""Where the Fly APIs are (FlySettings, no secret) and how to authenticate (FlyToken, secret)."""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Mapping

import httpx
from pydantic import BaseModel, ConfigDict, Field

from fly.exceptions import FlyConfigError

__all__ = ["FlySettings", "FlyToken"]

# Macaroon tokens (`fly tokens create ...`) go out as `FlyV1 <token>`; anything else is a Bearer.
_MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")
_SCHEMES = re.compile(r"^(?:(?:Bearer|FlyV1)(?:\s+|$))+")
_SWITCH = {"on": True, "true": True, "1": True, "yes": True}
_SWITCH |= {"off": False, "false": False, "0": False, "no": False}


class FlySettings(BaseModel):
    """Fly endpoints and client behaviour; safe to log, holds no secret."""

    model_config = ConfigDict(frozen=True)

    api_base_url: str = "https://api.machines.dev"
    logs_base_url: str = "https://api.fly.io"
    app: str | None = None
    rate_limit: bool = True
    create_rate: float = Field(default=1.0, gt=0)
    """Creates a second per app, for all workers together (Fly: 1/s with bursts of 3); each
    app's pacer workflow holds the workers' creates to it while `rate_limit` is on."""
    max_connections: int = Field(default=1000, ge=1)
    """Connections kept open to Fly: each running wait holds one for up to 60 s."""

    @property
    def paced_create_rate(self) -> float | None:
        """The create rate each app's pacer holds all workers' creates to; None: unpaced."""
        return self.create_rate if self.rate_limit else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FlySettings:
        """Read FLY_API_BASE_URL, FLY_LOGS_BASE_URL, FLY_APP and SORTIE_FLY_* (limits, pool)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for key, name in (
            ("api_base_url", "FLY_API_BASE_URL"),
            ("logs_base_url", "FLY_LOGS_BASE_URL"),
            ("app", "FLY_APP"),
        ):
            if value := env.get(name, "").strip():
                values[key] = value
        if connections := env.get("SORTIE_FLY_MAX_CONNECTIONS", "").strip():
            values["max_connections"] = connections
        if rate := env.get("SORTIE_FLY_CREATE_RATE", "").strip():
            values["create_rate"] = rate
        if switch := env.get("SORTIE_FLY_RATE_LIMIT", "").strip().lower():
            if switch not in _SWITCH:
                raise FlyConfigError(f"SORTIE_FLY_RATE_LIMIT must be on or off, not {switch!r}")
            values["rate_limit"] = _SWITCH[switch]
        return cls.model_validate(values)


class FlyToken(httpx.Auth):
    """A Fly API token: adds the Authorization header to each request and never shows itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        token = _strip_scheme(value)
        if not token:
            raise FlyConfigError("the Fly API token is empty")
        self._value = token

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FlyToken:
        """Read FLY_API_TOKEN; a missing or empty token is a configuration error."""
        env = os.environ if environ is None else environ
        value = env.get("FLY_API_TOKEN", "")
        if not _strip_scheme(value):
            raise FlyConfigError(
                "FLY_API_TOKEN is not set; create one with `fly tokens create deploy`"
            )
        return cls(value)

    def authorization(self) -> str:
        """The Authorization header value, with the scheme fly-go would choose for this token."""
        parts = [part.strip() for part in self._value.split(",") if part.strip()]
        macaroons = [part for part in parts if part.startswith(_MACAROON_PREFIXES)]
        if macaroons:
            return "FlyV1 " + ",".join(macaroons)
        return "Bearer " + self._value

    def redact(self, text: str) -> str:
        """``text`` with any occurrence of the token replaced, for messages that echo input."""
        return text.replace(self._value, "…redacted") if self._value in text else text

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Set the header on the outgoing request only; it is never stored anywhere else."""
        request.headers["Authorization"] = self.authorization()
        yield request

    def __repr__(self) -> str:
        prefix = next((p for p in _MACAROON_PREFIXES if self._value.startswith(p)), "")
        return f"FlyToken('{prefix}…redacted')"

    __str__ = __repr__


def _strip_scheme(value: str) -> str:
    """The token without any leading `Bearer ` / `FlyV1 ` (docs sometimes show both)."""
    return _SCHEMES.sub("", value.strip())
