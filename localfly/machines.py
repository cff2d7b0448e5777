"""Machines as local processes, with Fly's states, events, restart policies and logs.

Each machine runs as its own process group in a temporary workspace, with `config.env` (plus
the FLY_* variables a real machine sees) as its whole environment: nothing of localfly's own
environment leaks in. The command is `config.init.exec`, or the image's mapped command (or
`init.entrypoint`) followed by `init.cmd`. An image with no mapping and no `init.exec` cannot
run, as an unpullable image cannot: the machine goes to `failed` with a `launch`/`failed` event
and no exit event. Destroying a machine kills its whole process group. A machine whose processes
hold more resident memory than its `guest.memory_mb` is OOM-killed as Fly's kernel would: SIGKILL,
an "Out of memory" log line, an exit event with `oom_killed: true` (`Fleet.watch_memory`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localfly.faults import Faults
from localfly.formats import rfc3339, ulid
from localfly.groups import kill_group, resident_by_group

DEFAULT_MEMORY_MB = 256
"""A machine's memory when its config names no `guest.memory_mb`, as on Fly."""
WITHHELD = ("SORTIE_REPORT_URL", "SORTIE_ARCHIVE_URL")
"""What the `withhold_report` fault keeps from a machine: where its agent would upload."""

ADJECTIVES = ["aged", "bold", "calm", "dark", "eager", "fancy", "green", "hidden", "icy", "lucky"]
NOUNS = ["thunder", "river", "forest", "meadow", "cloud", "ember", "frost", "harbor", "pine"]
TRANSIENT = {"created", "starting", "stopping", "destroying", "restarting"}
SIGNALS = {
    "SIGHUP": signal.SIGHUP,
    "SIGINT": signal.SIGINT,
    "SIGQUIT": signal.SIGQUIT,
    "SIGKILL": signal.SIGKILL,
    "SIGUSR1": signal.SIGUSR1,
    "SIGUSR2": signal.SIGUSR2,
    "SIGTERM": signal.SIGTERM,
}


@dataclass
class LogLine:
    """One line a machine printed."""

    nanos: int
    message: str
    level: str
    instance: str
    region: str


@dataclass
class Machine:
    """A machine and its local process."""

    id: str
    app: str
    name: str
    region: str
    config: dict[str, Any]
    fault: str | None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    destroyed: float | None = None
    state: str = "created"
    instance_id: str = field(default_factory=ulid)
    events: list[dict[str, Any]] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    workspace: Path | None = None
    restart_count: int = 0
    stop_requested: bool = False
    killed_for_oom: bool = False
    peak_rss_mb: int = 0
    """The most resident memory its processes held together at one look."""
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None

    @property
    def memory_mb(self) -> int:
        """The memory its config gives it."""
        guest = self.config.get("guest") or {}
        return int(guest.get("memory_mb") or DEFAULT_MEMORY_MB)

    @property
    def metadata(self) -> dict[str, str]:
        """The machine's metadata from its config."""
        meta = self.config.setdefault("metadata", {})
        assert isinstance(meta, dict)
        return meta

    def event(self, kind: str, status: str, source: str = "flyd", request: Any = None) -> str:
        """Record an event (newest first) and return its id."""
        event: dict[str, Any] = {
            "id": ulid(),
            "type": kind,
            "status": status,
            "source": source,
            "timestamp": int(time.time() * 1000),
        }
        if request is not None:
            event["request"] = request
        self.events.insert(0, event)
        return str(event["id"])

    def to_api(self, summary: bool = False) -> dict[str, Any]:
        """The Machine object as the Machines API returns it."""
        image = str(self.config.get("image", ""))
        repository, _, tag = (
            image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        )
        body: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "version": self.instance_id,
            "private_ip": f"fdaa:0:1:a7b:1::{int(self.id[:4], 16):x}",
            "image_ref": {
                "registry": repository.split("/")[0] if "/" in repository else "docker.io",
                "repository": repository,
                "tag": tag or "latest",
                "digest": "",
                "labels": {},
            },
            "created_at": rfc3339(self.created),
            "updated_at": rfc3339(self.updated),
            "host_status": "ok",
            "cordoned": False,
        }
        if not summary:
            body["config"] = self.config
            body["events"] = self.events
            body["checks"] = []
        return body


