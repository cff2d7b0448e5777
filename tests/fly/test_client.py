"""The Fly client against a real localfly on loopback.

One localfly serves the module; each test uses its own app so localfly's stats are its own.
Faults are switched per test and cleared afterwards. HTTP mocks appear only at the end, for
answers localfly cannot give (odd bodies, proxies' HTML, dates in Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from fly import (
    FlyAPIError,
    FlyAppNotFound,
    FlyBadRequest,
    FlyClient,
    FlyConflict,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyRateLimited,
    FlyServerError,
    FlySettings,
    FlyToken,
    FlyTransportError,
    FlyUnauthorized,
    FlyUnprocessable,
    FlyWaitTimeout,
    InitConfig,
    LogEntry,
    Machine,
    MachineConfig,
    RateLimiter,
    RestartConfig,
)
from localfly.process import LocalFlyProcess
from tests.helpers.waiting import eventually

SECRET = "fm2_bG9jYWxmbHktdGVzdC1zZWNyZXQtdmFsdWU"
IMAGE = "docker.io/library/alpine:3.20"

pytestmark = pytest.mark.timeout(120)


# Fixtures


@pytest.fixture(scope="module")
def localfly() -> Iterator[LocalFlyProcess]:
    """One real localfly for the module (shadows the session one: this module sets faults)."""
    with LocalFlyProcess() as process:
        yield process


@pytest.fixture(scope="module")
def settings(localfly: LocalFlyProcess) -> FlySettings:
    """Both APIs at localfly, as FLY_API_BASE_URL / FLY_LOGS_BASE_URL would set them."""
    return FlySettings.from_env(
        {"FLY_API_BASE_URL": localfly.url, "FLY_LOGS_BASE_URL": localfly.url}
    )


@pytest.fixture(scope="module")
async def fly(settings: FlySettings) -> AsyncIterator[FlyClient]:
    """The client under test, with its default rate limiter."""
    async with FlyClient.open(settings, FlyToken(SECRET)) as client:
        yield client


@pytest.fixture
def app(localfly: LocalFlyProcess) -> Iterator[str]:
    """An app name of the test's own, on a localfly without faults before and after."""
    localfly.set_faults({})
    yield f"fc-{uuid.uuid4().hex[:10]}"
    localfly.set_faults({})


def job(command: str, **metadata: str) -> MachineConfig:
    """A run-to-completion job: the command once, no restarts."""
    return MachineConfig(
        image=IMAGE,
        init=InitConfig(exec=["/bin/sh", "-c", command]),
        restart=RestartConfig(policy="no"),
        metadata=metadata,
    )


async def run_to_exit(fly: FlyClient, app: str, command: str) -> Machine:
    """Create a job machine, wait until it stopped, return it as it is then."""
    machine = await fly.create_machine(app, job(command))
    result = await fly.wait_for_state(
        app, machine.id, ["stopped", "failed"], version=machine.current_version, timeout=20
    )
    assert result.ok and result.state == "stopped", result
    return await fly.get_machine(app, machine.id)


def status_fault(status: int, *, retry_after: float | None = None) -> dict[str, Any]:
    """One response replaced by ``status``."""
    return {"http": [{"kind": "status", "status": status, "retry_after": retry_after, "count": 1}]}


# The machine lifecycle


