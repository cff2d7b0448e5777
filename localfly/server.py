"""The HTTP side of localfly: the Machines API, the logs API and an admin API on one port.

Paths, JSON keys and status codes follow Fly's Machines API (create 200, wait 200/408/400/404,
destroy 200, 401 without a token, errors as `{"error": "<code>: <text>"}`). `/_localfly/` paths
are localfly's own: health, stats (calls per endpoint, statuses, live and most ever live
machines), the request log (each call's arrival and answer), every machine made, the faults.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from localfly.faults import FaultConfig, Faults
from localfly.formats import parse_duration, rfc3339
from localfly.machines import TRANSIENT, Fleet, Machine
from localfly.routes import app_of, endpoint_of, error, json_body, machine_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WAITABLE = {"started", "stopped", "suspended", "destroyed", "failed", "settled"}
LOG_PAGE = 100
REQUESTS_KEPT = 100_000
"""The request log's length: the newest calls, enough for any test's batch."""


class LocalFly:
    """The aiohttp application and the fleet behind it."""

    def __init__(
        self,
        images: dict[str, str] | None = None,
        faults: FaultConfig | None = None,
        token: str | None = None,
        apps: set[str] | None = None,
    ) -> None:
        self.faults = Faults(faults)
        self.fleet = Fleet(self.faults, images or {})
        self.token = token
        self.apps = apps
        self._oom_killer: asyncio.Task[None] | None = None
        self.calls: dict[str, Counter[str]] = {}
        self.statuses: dict[str, Counter[str]] = {}
        self.rate_limited: Counter[str] = Counter()
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUESTS_KEPT)

    def application(self) -> web.Application:
        """The routes, behind the auth, stats and fault middleware."""
        app = web.Application(middlewares=[self._middleware, answers])
        r = app.router
        r.add_get("/_localfly/health", self.health)
        r.add_get("/_localfly/stats", self.stats)
        r.add_post("/_localfly/stats/reset", self.reset_stats)
        r.add_get("/_localfly/machines", self.all_machines)
        r.add_get("/_localfly/requests", self.request_log)
        r.add_get("/_localfly/faults", self.get_faults)
        r.add_put("/_localfly/faults", self.put_faults)
        r.add_get("/v1/apps/{app}", self.get_app)
        base = "/v1/apps/{app}/machines"
        r.add_post(base, self.create)
        r.add_get(base, self.list)
        r.add_get(base + "/{id}", self.get)
        r.add_post(base + "/{id}", self.update)
        r.add_delete(base + "/{id}", self.destroy)
        r.add_get(base + "/{id}/wait", self.wait)
        r.add_post(base + "/{id}/stop", self.stop)
        r.add_post(base + "/{id}/start", self.start)
        r.add_get(base + "/{id}/events", self.events)
        r.add_get(base + "/{id}/metadata", self.metadata)
        r.add_get(base + "/{id}/metadata/{key}", self.metadata_key)
        r.add_post(base + "/{id}/metadata/{key}", self.set_metadata_key)
        r.add_delete(base + "/{id}/metadata/{key}", self.delete_metadata_key)
        r.add_get("/api/v1/apps/{app}/logs", self.logs)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, _: web.Application) -> None:
        self._oom_killer = asyncio.create_task(self.fleet.watch_memory())

    async def _shutdown(self, _: web.Application) -> None:
        if self._oom_killer is not None:
            self._oom_killer.cancel()
        self.fleet.kill_everything()

    # -------------------------------------------------------------- middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_localfly/"):
            return await handler(request)
        endpoint, app = endpoint_of(request), app_of(request)
        self.calls.setdefault(app, Counter())[endpoint] += 1
        arrived = time.time()
        response = await self._guarded(request, handler, endpoint, app)
        self.statuses.setdefault(app, Counter())[str(response.status)] += 1
        self.requests.append(
            {
                "app": app,
                "endpoint": endpoint,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "retry_after": response.headers.get("Retry-After"),
                "arrived": arrived,
                "answered": time.time(),
            }
        )
        response.headers["fly-request-id"] = secrets.token_hex(10)
        return response

    async def _guarded(
        self, request: web.Request, handler: Handler, endpoint: str, app: str
    ) -> web.StreamResponse:
        if not self._authorised(request):
            return error(401, "Authenticate: token validation error")
        known = self.apps is None or app in self.apps
        if app and (not known or app in self.faults.config.missing_apps):
            return error(404, "not_found: app not found")
        key = app if endpoint in ("create", "list") else request.match_info.get("id", app)
        wait = self.faults.rate_limited(endpoint, key)
        if wait is not None:
            self.rate_limited[app] += 1
            response = error(429, "rate limit exceeded")
            if self.faults.config.rate_limits.retry_after:
                response.headers["Retry-After"] = Faults.retry_after_header(wait)
            return response
        fault = self.faults.http_fault(endpoint)
        if fault is not None:
            if fault.kind == "status":
                response = error(fault.status, f"injected fault: status {fault.status}")
                if fault.retry_after is not None:
                    response.headers["Retry-After"] = Faults.retry_after_header(fault.retry_after)
                return response
            if fault.kind == "drop":
                return self._drop(request)
            if fault.kind == "slow":
                await asyncio.sleep(fault.delay_ms / 1000)
            if fault.kind == "slow_response":
                answer = await handler(request)
                await asyncio.sleep(fault.delay_ms / 1000)
                return answer
            if fault.kind == "lose_response" or (
                fault.kind == "lose_create_response" and endpoint == "create"
            ):
                await handler(request)
                return self._drop(request)
        return await handler(request)

    def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the connection without answering."""
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "").strip()
        for scheme in ("Bearer ", "FlyV1 "):
            if header.startswith(scheme):
                header = header[len(scheme) :].strip()
        if header.startswith("FlyV1 "):
            header = header[len("FlyV1 ") :].strip()
        if not header or header in ("Bearer", "FlyV1"):
            return False
        return self.token is None or header == self.token

    # -------------------------------------------------------------- admin

    async def get_app(self, request: web.Request) -> web.Response:
        """An app as Fly describes it; under localfly every valid name is an app."""
        name = request.match_info["app"]
        return web.json_response(
            {"id": name, "name": name, "status": "deployed", "organization": {"slug": "personal"}}
        )

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        app = request.query.get("app")
        apps = [app] if app else sorted(set(self.fleet.machines) | set(self.calls))
        calls: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        for name in apps:
            calls.update(self.calls.get(name, Counter()))
            statuses.update(self.statuses.get(name, Counter()))
        return web.json_response(
            {
                "calls": dict(calls),
                "statuses": dict(statuses),
                "live_machines": sum(self.fleet.live(a) for a in apps),
                "max_live_machines": sum(self.fleet.max_live.get(a, 0) for a in apps),
                "machines_created": sum(self.fleet.created_count.get(a, 0) for a in apps),
                "rate_limited": sum(self.rate_limited.get(a, 0) for a in apps),
            }
        )

    async def request_log(self, request: web.Request) -> web.Response:
        app = request.query.get("app")
        return web.json_response([r for r in self.requests if app is None or r["app"] == app])

    async def reset_stats(self, _: web.Request) -> web.Response:
        self.requests.clear()
        self.calls.clear()
        self.statuses.clear()
        self.rate_limited.clear()
        for app in self.fleet.machines:
            self.fleet.max_live[app] = self.fleet.live(app)
        return web.json_response({"ok": True})

    async def all_machines(self, request: web.Request) -> web.Response:
        machines = self.fleet.app(request.query.get("app", "")).values()
        return web.json_response(
            [
                {
                    "id": m.id,
                    "name": m.name,
                    "app": m.app,
                    "state": m.state,
                    "metadata": m.metadata,
                    "created_at": rfc3339(m.created, precise=True),
                    "destroyed_at": rfc3339(m.destroyed, precise=True) if m.destroyed else None,
                    "pid": m.process.pid if m.process else None,
                    "memory_mb": m.memory_mb,
                    "peak_rss_mb": m.peak_rss_mb,
                }
                for m in machines
            ]
        )

    async def get_faults(self, _: web.Request) -> web.Response:
        return web.json_response(self.faults.config.model_dump(mode="json"))

    async def put_faults(self, request: web.Request) -> web.Response:
        try:
            config = FaultConfig.model_validate(await request.json())
        except (ValidationError, json.JSONDecodeError) as problem:
            return error(400, f"invalid_argument: {problem}")
        self.faults.replace(config)
        return web.json_response(config.model_dump(mode="json"))

    # -------------------------------------------------------------- machines

    def _machine(self, request: web.Request) -> Machine:
        machine = self.fleet.visible(request.match_info["app"], request.match_info["id"])
        if machine is None:
            raise _Answer(error(404, "not_found: machine not found"))
        return machine

    async def create(self, request: web.Request) -> web.Response:
        app = request.match_info["app"]
        body = await machine_body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("name")
        if name and self.fleet.name_taken(app, name):
            return error(
                409, f"already_exists: a machine named {name} already exists", "name_taken"
            )
        machine = self.fleet.create(app, body)
        return web.json_response(machine.to_api())

    async def update(self, request: web.Request) -> web.Response:
        """Replace the machine's whole config (a new version); start it unless `skip_launch`.

        Fly refuses a stale `current_version` (409) and a new name or region (both are fixed at
        create); a machine in a transient state cannot be updated (412).
        """
        machine = self._machine(request)
        body = await machine_body(request)
        if isinstance(body, web.Response):
            return body
        if machine.state in ("destroyed", "destroying"):
            return error(404, "not_found: machine not found")
        for fixed in ("name", "region"):
            if body.get(fixed) and body[fixed] != getattr(machine, fixed):
                return error(400, f"invalid_argument: a machine's {fixed} cannot be changed")
        current = body.get("current_version")
        if current and current != machine.instance_id:
            return error(
                409,
                f"failed_precondition: current_version {current} does not match the "
                f"machine's version {machine.instance_id}",
            )
        if machine.state in TRANSIENT:
            return error(
                412,
                f"failed_precondition: unable to update machine from current state: "
                f"'{machine.state}'",
            )
        await self.fleet.update(machine, body["config"], launch=not body.get("skip_launch"))
        return web.json_response(machine.to_api())

    async def list(self, request: web.Request) -> web.Response:
        app = request.match_info["app"]
        q = request.query
        machines = self.fleet.listed(app, q.get("include_deleted") == "true")
        states = {s for s in q.get("state", "").split(",") if s}
        filters = {
            k.removeprefix("metadata."): v for k, v in q.items() if k.startswith("metadata.")
        }
        shown = [
            m.to_api(summary=q.get("summary") == "true")
            for m in machines
            if (not states or m.state in states)
            and (not q.get("region") or m.region == q["region"])
            and all(m.metadata.get(k) == v for k, v in filters.items())
        ]
        return web.json_response(shown)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self._machine(request).to_api())

    async def wait(self, request: web.Request) -> web.Response:
        machine = self._machine(request)
        states = {s for v in request.query.getall("state", ["started"]) for s in v.split(",") if s}
        if not states <= WAITABLE:
            return error(400, f"invalid_argument: cannot wait for {sorted(states - WAITABLE)}")
        try:
            timeout = int(request.query.get("timeout", "60"))
        except ValueError:
            return error(400, "invalid_argument: timeout must be an integer")
        if not 1 <= timeout <= 60:
            return error(400, "invalid_argument: timeout must be between 1 and 60 seconds")
        version = request.query.get("version") or request.query.get("instance_id")
        if "stopped" in states and not version:
            return error(400, "instance_id required when waiting for stopped machine")

        def reached() -> bool:
            if "settled" in states and machine.state not in TRANSIENT:
                return True
            return machine.state in states

        async with machine.changed:
            try:
                await asyncio.wait_for(machine.changed.wait_for(reached), timeout)
            except TimeoutError:
                want = ",".join(sorted(states))
                return error(
                    408,
                    f"deadline_exceeded: machine failed to reach desired state, {want}, "
                    f"currently {machine.state}",
                )
        event_id = machine.events[0]["id"] if machine.events else None
        return web.json_response(
            {
                "ok": True,
                "state": machine.state,
                "event_id": event_id,
                "version": machine.instance_id,
            }
        )

    async def stop(self, request: web.Request) -> web.Response:
        machine = self._machine(request)
        body: Any = {}
        if request.can_read_body:
            body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body, dict):
            return error(400, "json: cannot unmarshal into Go value of type main.stopRequest")
        stop_config = machine.config.get("stop_config") or {}
        signal_name = body.get("signal") or stop_config.get("signal")
        timeout = parse_duration(body.get("timeout") or stop_config.get("timeout"), 5.0)
        await self.fleet.stop(machine, signal_name, timeout)
        return web.json_response({"ok": True})

    async def start(self, request: web.Request) -> web.Response:
        machine = self._machine(request)
        if machine.state not in ("stopped", "failed"):
            return error(
                412,
                f"failed_precondition: unable to start machine from current state: "
                f"'{machine.state}'",
            )
        previous = await self.fleet.start(machine)
        return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})

    async def destroy(self, request: web.Request) -> web.Response:
        machine = self._machine(request)
        force = "true" in (request.query.get("force"), request.query.get("kill"))
        if machine.state == "destroyed":
            return error(404, "not_found: machine not found")
        if machine.state in ("started", "starting", "stopping") and not force:
            return error(
                412,
                f"failed_precondition: machine is {machine.state}; stop it or use force=true",
            )
        await self.fleet.destroy(machine)
        return web.json_response({"ok": True})

    async def events(self, request: web.Request) -> web.Response:
        limit = min(int(request.query.get("limit", "20")), 50)
        return web.json_response(self._machine(request).events[:limit])

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self._machine(request).metadata)

    async def metadata_key(self, request: web.Request) -> web.Response:
        value = self._machine(request).metadata.get(request.match_info["key"])
        if value is None:
            return error(404, "not_found: metadata key not found")
        return web.json_response({"value": value})

    async def set_metadata_key(self, request: web.Request) -> web.Response:
        machine = self._machine(request)
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body, dict) or not isinstance(body.get("value"), str):
            return error(400, "invalid_argument: value must be a string")
        machine.metadata[request.match_info["key"]] = body["value"]
        return web.Response(status=204)

    async def delete_metadata_key(self, request: web.Request) -> web.Response:
        self._machine(request).metadata.pop(request.match_info["key"], None)
        return web.Response(status=204)

    # -------------------------------------------------------------- logs

    async def logs(self, request: web.Request) -> web.Response:
        app = request.match_info["app"]
        q = request.query
        visible_before = time.time_ns() - int(self.faults.config.log_lag_s * 1e9)
        lines = [
            line
            for line in self.fleet.logs.get(app, [])
            if line.nanos <= visible_before
            and (not q.get("instance") or line.instance == q["instance"])
            and (not q.get("region") or line.region == q["region"])
        ]
        token = q.get("next_token")
        if token:
            after = int(token)
            page = [line for line in lines if line.nanos > after][:LOG_PAGE]
        else:
            page = lines[-LOG_PAGE:]
        next_token = str(page[-1].nanos) if page else (token or str(visible_before))
        data = [
            {
                "id": f"{line.instance}-{line.nanos}",
                "type": "logs",
                "attributes": {
                    "timestamp": _nano_rfc3339(line.nanos),
                    "message": line.message,
                    "level": line.level,
                    "instance": line.instance,
                    "region": line.region,
                    "meta": {
                        "instance": line.instance,
                        "region": line.region,
                        "event": {"provider": "app"},
                    },
                },
            }
            for line in page
        ]
        return web.json_response({"data": data, "meta": {"next_token": next_token}})


def _nano_rfc3339(nanos: int) -> str:
    seconds, fraction = divmod(nanos, 1_000_000_000)
    return rfc3339(seconds).replace("Z", f".{fraction:09d}Z")


class _Answer(Exception):
    """Short-circuit a handler with a finished response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


@web.middleware
async def answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn a raised _Answer into its response."""
    try:
        return await handler(request)
    except _Answer as answer:
        return answer.response
