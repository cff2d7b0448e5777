"""localfly behaves as Fly documents: the Machines API's curl examples, pointed at localfly.

Each step is the request of Fly's documentation (same method, path, headers and body shape,
`$FLY_API_HOSTNAME` set to localfly), run with the real `curl`, and checked against the status
code and JSON the documentation promises. Nothing here goes through our own client.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localfly.process import LocalFlyProcess

IMAGE = "registry-1.docker.io/library/ubuntu:latest"


@pytest.fixture(scope="module")
def hostname(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A localfly started from its command line, with the docs' image mapped to a command."""
    log = tmp_path_factory.mktemp("curl") / "localfly.log"
    with LocalFlyProcess(images={IMAGE: "sh -c 'echo hello from ubuntu; sleep 2'"}, log=log) as lf:
        yield lf.url


def curl(
    hostname: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = "fm2_example-token",
) -> tuple[int, Any]:
    """One documented request: `curl -i -X METHOD -H Authorization... $FLY_API_HOSTNAME/path`."""
    command = ["curl", "-sS", "-X", method, "-w", "\n%{http_code}"]
    if token is not None:
        command += ["-H", f"Authorization: Bearer {token}"]
    if body is not None:
        command += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    command.append(f"{hostname}{path}")
    env = {**os.environ, "FLY_API_HOSTNAME": hostname}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text) if text.strip() else None


def test_the_documented_machine_lifecycle(hostname: str) -> None:
    app = f"my-app-{uuid.uuid4().hex[:6]}"
    base = f"/v1/apps/{app}/machines"

    status, machine = curl(
        hostname,
        "POST",
        base,
        {
            "name": "my-machine",
            "region": "ord",
            "config": {
                "image": IMAGE,
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
                "env": {"APP_ENV": "production"},
                "restart": {"policy": "no"},
                "metadata": {"team": "docs"},
            },
        },
    )
    assert status == 200, machine  # Fly answers a create with 200, not 201
    assert len(machine["id"]) == 14 and int(machine["id"], 16) >= 0
    assert machine["name"] == "my-machine" and machine["region"] == "ord"
    assert machine["state"] == "created" and len(machine["instance_id"]) == 26
    assert machine["config"]["metadata"] == {"team": "docs"}
    assert machine["events"][0]["type"] == "launch" and machine["events"][0]["status"] == "created"
    machine_id, version = machine["id"], machine["instance_id"]

    status, waited = curl(hostname, "GET", f"{base}/{machine_id}/wait?state=started&timeout=30")
    assert (status, waited["ok"]) == (200, True)

    status, got = curl(hostname, "GET", f"{base}/{machine_id}")
    assert status == 200 and got["id"] == machine_id and got["state"] in ("started", "stopped")

    status, listed = curl(hostname, "GET", f"{base}?metadata.team=docs")
    assert status == 200 and [m["id"] for m in listed] == [machine_id]
    status, listed = curl(hostname, "GET", f"{base}?metadata.team=other")
    assert (status, listed) == (200, [])

    status, taken = curl(hostname, "POST", base, {"name": "my-machine", "config": {"image": IMAGE}})
    assert status in (409, 422) and "error" in taken, "a machine name is unique in its app"

    status, waited = curl(
        hostname, "GET", f"{base}/{machine_id}/wait?state=stopped&instance_id={version}&timeout=60"
    )
    assert (status, waited["ok"]) == (200, True)
    status, got = curl(hostname, "GET", f"{base}/{machine_id}")
    exits = [e for e in got["events"] if e["type"] == "exit"]
    assert got["state"] == "stopped" and exits[0]["request"]["exit_event"]["exit_code"] == 0

    status, body = curl(hostname, "GET", f"{base}/{machine_id}/wait?state=started&timeout=90")
    assert status == 400 and "error" in body, "wait timeouts above 60 s are refused"

    status, body = curl(hostname, "DELETE", f"{base}/{machine_id}?force=true")
    assert (status, body) == (200, {"ok": True})
    status, got = curl(hostname, "GET", f"{base}/{machine_id}")
    assert status == 404 or got["state"] == "destroyed"
    status, listed = curl(hostname, "GET", f"{base}?include_deleted=true")
    assert status == 200 and [m["state"] for m in listed] == ["destroyed"]


