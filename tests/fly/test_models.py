"""Pure unit tests of the Fly client's parts: models, settings, token, errors, rate limiter."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest

from fly import (
    SETTLED_STATES,
    ExitEvent,
    FlyAPIError,
    FlyAppNotFound,
    FlyBadRequest,
    FlyConfigError,
    FlyConflict,
    FlyForbidden,
    FlyNotFound,
    FlyPreconditionFailed,
    FlyRateLimited,
    FlyServerError,
    FlySettings,
    FlyToken,
    FlyUnauthorized,
    FlyUnprocessable,
    FlyWaitTimeout,
    InitConfig,
    Machine,
    MachineConfig,
    MachineState,
    Rate,
    RateLimiter,
    RestartConfig,
    StopConfig,
)
from fly.exceptions import error_for_status
from fly.models import CreateMachineRequest, LogsResponse, go_duration

SECRET = "fm2_c2VjcmV0LXRva2VuLXZhbHVl"


def _event(type_: str, ts: int, request: dict[str, object] | None = None) -> dict[str, object]:
    return {"id": f"ev{ts}", "type": type_, "status": "x", "source": "flyd", "timestamp": ts,
            "request": request}  # fmt: skip


# Models


def test_machine_events_sorted_newest_first_and_unknown_fields_kept() -> None:
    machine = Machine.model_validate(
        {
            "id": "1857156b526dd8",
            "state": "stopped",
            "brand_new_field": {"x": 1},
            "events": [_event("launch", 1), _event("exit", 3), _event("start", 2)],
        }
    )
    assert [event.type for event in machine.events] == ["exit", "start", "launch"]
    assert machine.model_extra == {"brand_new_field": {"x": 1}}


def test_exit_event_prefers_monitor_event_nesting() -> None:
    request = {
        "exit_event": {"exit_code": 1},
        "MonitorEvent": {"exit_event": {"exit_code": 137, "signal": 9, "oom_killed": True}},
    }
    machine = Machine.model_validate(
        {"id": "m", "state": "stopped", "events": [_event("exit", 5, request)]}
    )
    exit_event = machine.latest_exit_event()
    assert exit_event is not None
    assert (exit_event.exit_code, exit_event.signal, exit_event.oom_killed) == (137, 9, True)


def test_exit_event_falls_back_to_plain_nesting() -> None:
    machine = Machine.model_validate(
        {
            "id": "m",
            "state": "stopped",
            "events": [_event("exit", 5, {"exit_event": {"exit_code": 3}, "restart_count": 0})],
        }
    )
    assert machine.latest_exit_event() == ExitEvent(exit_code=3)


def test_latest_exit_event_skips_exit_events_without_details() -> None:
    machine = Machine.model_validate(
        {
            "id": "m",
            "state": "stopped",
            "events": [
                _event("exit", 1, {"exit_event": {"exit_code": 2}}),
                _event("exit", 9, {"something": "else"}),
                _event("start", 10),
            ],
        }
    )
    exit_event = machine.latest_exit_event()
    assert exit_event is not None and exit_event.exit_code == 2
    assert Machine(id="m", state="failed").latest_exit_event() is None


def test_exited_at_parses_strings_and_milliseconds() -> None:
    as_string = ExitEvent.model_validate({"exited_at": "2026-08-22T19:20:00Z"})
    as_millis = ExitEvent.model_validate({"exited_at": 1787426400000})
    assert as_string.exited_at == datetime(2026, 8, 22, 19, 20, tzinfo=UTC)
    assert as_millis.exited_at == datetime(2026, 8, 22, 19, 20, tzinfo=UTC)
    assert ExitEvent.model_validate({"exited_at": "0001-01-01T00:00:00Z"}).exited_at is None


def test_current_version_falls_back_to_instance_id() -> None:
    assert Machine(id="m", state="started", instance_id="i1").current_version == "i1"
    assert Machine(id="m", state="started", instance_id="i1", version="v2").current_version == "v2"


def test_config_the_client_cannot_model_does_not_hide_the_machine() -> None:
    machine = Machine.model_validate(
        {"id": "m", "state": "started", "config": {"image": "x", "restart": {"policy": "new"}}}
    )
    assert machine.state == "started" and machine.config is None


def test_request_body_uses_json_names_and_omits_unset_options() -> None:
    config = MachineConfig(
        image="alpine",
        init=InitConfig(exec=["sh", "-c", "exit 0"]),
        restart=RestartConfig(policy="no"),
        stop_config=StopConfig(signal="SIGTERM"),
        metadata={"job": "1"},
    )
    body = CreateMachineRequest(config=config, name="job-1").to_api()
    assert body == {
        "name": "job-1",
        "config": {
            "image": "alpine",
            "env": {},
            "init": {"exec": ["sh", "-c", "exit 0"]},
            "restart": {"policy": "no"},
            "metadata": {"job": "1"},
            "stop_config": {"signal": "SIGTERM"},
            "mounts": [],
        },
    }


def test_durations_are_go_strings() -> None:
    assert go_duration(10) == "10s"
    assert go_duration(1.5) == "1500ms"
    assert StopConfig.model_validate({"timeout": 5_000_000_000}).timeout == "5s"


def test_logs_response_pages() -> None:
    page = LogsResponse.model_validate(
        {
            "data": [
                {
                    "id": "a",
                    "attributes": {
                        "timestamp": "2026-01-02T03:04:05.123456789Z",
                        "message": "hello",
                        "level": "info",
                        "instance": "m1",
                        "region": "ams",
                        "meta": {"event": {"provider": "app"}},
                    },
                }
            ],
            "meta": {"next_token": 1767323045123456789},
        }
    ).page()
    assert [entry.message for entry in page.entries] == ["hello"]
    assert page.next_token == "1767323045123456789"


def test_machine_states() -> None:
    assert MachineState("stopped") is MachineState.STOPPED
    assert {"stopped", "failed", "destroyed"} <= SETTLED_STATES
    assert "started" not in SETTLED_STATES


# Settings and token


def test_settings_from_env() -> None:
    assert FlySettings.from_env({}) == FlySettings()
    settings = FlySettings.from_env(
        {
            "FLY_API_BASE_URL": "http://127.0.0.1:4280",
            "FLY_LOGS_BASE_URL": "http://127.0.0.1:4281",
            "FLY_APP": "demo",
            "SORTIE_FLY_RATE_LIMIT": "off",
        }
    )
    assert settings.api_base_url == "http://127.0.0.1:4280"
    assert settings.logs_base_url == "http://127.0.0.1:4281"
    assert (settings.app, settings.rate_limit) == ("demo", False)
    with pytest.raises(FlyConfigError):
        FlySettings.from_env({"SORTIE_FLY_RATE_LIMIT": "sometimes"})


@pytest.mark.parametrize(
    ("raw", "header"),
    [
        ("fm2_abc", "FlyV1 fm2_abc"),
        ("FlyV1 fm2_abc", "FlyV1 fm2_abc"),
        ("Bearer FlyV1 fm1r_a,fm2_b", "FlyV1 fm1r_a,fm2_b"),
        ("fm1a_x", "FlyV1 fm1a_x"),
        ("personal-token", "Bearer personal-token"),
        ("Bearer personal-token", "Bearer personal-token"),
    ],
)
def test_token_scheme(raw: str, header: str) -> None:
    assert FlyToken(raw).authorization() == header


def test_token_from_env_requires_a_value() -> None:
    with pytest.raises(FlyConfigError, match="FLY_API_TOKEN"):
        FlyToken.from_env({})
    with pytest.raises(FlyConfigError):
        FlyToken.from_env({"FLY_API_TOKEN": "  FlyV1 "})
    assert FlyToken.from_env({"FLY_API_TOKEN": SECRET}).authorization() == f"FlyV1 {SECRET}"


def test_token_never_shows_itself() -> None:
    token = FlyToken(SECRET)
    for text in (str(token), repr(token), f"{token}", str(vars(token)), str([token])):
        assert SECRET not in text
    assert repr(token) == "FlyToken('fm2_…redacted')"
    assert repr(FlyToken("plain")) == "FlyToken('…redacted')"


def test_token_sets_the_header_per_request() -> None:
    request = httpx.Request("GET", "http://example.test/")
    flow = FlyToken("Bearer plain").auth_flow(request)
    assert next(flow).headers["Authorization"] == "Bearer plain"


# Errors


@pytest.mark.parametrize(
    ("status", "action", "cls", "retryable"),
    [
        (400, "create", FlyBadRequest, False),
        (401, "get", FlyUnauthorized, False),
        (403, "get", FlyForbidden, False),
        (404, "get", FlyNotFound, False),
        (404, "create", FlyAppNotFound, False),
        (404, "list", FlyAppNotFound, False),
        (408, "wait", FlyWaitTimeout, True),
        (409, "create", FlyConflict, False),
        (412, "stop", FlyPreconditionFailed, False),
        (422, "create", FlyUnprocessable, False),
        (429, "get", FlyRateLimited, True),
        (500, "get", FlyServerError, True),
        (503, "create", FlyServerError, True),
        (418, "get", FlyAPIError, False),
    ],
)
def test_error_classes(status: int, action: str, cls: type[FlyAPIError], retryable: bool) -> None:
    error_cls = error_for_status(status, action=action)
    assert error_cls is cls
    error = error_cls(status_code=status, error_text="x", method="GET", path="/v1/apps/a")
    assert error.retryable is retryable
    assert error.retry_after is None
    assert "/v1/apps/a" in str(error) and str(status) in str(error)


# Rate limiter


class FakeTime:
    """A monotonic clock that sleeping advances, and a record of every sleep."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


