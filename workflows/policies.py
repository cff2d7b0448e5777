"""Timeouts and retry policies of the machine activities, in one place."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

# Transient Fly errors (429, 5xx, dropped connections) are retried with exponential backoff;
# a 429's Retry-After overrides the interval. Non-retryable errors are raised as such by the
# activities, so no type list is needed here.
FLY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)

# Destroy never gives up: a machine must not outlive its job. A destroy that keeps failing shows
# in the UI as a pending activity with its attempt count and last error.
DESTROY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=0,
)

CREATE_DEADLINE = timedelta(minutes=30)
COLLECT_DEADLINE = timedelta(minutes=10)
WAIT_MARGIN = timedelta(minutes=5)

# A closed chunk's rows are its only record: writing them to the store never gives up either.
STORE_RETRY = DESTROY_RETRY

# A webhook down for a while: tried again until NOTIFY_DEADLINE, then given up (logged); the
# batch waits for its last notice that long at most.
NOTIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=60),
)
NOTIFY_DEADLINE = timedelta(minutes=10)
