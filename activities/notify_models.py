"""What the notify activity is given and answers: names and counts, never a secret value."""

from __future__ import annotations

from sortie.models import Counts, StrictModel
from sortie.notify import Notify, NotifyEvent


class NoticeInput(StrictModel):
    """Tell the batch's webhook of one event; `delivery` names it for the receiver, once."""

    batch_id: str
    name: str
    event: NotifyEvent
    delivery: str
    """`<batch id>/<event>` (`/paused-<n>` for the n-th pause): the same on every retry."""
    notify: Notify
    status: str
    counts: Counts
    chunks: int = 0
    """How many chunks the batch has: where its rows are, for the top causes of failure."""
    reason: str | None = None


class NoticeOutput(StrictModel):
    """What became of the POST: the receiver's status, or that an earlier try delivered it."""

    status: int | None = None
    delivered_before: bool = False