async def test_limiter_allows_the_burst_then_the_sustained_rate() -> None:
    fake = FakeTime()
    limiter = RateLimiter(headroom=0, clock=fake.clock, sleep=fake.sleep)
    for _ in range(5):
        await limiter.acquire("create", "app")
    assert fake.sleeps == [1.0, 1.0]
    await limiter.acquire("create", "other-app")  # another identifier has its own bucket
    await limiter.acquire("list", "app")  # and so does another action
    assert fake.sleeps == [1.0, 1.0]


async def test_limiter_get_is_faster_and_headroom_keeps_a_token_back() -> None:
    fake = FakeTime()
    limiter = RateLimiter(clock=fake.clock, sleep=fake.sleep)
    for _ in range(10):
        await limiter.acquire("get", "m1")
    assert fake.sleeps == [0.2]
    for _ in range(3):
        await limiter.acquire("wait", "m1")
    assert fake.sleeps == [0.2, 1.0]


async def test_limiter_serves_concurrent_callers_in_order() -> None:
    fake = FakeTime()

    async def record(seconds: float) -> None:
        fake.sleeps.append(seconds)  # the clock stands still: all six arrive at once

    limiter = RateLimiter(
        {"create": Rate(per_second=2.0, burst=2)}, headroom=0, clock=fake.clock, sleep=record
    )
    await asyncio.gather(*(limiter.acquire("create", "app") for _ in range(6)))
    # Reservations are taken at once, so waits grow by one interval each.
    assert sorted(fake.sleeps) == [0.5, 1.0, 1.5, 2.0]


async def test_limiter_refunds_a_cancelled_reservation() -> None:
    fake = FakeTime()
    gate = asyncio.Event()

    async def blocked_sleep(seconds: float) -> None:
        fake.sleeps.append(seconds)
        await gate.wait()

    limiter = RateLimiter(headroom=0, clock=fake.clock, sleep=blocked_sleep)
    for _ in range(3):
        await limiter.acquire("stop", "m")
    waiter = asyncio.create_task(limiter.acquire("stop", "m"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    fake.now += 1.0
    await limiter.acquire("stop", "m")  # the refunded token plus one second's refill
    assert fake.sleeps == [1.0]


async def test_limiter_drops_idle_full_buckets() -> None:
    fake = FakeTime()
    limiter = RateLimiter(clock=fake.clock, sleep=fake.sleep, sweep_every=10)
    for index in range(1000):
        await limiter.acquire("get", f"machine-{index}")
    assert len(limiter) == 1000
    fake.now += 60
    await limiter.acquire("get", "fresh")
    assert len(limiter) == 1


async def test_disabled_limiter_never_waits() -> None:
    limiter = RateLimiter.disabled()
    assert not limiter.enabled
    for _ in range(100):
        await limiter.acquire("create", "app")
    assert len(limiter) == 0
