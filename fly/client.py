"""The async Fly Machines API client: one request per call, classified errors, rate limited.

Designed to be called from Temporal activities: no call is retried here (the activity's retry
policy decides, guided by ``FlyError.retryable``), create can be recovered with ``find_machine``
after a lost response, destroy treats "already gone" as success, and long waits are loops of
short calls that can run next to a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from fly.exceptions import (
    FlyConfigError,
    FlyError,
    FlyNotFound,
    FlyTransportError,
    FlyWaitTimeout,
    error_for_status,
)
from fly.models import (
    App,
    CreateMachineRequest,
    LogEntry,
    LogPage,
    LogsResponse,
    Machine,
    MachineConfig,
    StopRequest,
    UpdateMachineRequest,
    WaitResult,
    go_duration,
)
from fly.paths import app_of, machine_path, seg
from fly.ratelimit import RateLimiter
from fly.responses import parse_body, retry_after, unexpected_body
from fly.settings import FlySettings, FlyToken

__all__ = ["FlyClient"]

logger = logging.getLogger("fly")


WAIT_MAX_S = 60
"""Fly rejects wait timeouts above 60 s (and below 1 s)."""
WAIT_READ_MARGIN_S = 15.0
"""How much longer than the wait itself we let the response take before calling it lost."""
DEFAULT_TIMEOUT = httpx.Timeout(
    connect=10.0, read=WAIT_MAX_S + WAIT_READ_MARGIN_S, write=30.0, pool=30.0
)
"""Timeouts of the client ``FlyClient.open`` builds: reads long enough for a full 60 s wait."""
CALL_KEEPALIVE = 32
"""Idle connections kept for short calls (create, get, destroy, logs), over all their pools."""
CALL_POOLS = 4
"""Connection pools that short calls take turns on."""
WAIT_POOLS = 16
"""Connection pools that waits take turns on: a pool's walk grows with its connections."""

LOGS_FROM_START = "0"
"""A logs ``next_token`` (Unix nanoseconds) before any line: read from the oldest kept."""

MIN_WAIT_CALL_S = 1.0
"""The shortest a looped wait call may take, however early the server answers 408."""

_MACHINES = TypeAdapter(list[Machine])


class _ErrorBody(BaseModel):
    """Fly's error body: ``{"error": ..., "status": ...}``, or the older ``{"message": ...}``."""

    error: str | None = None
    message: str | None = None
    status: str | None = None


@dataclass(frozen=True)
class FlyEvent:
    """What observers of a client see (metrics, logs): never a token, a body or a config."""

    kind: Literal["call", "created", "destroyed"]
    action: str
    app: str
    status: int | None = None
    """The HTTP status; None when the call failed before any answer (a transport error)."""
    machine_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


FlyObserver = Callable[[FlyEvent], None]