async def test_create_wait_exit_code_logs_destroy(fly: FlyClient, app: str) -> None:
    machine = await fly.create_machine(
        app, job("echo hello from the job; echo to stderr >&2; exit 0"), name="cycle"
    )
    assert machine.name == "cycle" and machine.current_version
    result = await fly.wait_for_state(
        app, machine.id, ["stopped"], version=machine.current_version, timeout=20
    )
    assert result.ok and result.state == "stopped"

    stopped = await fly.get_machine(app, machine.id)
    exit_event = stopped.latest_exit_event()
    assert stopped.state == "stopped"
    assert exit_event is not None and exit_event.exit_code == 0
    assert exit_event.exited_at is not None

    async def entries() -> list[LogEntry] | None:
        got = [entry async for entry in fly.iter_logs(app, machine.id)]
        messages = [entry.message for entry in got]
        wanted = ("hello from the job", "to stderr")
        return got if all(w in messages for w in wanted) else None

    lines = await eventually(entries, what="both log lines")
    assert all(entry.instance == machine.id for entry in lines)
    assert {entry.level for entry in lines} == {"info", "error"}

    assert await fly.destroy_machine(app, machine.id) is True
    gone = await eventually(lambda: _state_or_gone(fly, app, machine.id), what="destroyed")
    assert gone in ("destroyed", "404")


async def _state_or_gone(fly: FlyClient, app: str, machine_id: str) -> str | None:
    """ "destroyed" or "404" once the machine is gone; None while it is not."""
    try:
        machine = await fly.get_machine(app, machine_id)
    except FlyNotFound:
        return "404"
    return machine.state if machine.state == "destroyed" else None


@pytest.mark.parametrize("code", [0, 1, 137])
async def test_exit_codes(fly: FlyClient, app: str, code: int) -> None:
    machine = await run_to_exit(fly, app, f"exit {code}")
    exit_event = machine.latest_exit_event()
    assert exit_event is not None and exit_event.exit_code == code
    assert machine.state == "stopped"
    await fly.destroy_machine(app, machine.id)


async def test_killed_by_sigkill_reports_137(fly: FlyClient, app: str) -> None:
    machine = await run_to_exit(fly, app, "kill -9 $$")
    exit_event = machine.latest_exit_event()
    assert exit_event is not None
    assert exit_event.exit_code == 137 or exit_event.signal == 9, exit_event
    await fly.destroy_machine(app, machine.id)


async def test_job_timeout_then_force_destroy(
    fly: FlyClient, app: str, localfly: LocalFlyProcess
) -> None:
    machine = await fly.create_machine(app, job("sleep 30"))
    before = fly.api_calls["wait"]
    started = time.monotonic()
    with pytest.raises(FlyWaitTimeout) as caught:
        await fly.wait_for_state(
            app,
            machine.id,
            ["stopped"],
            version=machine.current_version,
            timeout=2.5,
            call_timeout=1,
        )
    # It waited the whole 2.5 s (a lower bound: load only adds), in calls of at most 1 s.
    assert time.monotonic() - started >= 2.5
    assert fly.api_calls["wait"] - before == 3
    assert caught.value.retryable

    assert await fly.destroy_machine(app, machine.id, force=True) is True
    await fly.wait_machine(app, machine.id, ["destroyed"], timeout=10)
    assert await eventually(lambda: _state_or_gone(fly, app, machine.id), what="destroyed")
    assert not list(localfly.live_machines(app))


async def test_wait_loops_on_408_until_the_job_ends(fly: FlyClient, app: str) -> None:
    machine = await fly.create_machine(app, job("sleep 3; exit 4"))
    before = fly.api_calls["wait"]
    result = await fly.wait_for_state(
        app, machine.id, ["stopped"], version=machine.current_version, timeout=30, call_timeout=1
    )
    assert result.state == "stopped"
    assert fly.api_calls["wait"] - before >= 3  # at least two calls answered 408 first
    exit_event = (await fly.get_machine(app, machine.id)).latest_exit_event()
    assert exit_event is not None and exit_event.exit_code == 4
    await fly.destroy_machine(app, machine.id)


async def test_one_wait_call_raises_408_as_wait_timeout(fly: FlyClient, app: str) -> None:
    machine = await fly.create_machine(app, job("sleep 30"))
    with pytest.raises(FlyWaitTimeout) as caught:
        await fly.wait_machine(
            app, machine.id, ["stopped"], version=machine.current_version, timeout=1
        )
    assert caught.value.status_code == 408 and caught.value.retryable
    await fly.destroy_machine(app, machine.id)


