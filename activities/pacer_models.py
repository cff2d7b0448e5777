"""What the worker's AppPacer and an app's create pacer workflow exchange, and their names."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from sortie.models import StrictModel

PACER_WORKFLOW = "CreatePacerWorkflow"
"""The pacer workflow's type: the worker reaches it by name, never by importing workflows/."""
RESERVE = "reserve"
"""The update that reserves create turns."""


class PacerState(StrictModel):
    """What the pacer carries across continue-as-new: when the bucket is full again."""

    full_at: datetime | None = None


class ReserveCreates(StrictModel):
    """A worker asks for `count` turns at the asker's rate and burst."""

    count: int = Field(ge=1, le=1000)
    rate: float = Field(gt=0)
    burst: int = Field(ge=1)


class CreateTurns(StrictModel):
    """When each reserved create may go, in order: seconds from now, and the pacer's time."""

    waits_s: list[float]
    at: list[datetime]