class FlyClient:
    """Fly Machines API calls over shared ``httpx.AsyncClient`` pools that the caller owns.

    httpcore walks every connection of a pool, with a system call for each idle one, on each
    request and each response: with hundreds of calls in flight that walk costs more CPU than
    the calls. So calls go round a few pools (``http`` may be several clients) and waits, which
    hold a connection for up to 60 s each, round pools of their own (``waits``).
    """

    def __init__(
        self,
        http: httpx.AsyncClient | Sequence[httpx.AsyncClient],
        token: FlyToken,
        settings: FlySettings,
        *,
        limiter: RateLimiter | None = None,
        waits: httpx.AsyncClient | Sequence[httpx.AsyncClient] | None = None,
    ) -> None:
        self._calls = _round_robin(http)
        self._waits = self._calls if waits is None else _round_robin(waits)
        self._token = token
        self.settings = settings
        if limiter is None:
            limiter = RateLimiter() if settings.rate_limit else RateLimiter.disabled()
        self.limiter = limiter
        self.api_calls: Counter[str] = Counter()
        self.observers: list[FlyObserver] = []
        """Told of every call's outcome and of every machine created or destroyed."""
        self._api = settings.api_base_url.rstrip("/")
        self._logs = settings.logs_base_url.rstrip("/")

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: FlySettings | None = None,
        token: FlyToken | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> AsyncIterator[FlyClient]:
        """A client with its own connection pool, closed when the block ends."""
        settings = FlySettings.from_env() if settings is None else settings
        token = FlyToken.from_env() if token is None else token
        headers = {"Accept": "application/json", "User-Agent": "sortie-fly/0.1"}
        # Every running wait holds a connection: their pools keep as many alive as they may
        # open, so a wait does not pay for a new connection each time; short calls need few.
        wait_pools = min(WAIT_POOLS, settings.max_connections)
        call_pools = min(CALL_POOLS, settings.max_connections)
        per_wait_pool = settings.max_connections // wait_pools
        wait_limits = httpx.Limits(
            max_connections=per_wait_pool, max_keepalive_connections=per_wait_pool
        )
        call_limits = httpx.Limits(
            max_connections=settings.max_connections // call_pools,
            max_keepalive_connections=max(1, CALL_KEEPALIVE // call_pools),
        )
        tls = httpx.create_ssl_context()  # built once: each costs milliseconds

        def pool(limits: httpx.Limits) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=transport,
                timeout=DEFAULT_TIMEOUT,
                headers=headers,
                limits=limits,
                verify=tls,
            )

        async with contextlib.AsyncExitStack() as stack:
            calls = [await stack.enter_async_context(pool(call_limits)) for _ in range(call_pools)]
            waits = [await stack.enter_async_context(pool(wait_limits)) for _ in range(wait_pools)]
            yield cls(calls, token, settings, waits=waits)

    def __repr__(self) -> str:
        return f"FlyClient(api={self._api!r}, logs={self._logs!r}, token={self._token!r})"

    # Machines

    async def create_machine(
        self,
        app: str,
        config: MachineConfig,
        *,
        name: str | None = None,
        region: str | None = None,
        skip_launch: bool = False,
    ) -> Machine:
        """Create (and normally start) a machine; never retried, see ``find_machine``."""
        body = CreateMachineRequest(
            config=config, name=name, region=region, skip_launch=skip_launch or None
        )
        response = await self._send(
            "create", app, "POST", f"/v1/apps/{seg(app)}/machines", json=body.to_api()
        )
        machine = parse_body(Machine, response)
        metadata = dict(config.metadata or {})
        self._tell(FlyEvent("created", "create", app, response.status_code, machine.id, metadata))
        return machine

    async def update_machine(
        self,
        app: str,
        machine_id: str,
        config: MachineConfig,
        *,
        current_version: str | None = None,
        skip_launch: bool = False,
    ) -> Machine:
        """Replace the machine's whole config; Fly starts it unless ``skip_launch``. Refused
        (FlyConflict) when ``current_version`` is no longer the machine's; never retried."""
        body = UpdateMachineRequest(
            config=config, current_version=current_version, skip_launch=skip_launch or None
        )
        response = await self._send(
            "update", machine_id, "POST", machine_path(app, machine_id), json=body.to_api()
        )
        return parse_body(Machine, response)

    async def start_machine(self, app: str, machine_id: str) -> None:
        """Start a stopped machine: it boots from a clean root filesystem."""
        await self._send("start", machine_id, "POST", machine_path(app, machine_id) + "/start")

    async def get_app(self, app: str) -> App:
        """The app, or FlyAppNotFound when Fly has no such app (or the token may not see it)."""
        response = await self._send("app", app, "GET", f"/v1/apps/{seg(app)}")
        return parse_body(App, response)

    async def get_machine(self, app: str, machine_id: str) -> Machine:
        """The machine's current state, config and events (destroyed ones linger a while)."""
        response = await self._send("get", machine_id, "GET", machine_path(app, machine_id))
        return parse_body(Machine, response)

    async def list_machines(
        self,
        app: str,
        *,
        metadata: Mapping[str, str] | None = None,
        include_deleted: bool = False,
        states: Sequence[str] | None = None,
        region: str | None = None,
    ) -> list[Machine]:
        """The app's machines; metadata filters must all match. Lists may lag behind creates."""
        params: list[tuple[str, str]] = [
            (f"metadata.{key}", value) for key, value in (metadata or {}).items()
        ]
        if include_deleted:
            params.append(("include_deleted", "true"))
        if states:
            params.append(("state", ",".join(states)))
        if region:
            params.append(("region", region))
        response = await self._send(
            "list", app, "GET", f"/v1/apps/{seg(app)}/machines", params=params
        )
        try:
            return _MACHINES.validate_json(response.content)
        except ValidationError as error:
            raise unexpected_body(response, error) from None

    async def find_machine(
        self,
        app: str,
        *,
        name: str,
        metadata: Mapping[str, str] | None = None,
        include_deleted: bool = True,
    ) -> Machine | None:
        """The newest machine called ``name``: recovers a create whose response was lost.

        Lists are eventually consistent, so ``None`` right after a create may mean "not yet";
        callers retry with a deadline before creating again.
        """
        machines = await self.list_machines(app, metadata=metadata, include_deleted=include_deleted)
        matches = [machine for machine in machines if machine.name == name]
        if not matches:
            return None
        oldest = datetime.min.replace(tzinfo=UTC)
        return max(matches, key=lambda machine: (machine.created_at or oldest, machine.id))

    async def wait_machine(
        self,
        app: str,
        machine_id: str,
        states: Sequence[str],
        *,
        version: str | None = None,
        timeout: float = 60,
        from_event_id: str | None = None,
    ) -> WaitResult:
        """One wait call for any of ``states``, at most 60 s; raises FlyWaitTimeout on 408."""
        seconds = max(1, min(WAIT_MAX_S, math.ceil(timeout)))
        params: list[tuple[str, str]] = [("state", state) for state in states]
        params.append(("timeout", str(seconds)))
        if version:
            params.append(("version", version))
        if from_event_id:
            params.append(("from_event_id", from_event_id))
        response = await self._send(
            "wait",
            machine_id,
            "GET",
            machine_path(app, machine_id) + "/wait",
            params=params,
            http_timeout=httpx.Timeout(
                10.0, read=seconds + WAIT_READ_MARGIN_S, write=30.0, pool=30.0
            ),
        )
        if not response.content.strip():
            return WaitResult()
        return parse_body(WaitResult, response)

    async def wait_for_state(
        self,
        app: str,
        machine_id: str,
        states: Sequence[str],
        *,
        version: str | None = None,
        timeout: float,
        call_timeout: float = 60,
        from_event_id: str | None = None,
    ) -> WaitResult:
        """Wait calls of at most ``call_timeout`` s, looped on 408 until ``timeout`` elapses."""
        call_timeout = min(call_timeout, WAIT_MAX_S)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FlyWaitTimeout(
                    status_code=408,
                    error_text=(
                        f"machine did not reach {'|'.join(states)} within {timeout:g}s "
                        "(client-side deadline)"
                    ),
                    method="GET",
                    path=machine_path(app, machine_id) + "/wait",
                )
            call_started = time.monotonic()
            try:
                return await self.wait_machine(
                    app,
                    machine_id,
                    states,
                    version=version,
                    timeout=min(call_timeout, remaining),
                    from_event_id=from_event_id,
                )
            except FlyWaitTimeout:
                # A 408 that came back early must not turn the loop into a busy poll.
                early = call_started + MIN_WAIT_CALL_S - time.monotonic()
                if early > 0:
                    await asyncio.sleep(min(early, max(0.0, deadline - time.monotonic())))

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Ask the machine to stop: ``signal`` first, SIGKILL after ``timeout`` seconds."""
        body = StopRequest(
            signal=signal, timeout=go_duration(timeout) if timeout is not None else None
        )
        await self._send(
            "stop", machine_id, "POST", machine_path(app, machine_id) + "/stop", json=body.to_api()
        )

    async def destroy_machine(self, app: str, machine_id: str, *, force: bool = True) -> bool:
        """Destroy the machine (killing it first when ``force``); False if it was already gone."""
        params = [("force", "true")] if force else []
        try:
            await self._send(
                "destroy", machine_id, "DELETE", machine_path(app, machine_id), params=params
            )
        except FlyNotFound:
            self._tell(FlyEvent("destroyed", "destroy", app, 404, machine_id))
            return False
        self._tell(FlyEvent("destroyed", "destroy", app, 200, machine_id))
        return True

    # Logs

    async def get_logs(
        self,
        app: str,
        machine_id: str,
        *,
        next_token: str | None = None,
        region: str | None = None,
    ) -> LogPage:
        """One page of the machine's log lines from the platform logs API (lags by seconds)."""
        params = [("instance", machine_id)]
        if region:
            params.append(("region", region))
        if next_token:
            params.append(("next_token", next_token))
        response = await self._send(
            "logs",
            machine_id,
            "GET",
            f"/api/v1/apps/{seg(app)}/logs",
            params=params,
            base=self._logs,
        )
        return parse_body(LogsResponse, response).page()

    async def iter_logs(
        self, app: str, machine_id: str, *, next_token: str = LOGS_FROM_START
    ) -> AsyncIterator[LogEntry]:
        """Every log line available now after ``next_token``, paging forward to the newest."""
        while True:
            page = await self.get_logs(app, machine_id, next_token=next_token)
            for entry in page.entries:
                yield entry
            if not page.entries or not page.next_token or page.next_token == next_token:
                return
            next_token = page.next_token

    # Plumbing

    async def _send(
        self,
        action: str,
        key: str,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        json: dict[str, Any] | None = None,
        http_timeout: httpx.Timeout | None = None,
        base: str | None = None,
    ) -> httpx.Response:
        """Rate-limit, send, log and classify one request; return a 2xx response."""
        await self.limiter.acquire(action, key)
        self.api_calls[action] += 1
        url = (base or self._api) + path
        extra: dict[str, Any] = {} if http_timeout is None else {"timeout": http_timeout}
        try:
            pool = next(self._waits if action == "wait" else self._calls)
            response = await pool.request(
                method, url, params=tuple(params or ()), json=json, auth=self._token, **extra
            )
        except httpx.UnsupportedProtocol as error:
            raise FlyConfigError(f"{method} {path}: bad base URL ({error})") from None
        except httpx.TransportError as error:
            self._tell(FlyEvent("call", action, app_of(path)))
            logger.debug("%s %s -> %s", method, path, type(error).__name__)
            detail = self._token.redact(str(error)) or "no detail"
            raise FlyTransportError(f"{method} {path}: {type(error).__name__} ({detail})") from None
        logger.debug("%s %s -> %d", method, path, response.status_code)
        self._tell(FlyEvent("call", action, app_of(path), response.status_code))
        if response.is_success:
            return response
        raise self._error(action, method, path, response)

    def _tell(self, event: FlyEvent) -> None:
        """Tell every observer; a failing observer is logged and never fails the call."""
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # logged; observers only count and log, the call's outcome stands
                logger.exception("Fly observer %r failed", observer)

    def _error(self, action: str, method: str, path: str, response: httpx.Response) -> FlyError:
        """The classified error for a non-2xx response."""
        status = response.status_code
        text = response.text.strip()
        try:
            body = _ErrorBody.model_validate_json(response.content)
            text = body.error or body.message or text
        except ValidationError:
            pass
        cls = error_for_status(status, action=action)
        return cls(
            status_code=status,
            error_text=self._token.redact(text[:500]),
            method=method,
            path=path,
            request_id=response.headers.get("fly-request-id"),
            retryable=True if status == 408 else None,
            retry_after=retry_after(response.headers.get("retry-after")),
        )


def _round_robin(
    pools: httpx.AsyncClient | Sequence[httpx.AsyncClient],
) -> Iterator[httpx.AsyncClient]:
    """The pools to take turns on, one client or several."""
    return itertools.cycle((pools,) if isinstance(pools, httpx.AsyncClient) else tuple(pools))