async def test_destroy_of_an_unknown_machine_is_already_gone(fly: FlyClient, app: str) -> None:
    await fly.create_machine(app, job("true"))  # the app exists
    assert await fly.destroy_machine(app, "0123456789abcd") is False


# Idempotency and recovery


async def test_duplicate_name_is_a_conflict(fly: FlyClient, app: str) -> None:
    first = await fly.create_machine(app, job("sleep 5"), name="only-once")
    with pytest.raises(FlyConflict) as caught:
        await fly.create_machine(app, job("sleep 5"), name="only-once")
    assert not caught.value.retryable
    assert caught.value.status_code == 409
    found = await fly.find_machine(app, name="only-once")
    assert found is not None and found.id == first.id
    await fly.destroy_machine(app, first.id)


async def test_recovery_after_a_lost_create_response(
    fly: FlyClient, app: str, localfly: LocalFlyProcess
) -> None:
    localfly.set_faults({"http": [{"kind": "lose_create_response", "count": 1}]})
    key = {"sortie_job": uuid.uuid4().hex}
    with pytest.raises(FlyTransportError) as caught:
        await fly.create_machine(app, job("sleep 5", **key), name="lost-response")
    assert caught.value.retryable

    found = await eventually(
        lambda: fly.find_machine(app, name="lost-response", metadata=key), what="the lost machine"
    )
    assert found.name == "lost-response"
    assert found.config is not None and found.config.metadata == key
    assert len(list(localfly.machines(app))) == 1
    await fly.destroy_machine(app, found.id)


async def test_find_machine_outlasts_list_lag(
    fly: FlyClient, app: str, localfly: LocalFlyProcess
) -> None:
    localfly.set_faults({"list_lag_s": 1.5})
    created = await fly.create_machine(app, job("sleep 5", batch="b1"), name="laggy")
    assert await fly.find_machine(app, name="laggy", metadata={"batch": "b1"}) is None
    found = await eventually(
        lambda: fly.find_machine(app, name="laggy", metadata={"batch": "b1"}),
        timeout=10,
        what="the machine to be listed",
    )
    assert found.id == created.id
    await fly.destroy_machine(app, created.id)


async def test_find_machine_matches_name_and_metadata(fly: FlyClient, app: str) -> None:
    wanted = await fly.create_machine(app, job("true", batch="b1"), name="job-a")
    await fly.create_machine(app, job("true", batch="b1"), name="job-b")
    await fly.create_machine(app, job("true", batch="b2"), name="job-c")
    assert await fly.find_machine(app, name="job-c", metadata={"batch": "b1"}) is None
    found = await fly.find_machine(app, name="job-a", metadata={"batch": "b1"})
    assert found is not None and found.id == wanted.id
    listed = await fly.list_machines(app, metadata={"batch": "b1"})
    assert sorted(m.name or "" for m in listed) == ["job-a", "job-b"]


# Rate limits


async def test_a_burst_of_creates_within_the_limiter_draws_no_429(
    fly: FlyClient, app: str, localfly: LocalFlyProcess
) -> None:
    localfly.set_faults({"rate_limits": {"enforce": True, "retry_after": True}})
    machines = await asyncio.gather(
        *(fly.create_machine(app, job("true"), name=f"burst-{i}") for i in range(20))
    )
    assert len({m.id for m in machines}) == 20
    stats = localfly.stats(app)
    assert stats["machines_created"] == 20, stats
    assert _count_429(stats) == 0, stats


