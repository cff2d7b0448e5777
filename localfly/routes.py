"""What a request to localfly is: the Machines API action and the app it names, a machine's
body; Fly's error body."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def error(status: int, text: str, code: str | None = None) -> web.Response:
    """Fly's error body."""
    body: dict[str, str] = {"error": text}
    if code:
        body["status"] = code
    return web.json_response(body, status=status)


def endpoint_of(request: web.Request) -> str:
    """Which Machines API action a request is, for stats, faults and rate limits."""
    path, method = request.path, request.method
    if path.startswith("/api/v1/apps/") and path.endswith("/logs"):
        return "logs"
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[:2] == ["v1", "apps"]:
        return "app"
    if len(parts) < 4 or parts[0] != "v1" or parts[3] != "machines":
        return "other"
    if len(parts) == 4:
        return "create" if method == "POST" else "list"
    if len(parts) == 5:
        return {"GET": "get", "DELETE": "destroy", "POST": "update"}.get(method, "other")
    action = parts[5]
    if action in ("wait", "stop", "start", "metadata", "events"):
        return action
    return "other"


def app_of(request: web.Request) -> str:
    """The app a request concerns ("" for admin paths)."""
    parts = request.path.strip("/").split("/")
    if parts[:2] == ["v1", "apps"] and len(parts) > 2:
        return parts[2]
    if parts[:3] == ["api", "v1", "apps"] and len(parts) > 3:
        return parts[3]
    return ""


async def json_body(request: web.Request) -> Any:
    """The request's JSON body, or a 400 response (`web.Response`) when it is not JSON."""
    try:
        return await request.json()
    except json.JSONDecodeError:
        return error(400, "invalid_argument: request body is not JSON")


async def machine_body(request: web.Request) -> dict[str, Any] | web.Response:
    """A create's or an update's body, or Fly's 400 for one without a config and its image."""
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
        return error(400, "invalid_argument: config is required")
    if not body["config"].get("image"):
        return error(400, "invalid_argument: config.image is required")
    return body