def test_stop_a_running_machine_with_signal_and_timeout(hostname: str) -> None:
    app = f"my-app-{uuid.uuid4().hex[:6]}"
    base = f"/v1/apps/{app}/machines"
    status, machine = curl(
        hostname,
        "POST",
        base,
        {
            "config": {
                "image": IMAGE,
                "init": {"exec": ["sleep", "600"]},
                "restart": {"policy": "no"},
            }
        },
    )
    assert status == 200 and machine["name"], "an unnamed machine gets a generated name"
    machine_id = machine["id"]
    assert curl(hostname, "GET", f"{base}/{machine_id}/wait?state=started")[0] == 200

    status, body = curl(
        hostname, "POST", f"{base}/{machine_id}/stop", {"signal": "SIGTERM", "timeout": "5s"}
    )
    assert (status, body) == (200, {"ok": True})
    deadline = time.monotonic() + 20
    while (got := curl(hostname, "GET", f"{base}/{machine_id}")[1])["state"] != "stopped":
        assert time.monotonic() < deadline, got["state"]
        curl(hostname, "GET", f"{base}/{machine_id}/wait?state=stopped&timeout=5")
    exit_event = next(e for e in got["events"] if e["type"] == "exit")["request"]["exit_event"]
    assert exit_event["requested_stop"] is True
    assert curl(hostname, "DELETE", f"{base}/{machine_id}")[0] == 200


def test_update_a_stopped_machine_with_a_whole_config(hostname: str) -> None:
    """`POST /v1/apps/{app}/machines/{id}`: a full config (no partial update), the version the
    caller knew, and the machine starts again unless `skip_launch`."""
    app = f"my-app-{uuid.uuid4().hex[:6]}"
    base = f"/v1/apps/{app}/machines"
    run = {"image": IMAGE, "init": {"exec": ["true"]}, "restart": {"policy": "no"}}
    status, machine = curl(hostname, "POST", base, {"name": "kept", "config": run})
    machine_id, version = machine["id"], machine["instance_id"]
    wait = f"{base}/{machine_id}/wait?state=stopped&timeout=30&instance_id="
    assert curl(hostname, "GET", wait + version)[0] == 200

    status, updated = curl(
        hostname,
        "POST",
        f"{base}/{machine_id}",
        {"config": {**run, "env": {"RUN": "2"}}, "current_version": version},
    )
    assert status == 200 and updated["id"] == machine_id and updated["name"] == "kept"
    assert updated["instance_id"] != version and updated["config"]["env"] == {"RUN": "2"}
    assert updated["events"][0]["type"] in ("update", "start", "launch")
    assert curl(hostname, "GET", wait + updated["instance_id"])[0] == 200

    stale = {"config": run, "current_version": version}
    status, body = curl(hostname, "POST", f"{base}/{machine_id}", stale)
    assert status == 409 and "error" in body, "a version the caller no longer knows"
    status, body = curl(hostname, "POST", f"{base}/{machine_id}", {"config": {}})
    assert status == 400 and "error" in body, "config.image is required"
    status, held = curl(
        hostname, "POST", f"{base}/{machine_id}", {"config": run, "skip_launch": True}
    )
    assert status == 200 and held["state"] == "stopped"
    assert curl(hostname, "DELETE", f"{base}/{machine_id}")[0] == 200
    status, body = curl(hostname, "POST", f"{base}/{machine_id}", {"config": run})
    assert status == 404 and "error" in body


def test_requests_without_a_token_are_refused(hostname: str) -> None:
    status, body = curl(hostname, "GET", "/v1/apps/my-app/machines", token=None)
    assert status == 401 and "error" in body


def test_logs_api_answers_in_its_documented_shape(hostname: str, tmp_path: Path) -> None:
    app = f"my-app-{uuid.uuid4().hex[:6]}"
    base = f"/v1/apps/{app}/machines"
    machine = curl(
        hostname, "POST", base, {"config": {"image": IMAGE, "restart": {"policy": "no"}}}
    )[1]
    curl(
        hostname,
        "GET",
        f"{base}/{machine['id']}/wait?state=stopped&instance_id="
        f"{machine['instance_id']}&timeout=30",
    )
    status, logs = curl(hostname, "GET", f"/api/v1/apps/{app}/logs?instance={machine['id']}")
    assert status == 200 and logs["meta"]["next_token"]
    attributes = logs["data"][0]["attributes"]
    assert attributes["message"] == "hello from ubuntu" and attributes["instance"] == machine["id"]
    assert {"timestamp", "level", "region", "meta"} <= set(attributes)