async def test_the_same_burst_without_the_limiter_draws_429s(
    settings: FlySettings, app: str, localfly: LocalFlyProcess
) -> None:
    localfly.set_faults({"rate_limits": {"enforce": True, "retry_after": True}})
    async with httpx.AsyncClient() as http:
        reckless = FlyClient(http, FlyToken(SECRET), settings, limiter=RateLimiter.disabled())
        outcomes = await asyncio.gather(
            *(reckless.create_machine(app, job("true")) for _ in range(20)),
            return_exceptions=True,
        )
        limited = [o for o in outcomes if isinstance(o, FlyRateLimited)]
        assert limited and len(limited) + sum(isinstance(o, Machine) for o in outcomes) == 20
        assert all(e.retryable and e.retry_after is not None for e in limited)
        assert _count_429(localfly.stats(app)) == len(limited)

        localfly.set_faults({"rate_limits": {"enforce": True, "retry_after": False}})
        again = await asyncio.gather(
            *(reckless.list_machines(app) for _ in range(6)), return_exceptions=True
        )
        bare = [o for o in again if isinstance(o, FlyRateLimited)]
        assert bare and all(e.retryable and e.retry_after is None for e in bare)


def _count_429(stats: dict[str, Any]) -> int:
    """How many 429s localfly answered, whatever the stats' exact layout."""
    by_status = stats.get("responses_by_status") or stats.get("status_counts") or {}
    return int(by_status.get("429", by_status.get(429, 0))) or int(stats.get("rate_limited", 0))


# Error classification


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [
        (400, FlyBadRequest, False),
        (401, FlyUnauthorized, False),
        (403, FlyForbidden, False),
        (422, FlyUnprocessable, False),
        (500, FlyServerError, True),
        (503, FlyServerError, True),
    ],
)
async def test_injected_statuses_are_classified(
    fly: FlyClient,
    app: str,
    localfly: LocalFlyProcess,
    status: int,
    cls: type[FlyAPIError],
    retryable: bool,
) -> None:
    localfly.set_faults(status_fault(status))
    with pytest.raises(cls) as caught:
        await fly.list_machines(app)
    assert caught.value.status_code == status
    assert caught.value.retryable is retryable
    assert caught.value.method == "GET" and caught.value.path == f"/v1/apps/{app}/machines"
    assert await fly.list_machines(app) == []  # the fault was used up


async def test_429_with_and_without_retry_after(
    fly: FlyClient, app: str, localfly: LocalFlyProcess
) -> None:
    localfly.set_faults(status_fault(429, retry_after=2.5))
    with pytest.raises(FlyRateLimited) as caught:
        await fly.list_machines(app)
    # Retry-After carries whole seconds: 2.5 s is announced as 3.
    assert caught.value.retryable and caught.value.retry_after == 3.0

    localfly.set_faults(status_fault(429))
    with pytest.raises(FlyRateLimited) as caught:
        await fly.list_machines(app)
    assert caught.value.retryable and caught.value.retry_after is None


async def test_an_app_is_read_and_an_unknown_one_is_app_not_found(
    fly: FlyClient, app: str, localfly: LocalFlyProcess
) -> None:
    assert (await fly.get_app(app)).name == app
    localfly.set_faults({"missing_apps": [app]})
    with pytest.raises(FlyAppNotFound) as missing:
        await fly.get_app(app)
    assert missing.value.status_code == 404 and not missing.value.retryable


async def test_real_404_400_and_409(fly: FlyClient, app: str) -> None:
    machine = await fly.create_machine(app, job("sleep 5"), name="taken")
    with pytest.raises(FlyNotFound) as not_found:
        await fly.get_machine(app, "0123456789abcd")
    assert not not_found.value.retryable and not_found.value.status_code == 404
    with pytest.raises(FlyBadRequest) as bad:
        await fly.wait_machine(app, machine.id, ["no-such-state"], timeout=1)
    assert not bad.value.retryable
    with pytest.raises(FlyConflict):
        await fly.create_machine(app, job("true"), name="taken")
    await fly.destroy_machine(app, machine.id)


async def test_dropped_connection_is_a_retryable_transport_error(
    fly: FlyClient, app: str, localfly: LocalFlyProcess
) -> None:
    localfly.set_faults({"http": [{"kind": "drop", "count": 1}]})
    with pytest.raises(FlyTransportError) as caught:
        await fly.list_machines(app)
    assert caught.value.retryable and caught.value.retry_after is None
    assert await fly.list_machines(app) == []


