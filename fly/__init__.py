"""Async client for the Fly.io Machines API, built to be driven by Temporal activities.

async with FlyClient.open() as fly:
    machine = await fly.create_machine("my-app", MachineConfig(image="alpine"), name="job-1")
    await fly.wait_for_state("my-app", machine.id, ["stopped"], timeout=600)
"""

from fly.client import FlyClient, FlyEvent, FlyObserver
from fly.exceptions import (
    FlyAPIError,
    FlyAppNotFound,
    FlyBadRequest,
    FlyConfigError,
    FlyConflict,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyPreconditionFailed,
    FlyRateLimited,
    FlyServerError,
    FlyTransportError,
    FlyUnauthorized,
    FlyUnprocessable,
    FlyWaitTimeout,
)
from fly.models import (
    SETTLED_STATES,
    TERMINAL_STATES,
    WAITABLE_STATES,
    ExitEvent,
    GuestConfig,
    InitConfig,
    LogEntry,
    LogPage,
    Machine,
    MachineConfig,
    MachineEvent,
    MachineFile,
    MachineState,
    Mount,
    RestartConfig,
    StopConfig,
    WaitResult,
)
from fly.ratelimit import Rate, RateLimiter
from fly.settings import FlySettings, FlyToken

__all__ = [
    "SETTLED_STATES",
    "TERMINAL_STATES",
    "WAITABLE_STATES",
    "ExitEvent",
    "FlyAPIError",
    "FlyAppNotFound",
    "FlyBadRequest",
    "FlyClient",
    "FlyConfigError",
    "FlyConflict",
    "FlyError",
    "FlyEvent",
    "FlyForbidden",
    "FlyNotFound",
    "FlyObserver",
    "FlyPreconditionFailed",
    "FlyRateLimited",
    "FlyServerError",
    "FlySettings",
    "FlyToken",
    "FlyTransportError",
    "FlyUnauthorized",
    "FlyUnprocessable",
    "FlyWaitTimeout",
    "GuestConfig",
    "InitConfig",
    "LogEntry",
    "LogPage",
    "Machine",
    "MachineConfig",
    "MachineEvent",
    "MachineFile",
    "MachineState",
    "Mount",
    "Rate",
    "RateLimiter",
    "RestartConfig",
    "StopConfig",
    "WaitResult",
]