class Fleet:
    """Every machine of every app, and the work of running them."""

    def __init__(self, faults: Faults, images: dict[str, str]) -> None:
        self.faults = faults
        self.images = images
        self.machines: dict[str, dict[str, Machine]] = {}
        self.logs: dict[str, list[LogLine]] = {}
        self.max_live: dict[str, int] = {}
        self.created_count: dict[str, int] = {}
        self.running: dict[int, Machine] = {}
        """Machines whose process runs, by its process group id: what the OOM killer watches."""

    # -------------------------------------------------------------- queries

    def app(self, app: str) -> dict[str, Machine]:
        """The app's machines by id (every machine ever made)."""
        return self.machines.setdefault(app, {})

    def visible(self, app: str, machine_id: str) -> Machine | None:
        """A machine GET can still see: destroyed ones for `destroyed_visible_s`."""
        machine = self.app(app).get(machine_id)
        if machine is None or self._expired(machine):
            return None
        return machine

    def _expired(self, machine: Machine) -> bool:
        window = self.faults.config.destroyed_visible_s
        return machine.destroyed is not None and time.time() - machine.destroyed > window

    def listed(self, app: str, include_deleted: bool) -> list[Machine]:
        """Machines a list shows, after list lag."""
        lag = self.faults.config.list_lag_s
        now = time.time()
        return [
            m
            for m in self.app(app).values()
            if now - m.created >= lag
            and (include_deleted or m.state != "destroyed")
            and not self._expired(m)
        ]

    def live(self, app: str) -> int:
        """Machines that exist (anything not destroyed): what would cost money."""
        return sum(1 for m in self.app(app).values() if m.state != "destroyed")

    def name_taken(self, app: str, name: str) -> bool:
        """Names are unique among an app's machines that are not destroyed."""
        return any(m.name == name and m.state != "destroyed" for m in self.app(app).values())

    # -------------------------------------------------------------- lifecycle

    def create(self, app: str, body: dict[str, Any]) -> Machine:
        """Make a machine in `created` and start booting it in the background."""
        config = dict(body["config"])
        name = body.get("name") or (
            f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}-{secrets.randbelow(10000)}"
        )
        metadata = config.get("metadata") or {}
        machine = Machine(
            id=secrets.token_hex(7),
            app=app,
            name=name,
            region=body.get("region") or "lcl",
            config=config,
            fault=self.faults.machine_fault(name, metadata),
        )
        machine.event("launch", "created", source="user")
        self.app(app)[machine.id] = machine
        self.created_count[app] = self.created_count.get(app, 0) + 1
        self.max_live[app] = max(self.max_live.get(app, 0), self.live(app))
        if not body.get("skip_launch"):
            machine.task = asyncio.create_task(self._run(machine))
        return machine

    async def set_state(self, machine: Machine, state: str) -> None:
        """Move the machine to `state` and wake its waiters."""
        async with machine.changed:
            machine.state = state
            machine.updated = time.time()
            if state == "destroyed":
                machine.destroyed = machine.updated
            machine.changed.notify_all()

    def command(self, machine: Machine) -> list[str] | None:
        """What the machine runs, or None when its image cannot be run here."""
        init = machine.config.get("init") or {}
        if init.get("exec"):
            return [str(a) for a in init["exec"]]
        image = str(machine.config.get("image", ""))
        mapped = self.images.get(image) or self.images.get(image.rsplit(":", 1)[0])
        entrypoint = init.get("entrypoint") or (shlex.split(mapped) if mapped else None)
        if not entrypoint:
            return None
        return [str(a) for a in entrypoint] + [str(a) for a in init.get("cmd") or []]

    def _fresh_root(self, machine: Machine) -> None:
        """Every start boots from a clean root filesystem, as a Fly machine does: the last run's
        files are removed, the image's (`config.files`) written afresh."""
        if machine.workspace is not None:
            shutil.rmtree(machine.workspace, ignore_errors=True)
        machine.workspace = Path(tempfile.mkdtemp(prefix=f"localfly-{machine.id}-"))
        self._write_files(machine)

    def _write_files(self, machine: Machine) -> None:
        """Write `config.files` (base64 `raw_value`) under the machine's root, as Fly does."""
        assert machine.workspace is not None
        for entry in machine.config.get("files") or []:
            guest_path = str(entry.get("guest_path", "")).lstrip("/")
            target = (machine.workspace / guest_path).resolve()
            if not guest_path or not target.is_relative_to(machine.workspace.resolve()):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(entry.get("raw_value") or ""))
            if entry.get("mode") is not None:
                target.chmod(int(entry["mode"]))

    def environment(self, machine: Machine) -> dict[str, str]:
        """A minimal base, the FLY_* variables, then config.env: never localfly's own env."""
        assert machine.workspace is not None
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(machine.workspace),
            "LANG": "C.UTF-8",
            "FLY_APP_NAME": machine.app,
            "FLY_MACHINE_ID": machine.id,
            "FLY_REGION": machine.region,
            "FLY_MACHINE_VERSION": machine.instance_id,
            "FLY_IMAGE_REF": str(machine.config.get("image", "")),
            # Where `/` of the machine is: config.files land under it.
            "LOCALFLY_ROOT": str(machine.workspace),
        }
        env.update({str(k): str(v) for k, v in (machine.config.get("env") or {}).items()})
        if machine.fault == "withhold_report":
            for name in WITHHELD:
                env.pop(name, None)
        return env

    async def _run(self, machine: Machine) -> None:
        """Boot, run, and apply the restart policy until the machine settles."""
        await asyncio.sleep(self.faults.config.boot_delay_s)
        if machine.fault == "stuck_created" or machine.state != "created":
            return
        argv = self.command(machine)
        if argv is None or machine.fault == "fail_boot":
            machine.event("launch", "failed")
            await self.set_state(machine, "failed")
            return
        self._fresh_root(machine)
        while True:
            machine.event("start", "starting")
            await self.set_state(machine, "starting")
            try:
                machine.process = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=machine.workspace,
                    env=self.environment(machine),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as error:
                self._log(machine, f"failed to start: {error}", "error")
                machine.event("launch", "failed")
                await self.set_state(machine, "failed")
                return
            machine.event("start", "started")
            await self.set_state(machine, "started")
            if machine.fault == "oom":
                self._oom_kill(machine)
            group = machine.process.pid
            self.running[group] = machine
            try:
                code = await self._wait_process(machine)
            finally:
                self.running.pop(group, None)
            if machine.killed_for_oom:
                code = -signal.SIGKILL
            if machine.state in ("destroying", "destroyed"):
                return
            if not await self._exited(machine, code):
                return

    async def _wait_process(self, machine: Machine) -> int:
        """Collect stdout and stderr as log lines until the process exits."""
        process = machine.process
        assert process is not None and process.stdout and process.stderr
        await asyncio.gather(
            self._pump(machine, process.stdout, "info"),
            self._pump(machine, process.stderr, "error"),
        )
        return await process.wait()

    async def _pump(self, machine: Machine, stream: asyncio.StreamReader, level: str) -> None:
        while line := await stream.readline():
            self._log(machine, line.decode(errors="replace").rstrip("\n"), level)

    def _log(self, machine: Machine, message: str, level: str) -> None:
        """Append a line; timestamps are unique per app, so a page boundary never drops one."""
        if self.faults.drops_log_line():
            return
        lines = self.logs.setdefault(machine.app, [])
        nanos = max(time.time_ns(), lines[-1].nanos + 1) if lines else time.time_ns()
        lines.append(LogLine(nanos, message, level, machine.id, machine.region))

    async def watch_memory(self) -> None:
        """The kernel's OOM killer: every `memory_poll_s`, a machine whose processes together
        hold more resident memory than its `memory_mb` is killed for it."""
        while True:
            every = self.faults.config.memory_poll_s
            await asyncio.sleep(every or 1.0)
            if not every or not self.running:
                continue
            resident = await asyncio.to_thread(resident_by_group, set(self.running))
            for group, size in resident.items():
                machine = self.running.get(group)
                if machine is None or machine.killed_for_oom:
                    continue
                machine.peak_rss_mb = max(machine.peak_rss_mb, size >> 20)
                if size > machine.memory_mb << 20:
                    self._log(
                        machine,
                        f"Out of memory: Killed process {group} (anon-rss:{size >> 10}kB, "
                        f"memory_mb {machine.memory_mb})",
                        "error",
                    )
                    self._oom_kill(machine)

    def _oom_kill(self, machine: Machine) -> None:
        """The kernel's OOM killer: SIGKILL, recorded as oom_killed even for a quick process."""
        machine.killed_for_oom = True
        if machine.process is not None and machine.process.returncode is None:
            kill_group(machine.process.pid, signal.SIGKILL)

    async def _exited(self, machine: Machine, code: int) -> bool:
        """Record the exit; return whether the restart policy starts the process again."""
        restart = machine.config.get("restart") or {}
        policy = restart.get("policy") or "on-failure"
        max_retries = int(restart.get("max_retries") or 10)
        signum = -code if code < 0 else -1
        exit_code = 128 + signum if code < 0 else code
        again = not machine.stop_requested and (
            policy == "always"
            or (policy == "on-failure" and exit_code != 0 and machine.restart_count < max_retries)
        )
        if machine.fault != "no_exit_event":
            machine.event(
                "exit",
                "stopped",
                request={
                    "exit_event": {
                        "exit_code": exit_code,
                        "guest_exit_code": 0,
                        "guest_signal": -1,
                        "signal": signum,
                        "oom_killed": machine.killed_for_oom,
                        "requested_stop": machine.stop_requested,
                        "restarting": again,
                        "exited_at": rfc3339(time.time()),
                    },
                    "restart_count": machine.restart_count,
                },
            )
        machine.killed_for_oom = False
        if again:
            machine.restart_count += 1
            return True
        await self.set_state(machine, "stopped")
        if machine.config.get("auto_destroy"):
            await self.destroy(machine)
        return False

    async def stop(self, machine: Machine, signal_name: str | None, timeout: float) -> None:
        """Signal the process group, then SIGKILL it after `timeout`."""
        machine.stop_requested = True
        process = machine.process
        if machine.state not in ("started", "starting") or process is None:
            return
        await self.set_state(machine, "stopping")
        kill_group(process.pid, SIGNALS.get(signal_name or "SIGINT", signal.SIGINT))
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
        except TimeoutError:
            kill_group(process.pid, signal.SIGKILL)

    async def update(self, machine: Machine, config: dict[str, Any], *, launch: bool) -> None:
        """A new version of the machine with `config` whole: a running machine is stopped first;
        with `launch` it starts (on a fresh root) at once. Faults match the new metadata."""
        machine.event("update", "replacing", source="user")
        if machine.process is not None and machine.process.returncode is None:
            await self.stop(machine, "SIGKILL", 0)
        if machine.task is not None and machine.task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await machine.task
        machine.config = dict(config)
        machine.instance_id = ulid()
        machine.fault = self.faults.machine_fault(machine.name, machine.metadata)
        machine.restart_count = 0
        machine.killed_for_oom = False
        machine.event("update", "updated")
        if launch:
            await self.start(machine)
        else:
            await self.set_state(machine, "stopped")

    async def start(self, machine: Machine) -> str:
        """Start a stopped machine again; returns the previous state."""
        previous = machine.state
        machine.stop_requested = False
        await self.set_state(machine, "created")
        machine.task = asyncio.create_task(self._run(machine))
        return previous

    async def destroy(self, machine: Machine) -> None:
        """Kill the whole process group, remove the workspace, mark the machine destroyed."""
        machine.event("destroy", "destroying", source="user")
        await self.set_state(machine, "destroying")
        if machine.process is not None and machine.process.returncode is None:
            kill_group(machine.process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await machine.process.wait()
        if machine.task is not None and machine.task is not asyncio.current_task():
            machine.task.cancel()
        if machine.workspace is not None:
            shutil.rmtree(machine.workspace, ignore_errors=True)
        machine.event("destroy", "destroyed")
        await self.set_state(machine, "destroyed")

    def kill_everything(self) -> None:
        """SIGKILL every machine's process group: nothing outlives localfly."""
        for machines in self.machines.values():
            for machine in machines.values():
                if machine.process is not None and machine.process.returncode is None:
                    kill_group(machine.process.pid, signal.SIGKILL)
                if machine.workspace is not None:
                    shutil.rmtree(machine.workspace, ignore_errors=True)