async def test_slow_response_beyond_the_read_timeout_is_a_transport_error(
    settings: FlySettings, app: str, localfly: LocalFlyProcess
) -> None:
    localfly.set_faults({"http": [{"kind": "slow", "delay_ms": 1500, "count": 1}]})
    async with httpx.AsyncClient(timeout=0.5) as http:
        impatient = FlyClient(http, FlyToken(SECRET), settings)
        with pytest.raises(FlyTransportError, match="ReadTimeout"):
            await impatient.list_machines(app)


# Secrets


async def test_the_token_never_appears_in_reprs_errors_or_logs(
    settings: FlySettings, app: str, localfly: LocalFlyProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = FlyToken(SECRET)
    errors: list[FlyError] = []
    async with FlyClient.open(settings, token) as client:
        texts = [str(token), repr(token), repr(client), repr(settings)]
        machine = await client.create_machine(app, job("echo hi"))
        await client.wait_for_state(
            app, machine.id, ["stopped"], version=machine.current_version, timeout=20
        )
        await client.get_logs(app, machine.id)
        for fault in (status_fault(500), status_fault(401), {"http": [{"kind": "drop"}]}):
            localfly.set_faults(fault)
            try:
                await client.get_machine(app, machine.id)
            except FlyError as error:
                errors.append(error)
            localfly.set_faults({})
        try:
            await client.get_machine(app, "0123456789abcd")
        except FlyError as error:
            errors.append(error)
    assert [type(e) for e in errors] == [
        FlyServerError,
        FlyUnauthorized,
        FlyTransportError,
        FlyNotFound,
    ]
    for caught in errors:
        texts += [str(caught), repr(caught), repr(caught.__cause__), repr(vars(caught))]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.args) for record in caplog.records]
    assert caplog.records, "expected the client's debug lines"
    leaked = [text for text in texts if SECRET in text or SECRET[4:] in text]
    assert not leaked


# Logs


async def test_logs_page_forward_with_next_token(fly: FlyClient, app: str) -> None:
    machine = await run_to_exit(
        fly, app, "i=1; while [ $i -le 250 ]; do echo line-$i; i=$((i+1)); done"
    )

    async def all_lines() -> list[str] | None:
        lines = [entry.message async for entry in fly.iter_logs(app, machine.id)]
        return lines if len(lines) >= 250 else None

    lines = await eventually(all_lines, what="250 log lines")
    assert lines == [f"line-{i}" for i in range(1, 251)]

    # Without a token the API answers with the newest lines, as Fly's does.
    newest = await fly.get_logs(app, machine.id)
    assert [e.message for e in newest.entries] == [f"line-{i}" for i in range(151, 251)]
    first = await fly.get_logs(app, machine.id, next_token="0")
    assert [e.message for e in first.entries] == [f"line-{i}" for i in range(1, 101)]
    second = await fly.get_logs(app, machine.id, next_token=first.next_token)
    assert [e.message for e in second.entries] == [f"line-{i}" for i in range(101, 201)]
    await fly.destroy_machine(app, machine.id)


# Token schemes on the wire


