"""Pydantic models of the Machines API and logs API payloads a batch runner needs.

Response models keep unknown fields (``extra="allow"``) so newer API versions parse, and
round-trip what they do not understand. Request bodies are dumped with ``exclude_none`` so
unset options are left to Fly's defaults.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

__all__ = [
    "SETTLED_STATES",
    "TERMINAL_STATES",
    "WAITABLE_STATES",
    "CreateMachineRequest",
    "ExitEvent",
    "GuestConfig",
    "InitConfig",
    "LogEntry",
    "LogPage",
    "LogsResponse",
    "Machine",
    "MachineConfig",
    "MachineEvent",
    "MachineState",
    "Mount",
    "RestartConfig",
    "StopConfig",
    "StopRequest",
    "WaitResult",
    "go_duration",
]

logger = logging.getLogger("fly")


class FlyModel(BaseModel):
    """Base of all API models: unknown fields kept, fields settable by name or alias."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_api(self) -> dict[str, Any]:
        """The JSON body Fly expects: aliases, no unset options."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class MachineState(StrEnum):
    """Every machine state of the fact sheet (§5): persistent, transient and terminal."""

    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    FAILED = "failed"
    CREATING = "creating"
    STARTING = "starting"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    SUSPENDING = "suspending"
    DESTROYING = "destroying"
    LAUNCH_FAILED = "launch_failed"
    UPDATING = "updating"
    REPLACING = "replacing"
    DESTROYED = "destroyed"
    REPLACED = "replaced"
    MIGRATED = "migrated"


TERMINAL_STATES: frozenset[str] = frozenset(
    {MachineState.DESTROYED, MachineState.REPLACED, MachineState.MIGRATED}
)
"""States a machine (version) never leaves."""

SETTLED_STATES: frozenset[str] = frozenset(
    {MachineState.STOPPED, MachineState.SUSPENDED, MachineState.FAILED, MachineState.DESTROYED}
)
"""States where a run-to-completion job is no longer running and nothing is in motion."""

WAITABLE_STATES: frozenset[str] = frozenset(
    {"started", "stopped", "suspended", "destroyed", "failed", "settled"}
)
"""Values the wait endpoint accepts for ``state``."""


def go_duration(seconds: float) -> str:
    """A Go duration string ("10s", "1500ms") as Fly's stop timeouts expect."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class GuestConfig(FlyModel):
    """The VM size: CPU kind and count, memory."""

    cpu_kind: str = "shared"
    cpus: int = 1
    memory_mb: int = 256
    max_memory_mb: int | None = None
    gpus: int | None = None
    gpu_kind: str | None = None
    kernel_args: list[str] | None = None
    host_dedication_id: str | None = None


class InitConfig(FlyModel):
    """What the machine runs: ``exec`` replaces the command line, else entrypoint + cmd."""

    exec: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    tty: bool | None = None
    swap_size_mb: int | None = None
    kernel_args: list[str] | None = None


class RestartConfig(FlyModel):
    """What happens when the main process exits; batch jobs want ``policy="no"``."""

    policy: Literal["no", "always", "on-failure", "spot-price"] | None = None
    max_retries: int | None = None


class StopConfig(FlyModel):
    """Signal sent on stop, and how long to wait before SIGKILL (a Go duration string)."""

    signal: str | None = None
    timeout: str | None = None

    @field_validator("timeout", mode="before")
    @classmethod
    def _nanoseconds(cls, value: object) -> object:
        """Fly documents the timeout as integer nanoseconds too; normalise to a duration."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return go_duration(value / 1e9)
        return value


class Mount(FlyModel):
    """A volume mounted into the machine."""

    volume: str | None = None
    path: str | None = None
    name: str | None = None
    size_gb: int | None = None
    encrypted: bool | None = None
    extend_threshold_percent: int | None = None
    add_size_gb: int | None = None
    size_gb_limit: int | None = None


class MachineFile(FlyModel):
    """A file written into the machine before it boots (``raw_value`` is base64)."""

    guest_path: str
    raw_value: str | None = None
    secret_name: str | None = None
    mode: int | None = None


class MachineConfig(FlyModel):
    """A machine's configuration; only ``image`` is required."""

    image: str
    env: dict[str, str] = Field(default_factory=dict)
    init: InitConfig | None = None
    guest: GuestConfig | None = None
    auto_destroy: bool | None = None
    restart: RestartConfig | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    stop_config: StopConfig | None = None
    mounts: list[Mount] = Field(default_factory=list)
    files: list[MachineFile] | None = None


class CreateMachineRequest(FlyModel):
    """Body of ``POST /v1/apps/{app}/machines``."""

    config: MachineConfig
    name: str | None = None
    region: str | None = None
    skip_launch: bool | None = None


class UpdateMachineRequest(FlyModel):
    """Body of ``POST /v1/apps/{app}/machines/{id}``: the whole new config (no partial update)."""

    config: MachineConfig
    current_version: str | None = None
    skip_launch: bool | None = None


