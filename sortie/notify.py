"""A batch file's `notify` block: the webhook told of its end and pauses, and its secrets."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sortie.fields import SECRET_PATTERN


class NotifyEvent(StrEnum):
    """What a batch tells its webhook: it ran to its end, was refused, was cancelled, paused."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"


class NotifyFormat(StrEnum):
    """The POST's body: Sortie's JSON document, or a Slack incoming-webhook message."""

    JSON = "json"
    SLACK = "slack"


_URL_SECRET = re.compile(r"\$\{([^}]*)\}")
_SECRET_QUERY = re.compile(r"(?:^|&)[^=&]*(?:token|key|secret|sig|pass|auth)[^=&]*=(?!\$\{)[^&]")


class Notify(BaseModel):
    """POST each of `events` to `url`, signed with HMAC-SHA256 by the worker secret `secret`.

    `${NAME}` in `url` is the worker secret NAME, put in on the worker when the POST is sent, so
    a URL's secret parts (a Slack hook's path, a token) never reach history or logs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    events: list[NotifyEvent] = Field(default=list(NotifyEvent), min_length=1)
    secret: str | None = Field(default=None, pattern=SECRET_PATTERN)
    format: NotifyFormat = NotifyFormat.JSON

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        names = _URL_SECRET.findall(url)
        bad = [n for n in names if not re.fullmatch(SECRET_PATTERN, n)]
        if bad:
            raise ValueError(f"${{{bad[0]}}} in url is no secret name")
        parts = urlsplit(_URL_SECRET.sub("x", url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host/..., got {_URL_SECRET.sub('…', url)!r}")
        if "@" in parts.netloc or _SECRET_QUERY.search(urlsplit(url).query):
            raise ValueError(
                "url holds a credential: put it in a worker secret and write ${NAME} in its place"
            )
        return url

    @model_validator(mode="after")
    def _signed(self) -> Self:
        if self.format is NotifyFormat.JSON and self.secret is None:
            raise ValueError("notify: `secret` (a worker secret) is needed to sign JSON POSTs")
        return self

    def secret_names(self) -> list[str]:
        """The worker secrets the POSTs need: the signing key and those in the URL."""
        return sorted({*_URL_SECRET.findall(self.url), *filter(None, [self.secret])})
