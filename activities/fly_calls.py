"""Fly calls from an activity: Fly's errors as Temporal's retry advice, transient ones retried."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

from temporalio.exceptions import ApplicationError

from activities.secrets import redact_presigned
from fly import (
    FlyError,
    FlyWaitTimeout,
)

CALL_TRIES = 4
"""Tries of one Fly call within `finish_job` before a transient error fails the activity."""


RETRY_AFTER_MOST_S = 5.0
"""The longest pause between tries of one Fly call inside an activity (Retry-After or backoff)."""


T = TypeVar("T")


@contextmanager
def fly_errors(action: str, *, always_retry: bool = False) -> Iterator[None]:
    """Translate Fly errors into ApplicationErrors that carry their retry advice."""
    try:
        yield
    except FlyError as error:
        delay = timedelta(seconds=error.retry_after) if error.retry_after else None
        raise ApplicationError(
            redact_presigned(f"{action}: {error}"),  # a Fly error may echo the config back
            type=type(error).__name__,
            non_retryable=not (error.retryable or always_retry),
            next_retry_delay=delay,
        ) from None


async def patiently(call: Callable[[], Awaitable[T]]) -> T:
    """One Fly call, tried again on a transient error before the activity gives up.

    `finish_job` makes several calls; one 429 or dropped connection among them would fail it
    and Temporal would repeat all of them after a backoff that grows to 30 s. A few quick tries
    of the one call (Retry-After honoured) keep a storm from stretching a job by minutes; a
    call that keeps failing still fails the activity, and Temporal's policy takes over.
    """
    for attempt in range(1, CALL_TRIES):
        try:
            return await call()
        except FlyWaitTimeout:
            raise  # "not yet": the caller's answer, not a fault
        except FlyError as error:
            if not error.retryable:
                raise
            delay = error.retry_after if error.retry_after is not None else 0.25 * 2**attempt
            await asyncio.sleep(min(delay, RETRY_AFTER_MOST_S))
    return await call()