class StopRequest(FlyModel):
    """Body of ``POST .../stop``: always a JSON object, possibly empty."""

    signal: str | None = None
    timeout: str | None = None


def _exited_at(value: object) -> object:
    """Exit times come as RFC 3339 strings or as integer milliseconds; Go's zero time is none."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, tz=UTC) if value > 0 else None
    if isinstance(value, str) and value.startswith("0001-01-01"):
        return None
    return value


class ExitEvent(FlyModel):
    """How the main process ended; ``signal``/``guest_signal`` are -1 when none."""

    exit_code: int | None = None
    guest_exit_code: int | None = None
    guest_signal: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    requested_stop: bool = False
    restarting: bool = False
    exited_at: datetime | None = None

    @field_validator("exited_at", mode="before")
    @classmethod
    def _either_time_format(cls, value: object) -> object:
        """Accept RFC 3339 strings and integer milliseconds alike."""
        return _exited_at(value)


class _MonitorEvent(FlyModel):
    """``request.MonitorEvent``: the nesting fly-go reads first."""

    exit_event: ExitEvent | None = None


class _EventRequest(FlyModel):
    """The parts of an event's ``request`` that carry exit details."""

    monitor_event: _MonitorEvent | None = Field(default=None, alias="MonitorEvent")
    exit_event: ExitEvent | None = None
    restart_count: int | None = None


class MachineEvent(FlyModel):
    """One entry of a machine's event history; ``timestamp`` is milliseconds since the epoch."""

    id: str | None = None
    type: str
    status: str | None = None
    source: str | None = None
    timestamp: int = 0
    request: dict[str, Any] | None = None

    @property
    def exit_event(self) -> ExitEvent | None:
        """Exit details from ``request.MonitorEvent.exit_event``, else ``request.exit_event``."""
        if not self.request:
            return None
        try:
            request = _EventRequest.model_validate(self.request)
        except ValidationError:
            logger.debug("unparseable exit details in event %s", self.id)
            return None
        if request.monitor_event is not None and request.monitor_event.exit_event is not None:
            return request.monitor_event.exit_event
        return request.exit_event


class Machine(FlyModel):
    """A Fly machine as get, list and create return it; events are sorted newest first."""

    id: str
    name: str | None = None
    state: str
    region: str | None = None
    instance_id: str | None = None
    version: str | None = None
    private_ip: str | None = None
    config: MachineConfig | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    events: list[MachineEvent] = Field(default_factory=list)

    @field_validator("config", mode="wrap")
    @classmethod
    def _lenient_config(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """A config this client cannot model must not hide the machine's state and events."""
        try:
            return handler(value)
        except ValidationError as error:
            logger.debug("machine config not understood, kept as None: %s", error)
            return None

    @model_validator(mode="after")
    def _newest_first(self) -> Machine:
        """Order events by timestamp, newest first: the API's order is not guaranteed."""
        self.events.sort(key=lambda event: event.timestamp, reverse=True)
        return self

    @property
    def current_version(self) -> str | None:
        """The version to pass to wait: ``version``, or the older ``instance_id``."""
        return self.version or self.instance_id

    def latest_exit_event(self) -> ExitEvent | None:
        """Exit details of the newest ``exit`` event that has any, since the config's last
        update: an exit before it was another version's (another job's, on a reused machine)."""
        for event in self.events:
            if event.type == "update":
                return None
            if event.type == "exit" and (exit_event := event.exit_event) is not None:
                return exit_event
        return None


class App(FlyModel):
    """An app as `GET /v1/apps/{app}` describes it."""

    id: str | None = None
    name: str
    status: str | None = None


class WaitResult(FlyModel):
    """A successful wait; older API versions answer only ``{"ok": true}``."""

    ok: bool = True
    state: str | None = None
    event_id: str | None = None
    version: str | None = None


class LogEntry(FlyModel):
    """One log line of a machine, from the platform logs API."""

    timestamp: datetime
    message: str = ""
    level: str = ""
    instance: str = ""
    region: str = ""


class LogPage(FlyModel):
    """One page of log lines; pass ``next_token`` to read the lines after it."""

    entries: list[LogEntry] = Field(default_factory=list)
    next_token: str | None = None


class _LogRecord(FlyModel):
    """A JSON:API resource of the logs response."""

    id: str | None = None
    attributes: LogEntry


class _LogMeta(FlyModel):
    """The envelope's ``meta``: the paging token (nanoseconds, as a string or a number)."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    next_token: str | None = None


class LogsResponse(FlyModel):
    """The logs API's JSON:API envelope."""

    data: list[_LogRecord] = Field(default_factory=list)
    meta: _LogMeta = Field(default_factory=_LogMeta)

    def page(self) -> LogPage:
        """The entries and the token for the next page."""
        return LogPage(
            entries=[record.attributes for record in self.data], next_token=self.meta.next_token
        )