class RecordingTransport(httpx.AsyncBaseTransport):
    """A real HTTP transport that also remembers each request's Authorization header."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.authorizations: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.authorizations.append(request.headers.get("Authorization", ""))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize(
    ("raw", "header"),
    [
        ("plain-user-token", "Bearer plain-user-token"),
        ("Bearer plain-user-token", "Bearer plain-user-token"),
        (SECRET, f"FlyV1 {SECRET}"),
        (f"FlyV1 {SECRET}", f"FlyV1 {SECRET}"),
    ],
)
async def test_both_token_forms_reach_localfly(
    settings: FlySettings, app: str, raw: str, header: str
) -> None:
    transport = RecordingTransport()
    async with FlyClient.open(settings, FlyToken(raw), transport=transport) as client:
        assert await client.list_machines(app) == []
        await client.get_logs(app, "0123456789abcd")
    assert transport.authorizations == [header, header]


async def test_localfly_refuses_requests_without_a_token(
    localfly: LocalFlyProcess, app: str
) -> None:
    async with httpx.AsyncClient(base_url=localfly.url) as raw:
        response = await raw.get(f"/v1/apps/{app}/machines")
    assert response.status_code == 401


# What localfly cannot show: odd bodies and headers, checked with a mock transport


def mock_client(handler: Any, *, settings: FlySettings | None = None) -> FlyClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return FlyClient(
        http,
        FlyToken(SECRET),
        settings or FlySettings(api_base_url="http://fly.test", logs_base_url="http://logs.test"),
        limiter=RateLimiter.disabled(),
    )


async def test_mock_403_quota_with_request_id() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            403,
            json={"error": "over the allowed quota"},
            headers={"fly-request-id": "01REQ"},
        )

    with pytest.raises(FlyForbidden) as caught:
        await mock_client(handler).create_machine("a", job("true"))
    error = caught.value
    assert (error.error_text, error.request_id, error.retryable) == (
        "over the allowed quota",
        "01REQ",
        False,
    )
    assert "01REQ" in str(error) and "POST /v1/apps/a/machines" in str(error)


async def test_mock_proxy_html_502_and_unparseable_success() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/m1"):
            return httpx.Response(502, text="<html>Bad Gateway</html>")
        return httpx.Response(200, text="not json")

    client = mock_client(handler)
    with pytest.raises(FlyServerError, match="Bad Gateway") as caught:
        await client.get_machine("a", "m1")
    assert caught.value.retryable
    with pytest.raises(FlyAPIError, match="unexpected response body") as odd:
        await client.get_machine("a", "m2")
    assert odd.value.retryable


async def test_mock_retry_after_as_http_date_and_legacy_409_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(409, json={"status": "error", "message": "lease held"})
        return httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})

    client = mock_client(handler)
    with pytest.raises(FlyRateLimited) as limited:
        await client.get_machine("a", "m1")
    assert limited.value.retry_after == 0.0  # a date in the past: retry now
    with pytest.raises(FlyConflict, match="lease held"):
        await client.stop_machine("a", "m1")


async def test_mock_error_text_echoing_the_token_is_redacted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": f"bad token {request.headers['Authorization']}"})

    with pytest.raises(FlyUnauthorized) as caught:
        await mock_client(handler).get_machine("a", "m1")
    assert SECRET not in str(caught.value) and "redacted" in str(caught.value)


async def test_mock_request_shapes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/wait"):
            return httpx.Response(200, json={"ok": True, "state": "stopped"})
        if request.url.path.endswith("/logs"):
            return httpx.Response(200, json={"data": [], "meta": {"next_token": None}})
        if request.method == "GET":
            return httpx.Response(200, json=[])
        return httpx.Response(200, json={"ok": True})

    client = mock_client(handler)
    await client.wait_machine("a", "m1", ["stopped", "failed"], version="v1", timeout=300)
    await client.wait_machine("a", "m1", ["destroyed"], timeout=0.2)
    await client.stop_machine("a", "m1")
    await client.stop_machine("a", "m1", signal="SIGTERM", timeout=10)
    assert await client.destroy_machine("a", "m1") is True
    await client.list_machines(
        "a", metadata={"batch": "b 1"}, include_deleted=True, states=["started", "stopped"]
    )
    await client.get_logs("a", "m1", next_token="123", region="ams")

    wait_long, wait_short, stop_empty, stop_full, destroy, listing, logs = seen
    assert wait_long.url.params.multi_items() == [
        ("state", "stopped"),
        ("state", "failed"),
        ("timeout", "60"),
        ("version", "v1"),
    ]
    assert wait_short.url.params["timeout"] == "1"
    assert stop_empty.content == b"{}"
    assert stop_full.read() == b'{"signal":"SIGTERM","timeout":"10s"}'
    assert (destroy.method, destroy.url.params["force"]) == ("DELETE", "true")
    assert listing.url.params.multi_items() == [
        ("metadata.batch", "b 1"),
        ("include_deleted", "true"),
        ("state", "started,stopped"),
    ]
    assert logs.url.host == "logs.test" and logs.url.path == "/api/v1/apps/a/logs"
    assert dict(logs.url.params) == {"instance": "m1", "region": "ams", "next_token": "123"}
    assert {r.headers["Authorization"] for r in seen} == {f"FlyV1 {SECRET}"}
    assert client.api_calls == {"wait": 2, "stop": 2, "destroy": 1, "list": 1, "logs": 1}


async def test_mock_early_408s_do_not_make_a_busy_loop() -> None:
    answers = iter([408, 408, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status == 408:
            return httpx.Response(408, json={"error": "deadline_exceeded: not yet"})
        return httpx.Response(200, json={"ok": True, "state": "stopped"})

    client = mock_client(handler)
    started = time.monotonic()
    result = await client.wait_for_state("a", "m1", ["stopped"], timeout=30, call_timeout=10)
    assert result.state == "stopped" and client.api_calls["wait"] == 3
    assert time.monotonic() - started >= 2.0


async def test_calls_and_waits_take_turns_on_their_own_pools() -> None:
    # A pool's bookkeeping walks all its connections on every request: several small pools
    # keep that walk short, and a wait never queues behind a short call's pool or vice versa.
    used: list[str] = []

    def pool(name: str) -> httpx.AsyncClient:
        def handler(request: httpx.Request) -> httpx.Response:
            used.append(name)
            if request.url.path.endswith("/wait"):
                return httpx.Response(200, json={"ok": True, "state": "stopped"})
            return httpx.Response(200, json={"id": "m1", "state": "started"})

        return httpx.AsyncClient(transport=httpx.MockTransport(handler))

    fly = FlyClient(
        [pool("call-1"), pool("call-2")],
        FlyToken(SECRET),
        FlySettings(api_base_url="http://fly.test", logs_base_url="http://logs.test"),
        limiter=RateLimiter.disabled(),
        waits=[pool("wait-1"), pool("wait-2"), pool("wait-3")],
    )
    for _ in range(3):
        await fly.get_machine("a", "m1")
        await fly.wait_machine("a", "m1", ["stopped"], timeout=1)

    assert sorted(used) == ["call-1", "call-1", "call-2", "wait-1", "wait-2", "wait-3"]


async def test_open_builds_every_pool_within_max_connections(localfly: LocalFlyProcess) -> None:
    settings = FlySettings(
        api_base_url=localfly.url, logs_base_url=localfly.url, rate_limit=False, max_connections=6
    )
    async with FlyClient.open(settings, FlyToken("t")) as fly:
        app = f"pools-{uuid.uuid4().hex[:6]}"
        assert await fly.list_machines(app) == []
        calls = {id(next(fly._calls)) for _ in range(20)}
        waits = {id(next(fly._waits)) for _ in range(40)}
    assert (len(calls), len(waits)) == (4, 6)  # as many as allowed, one connection each at least


# Update: a stopped machine takes a new config whole (`reuse_machines`)

LEAVE_AND_REPORT = (
    'ls -A "$LOCALFLY_ROOT"; echo "run $RUN" > "$LOCALFLY_ROOT/left-by-$RUN"; exit "$RUN"'
)


def rerun(run: int) -> MachineConfig:
    """A job that lists what its root holds, leaves a file there, and exits with `run`."""
    config = job(LEAVE_AND_REPORT, run=str(run))
    return config.model_copy(update={"env": {"RUN": str(run)}})


async def test_update_runs_the_new_config_on_a_fresh_root_filesystem(
    fly: FlyClient, app: str
) -> None:
    machine = await fly.create_machine(app, rerun(1))
    await fly.wait_for_state(
        app, machine.id, ["stopped"], version=machine.current_version, timeout=20
    )

    updated = await fly.update_machine(
        app, machine.id, rerun(2), current_version=machine.current_version
    )
    assert updated.id == machine.id and updated.current_version != machine.current_version
    assert updated.config is not None and updated.config.metadata == {"run": "2"}
    assert updated.state != "stopped"  # started by the update: a wait cannot see the old stop
    await fly.wait_for_state(
        app, machine.id, ["stopped"], version=updated.current_version, timeout=20
    )
    again = await fly.get_machine(app, machine.id)
    exit_event = again.latest_exit_event()
    assert exit_event is not None and exit_event.exit_code == 2

    lines = [e.message async for e in fly.iter_logs(app, machine.id)]
    assert "left-by-1" not in lines  # run 2 found nothing run 1 left under its root
    await fly.destroy_machine(app, machine.id)


async def test_update_refuses_a_stale_version_a_new_name_and_a_destroyed_machine(
    fly: FlyClient, app: str
) -> None:
    machine = await fly.create_machine(app, rerun(0), name="fixed")
    await fly.wait_for_state(
        app, machine.id, ["stopped"], version=machine.current_version, timeout=20
    )
    updated = await fly.update_machine(
        app, machine.id, rerun(0), current_version=machine.current_version, skip_launch=True
    )
    assert updated.state == "stopped" and updated.latest_exit_event() is None
    with pytest.raises(FlyConflict):  # the version the caller knew is gone
        await fly.update_machine(app, machine.id, rerun(1), current_version=machine.current_version)
    with pytest.raises(FlyBadRequest):
        await fly._send(  # a name is fixed at create: no client method would send this
            "update",
            machine.id,
            "POST",
            f"/v1/apps/{app}/machines/{machine.id}",
            json={"config": {"image": IMAGE}, "name": "renamed"},
        )
    await fly.start_machine(app, machine.id)  # skip_launch left it stopped: start runs it
    await fly.wait_for_state(
        app, machine.id, ["stopped"], version=updated.current_version, timeout=20
    )
    await fly.destroy_machine(app, machine.id)
    with pytest.raises(FlyNotFound):
        await fly.update_machine(app, machine.id, rerun(1))


async def test_update_start_and_stop_are_rate_limited_per_machine(
    fly: FlyClient, settings: FlySettings, app: str, localfly: LocalFlyProcess
) -> None:
    one, other = await run_to_exit(fly, app, "true"), await run_to_exit(fly, app, "true")
    localfly.set_faults({"rate_limits": {"enforce": True, "retry_after": True}})
    async with httpx.AsyncClient() as http:
        reckless = FlyClient(http, FlyToken(SECRET), settings, limiter=RateLimiter.disabled())
        for action in ("update", "stop", "start"):
            calls = [_act(reckless, app, one.id, action) for _ in range(6)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            limited = [o for o in outcomes if isinstance(o, FlyRateLimited)]
            assert len(limited) >= 2 and all(e.retry_after for e in limited), (action, outcomes)
            # Another machine's bucket is its own: the same action on it goes through.
            [elsewhere] = await asyncio.gather(
                _act(reckless, app, other.id, action), return_exceptions=True
            )
            assert not isinstance(elsewhere, FlyRateLimited), action
    localfly.set_faults({})


async def _act(fly: FlyClient, app: str, machine_id: str, action: str) -> None:
    """One machine action, whatever Fly answers."""
    if action == "update":
        await fly.update_machine(app, machine_id, job("sleep 5"))
    elif action == "stop":
        await fly.stop_machine(app, machine_id)
    else:
        await fly.start_machine(app, machine_id)
