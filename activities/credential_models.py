"""What the worker's ClaudePool and the credential pool workflow exchange, and their names."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from sortie.models import StrictModel

POOL_WORKFLOW = "CredentialPoolWorkflow"
"""The pool workflow's type: the worker reaches it by name, never by importing workflows/."""
TAKE = "take"
"""The update that hands out the next credential."""
REST = "rest"
"""The update that sets a credential aside for every worker."""


class PoolState(StrictModel):
    """What the pool carries across continue-as-new: names and times, never a value."""

    last: str | None = None
    rested_until: dict[str, datetime] = {}
    reasons: dict[str, str] = {}


class TakeCredential(StrictModel):
    """A worker asks for a credential among those it holds."""

    names: list[str] = Field(min_length=1)


class CredentialChoice(StrictModel):
    """The credential to use, or none while all of the asker's rest (and until when)."""

    name: str | None
    resting_until: datetime | None = None


class RestCredential(StrictModel):
    """Set a credential aside after Claude refused it: until its usage limit resets, when
    Claude said when, else for `seconds`."""

    name: str
    seconds: float = Field(gt=0)
    reason: str = Field(default="", max_length=200)
    until: datetime | None = None


class PoolView(StrictModel):
    """What the `resting` query answers: the credentials set aside now, and why."""

    last: str | None
    resting: dict[str, datetime]
    reasons: dict[str, str]
