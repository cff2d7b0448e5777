"""`make up` and `make down`: the local stack in the background, for batches of your own.

`up` starts what does not run yet (a Temporal dev server with its Web UI and SQLite file,
localfly, the loopback S3 store, a worker), each in its own process group under the state
directory (`.state/`, or SORTIE_STATE_DIR), records what it started in `<state>/up/`, prints
where each part is, and returns. Run twice, it starts nothing new. With FLY_API_TOKEN set it
starts no localfly (the worker uses Fly); with BUCKET_NAME set, no local store; with
TEMPORAL_ADDRESS elsewhere than this host, no dev server. Ports follow the usual variables:
TEMPORAL_ADDRESS, SORTIE_UI_URL, SORTIE_LOCALFLY_URL, SORTIE_LOCAL_S3_URL.

`down` stops what `up` recorded and nothing else, and keeps the dev server's file for `make ui`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from activities.credentials import ClaudePool
from client.stack import DevServer, LocalS3, listening
from localfly.process import LocalFlyProcess
from sortie.settings import LOCALFLY_URL, Settings
from sortie.spec import DEFAULT_IMAGE
from sortie.store import OFFLINE_URL, StoreSettings

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"localhost", "127.0.0.1"}
PARTS = ("temporal", "localfly", "store", "worker")
"""In the order `up` starts them; `down` stops them the other way round."""
WORKER_READY_S = 90.0
STOP_S = {"worker": 40.0}
"""How long a part may take to stop on SIGTERM before it is killed (a worker hands its waits
over within SORTIE_SHUTDOWN_GRACE); 20 s for the others."""


@dataclass(frozen=True)
class StackPlan:
    """Which parts this environment asks for, on which ports, kept under which directory."""

    state: Path
    temporal_port: int | None
    """None: Temporal runs elsewhere (TEMPORAL_ADDRESS or a profile names another host)."""
    ui_port: int
    localfly_port: int | None
    """None: FLY_API_TOKEN is set, the worker uses Fly."""
    store_port: int | None
    """None: BUCKET_NAME names a real store."""
    settings: Settings

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StackPlan:
        """Read the plan from the same variables the worker and the starter read."""
        env = os.environ if environ is None else environ
        settings = Settings.from_env(env)
        host, _, port = settings.temporal_address.rpartition(":")
        store = StoreSettings.from_env(env)
        return cls(
            state=settings.state_dir.resolve(),
            temporal_port=int(port) if host in LOOPBACK else None,
            ui_port=urlsplit(settings.ui_url).port or 8233,
            localfly_port=None
            if env.get("FLY_API_TOKEN")
            else urlsplit(env.get("SORTIE_LOCALFLY_URL") or LOCALFLY_URL).port,
            store_port=urlsplit(store.endpoint_url or OFFLINE_URL).port if store.offline else None,
            settings=settings,
        )

    @property
    def records(self) -> Path:
        """Where `up` writes down what it started (pid and start time, for `down`)."""
        return self.state / "up"

    @property
    def localfly_url(self) -> str:
        return f"http://127.0.0.1:{self.localfly_port}"


def up(plan: StackPlan, environ: Mapping[str, str] | None = None) -> int:
    """Start what is missing, wait until the worker polls, print where everything is."""
    env = dict(os.environ if environ is None else environ)
    plan.records.mkdir(parents=True, exist_ok=True)
    where: list[tuple[str, str, str]] = []
    settings = plan.settings

    if plan.temporal_port is None:
        where.append(("Temporal", settings.temporal_address, "elsewhere: not started here"))
    else:
        state = _ensure(
            plan, "temporal", (plan.temporal_port, plan.ui_port), lambda: _start_temporal(plan)
        )
        where.append(("Temporal", f"127.0.0.1:{plan.temporal_port}", state))
        db = plan.state / "temporal.db"
        where.append(("Web UI", f"http://127.0.0.1:{plan.ui_port}", f"history in {db}"))

    if plan.localfly_port is None:
        where.append(("Fly", "the real Machines API (FLY_API_TOKEN is set)", "not started here"))
    else:
        state = _ensure(plan, "localfly", (plan.localfly_port,), lambda: _start_localfly(plan))
        where.append(("localfly", plan.localfly_url, state))

    if plan.store_port is None:
        where.append(("store", settings.store.describe(), "not started here"))
    else:
        state = _ensure(plan, "store", (plan.store_port,), lambda: _start_store(plan))
        where.append(("store", settings.store.describe(), state))

    if _alive(plan, "worker"):
        state = "running, started by make up before"
    else:
        _record(plan, "worker", _start_worker(plan, env))
        state = "started"
    log = plan.state / "worker.log"
    where.append(("worker", f"task queue {settings.task_queue}, log {log}", state))
    try:
        _wait_for_worker(plan)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 2

    width = max(len(name) for name, _, _ in where)
    for name, place, state in where:
        print(f"{name:<{width}}  {place}  [{state}]")
    if plan.localfly_port is None and plan.store_port is not None:
        print(
            "\nnote: machines on Fly cannot reach the loopback store; prompt jobs need "
            "BUCKET_NAME and the AWS_* variables (docs/real-fly.md)"
        )
    print(
        "\nnext: python starter.py doctor\n"
        "      python starter.py submit my-batch.yaml --wait\n"
        "      make down   (stops what make up started; make ui browses the history after)"
    )
    return 0


def down(plan: StackPlan) -> int:
    """Stop what `up` started, the worker first, and keep the data."""
    for name in reversed(PARTS):
        record = plan.records / f"{name}.json"
        if not record.exists():
            continue
        if _alive(plan, name):
            recorded = json.loads(record.read_text())
            _stop(recorded["pid"], STOP_S.get(name, 20.0))
            for port in recorded.get("ports", []):
                _wait_closed(port)
            print(f"stopped {name}")
        record.unlink()
    print(f"data kept in {plan.state}: `make ui` browses the history")
    return 0


def worker_environment(environ: Mapping[str, str], localfly_url: str | None) -> dict[str, str]:
    """The worker's environment: offline, localfly and a stand-in Claude credential (the
    stand-in `claude` needs one to be present, not a real one); with Fly, the environment."""
    env = dict(environ)
    if localfly_url is not None:
        env.pop("FLY_API_TOKEN", None)
        env["SORTIE_LOCALFLY_URL"] = localfly_url
        if not ClaudePool.from_env(env):
            env["CLAUDE_CODE_OAUTH_TOKEN"] = "demo-offline-token"
    return env


def localfly_process(port: int, log: Path) -> LocalFlyProcess:
    """localfly as the demo runs it: the agent image is our entrypoint, `claude` the stand-in."""
    agent = {DEFAULT_IMAGE: f"{sys.executable} -m agent"}
    return LocalFlyProcess(port=port, images=agent, path=[ROOT / "tests" / "bin"], log=log)


def running_worker(state: Path) -> bool:
    """Whether a worker `make up` started runs (the demo then starts none of its own)."""
    record = state / "up" / "worker.json"
    if not record.exists():
        return False
    return _same_process(json.loads(record.read_text()))


def _ensure(plan: StackPlan, name: str, ports: tuple[int, ...], start: Callable[[], int]) -> str:
    """Start the part unless something listens on its (first) port; say which."""
    if _alive(plan, name) and listening("127.0.0.1", ports[0]):
        return "running, started by make up before"
    if listening("127.0.0.1", ports[0]):
        return "already there: not started by make up"
    _record(plan, name, start(), ports)
    return "started"


def _start_temporal(plan: StackPlan) -> int:
    assert plan.temporal_port is not None
    server = DevServer(
        plan.state / "temporal.db",
        plan.state / "temporal.log",
        port=plan.temporal_port,
        ui_port=plan.ui_port,
    ).start(timeout=120)
    assert server.process is not None
    return server.process.pid


def _start_localfly(plan: StackPlan) -> int:
    assert plan.localfly_port is not None
    return localfly_process(plan.localfly_port, plan.state / "localfly.log").start().pid


def _start_store(plan: StackPlan) -> int:
    assert plan.store_port is not None
    store = LocalS3(plan.state / "s3.log", port=plan.store_port).start()
    assert store.process is not None
    return store.process.pid


def _start_worker(plan: StackPlan, environ: Mapping[str, str]) -> int:
    env = worker_environment(environ, plan.localfly_url if plan.localfly_port is not None else None)
    with (plan.state / "worker.log").open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return worker.pid


def _wait_for_worker(plan: StackPlan) -> None:
    """Until the worker polls the task queue; a worker that exited is an error naming its log."""
    from client.doctor import pollers
    from sortie.temporal import connect

    async def polled() -> None:
        client = await connect(plan.settings)
        deadline = time.monotonic() + WORKER_READY_S
        while not await pollers(client, plan.settings):
            if not _alive(plan, "worker"):
                raise RuntimeError(f"the worker exited; see {plan.state / 'worker.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker does not poll; see {plan.state / 'worker.log'}")
            await asyncio.sleep(0.2)

    asyncio.run(polled())


def _record(plan: StackPlan, name: str, pid: int, ports: tuple[int, ...] = ()) -> None:
    """Write down what `up` started, for `down` (and for `up` run again)."""
    record = {"pid": pid, "started": _start_time(pid), "ports": list(ports)}
    (plan.records / f"{name}.json").write_text(json.dumps(record))


def _alive(plan: StackPlan, name: str) -> bool:
    record = plan.records / f"{name}.json"
    return record.exists() and _same_process(json.loads(record.read_text()))


def _same_process(record: dict[str, object]) -> bool:
    """The recorded process still runs, and is the same one (not a reused pid)."""
    pid = record["pid"]
    assert isinstance(pid, int)
    return _start_time(pid) not in (None, "") and _start_time(pid) == record["started"]


def _start_time(pid: int) -> str | None:
    """When the process started, in clock ticks since boot; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return fields[19]


def _stop(pid: int, grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it does not end in time."""
    started = _start_time(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while _start_time(pid) == started and time.monotonic() < deadline:
        time.sleep(0.1)
    if _start_time(pid) == started:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


def _wait_closed(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while listening("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """`python -m client.local_stack up|down`."""
    parser = argparse.ArgumentParser(prog="python -m client.local_stack", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        plan = StackPlan.from_env()
    except ValueError as error:
        print(f"bad configuration: {error}", file=sys.stderr)
        return 2
    if args.action == "up":
        try:
            return up(plan)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 2
    return down(plan)


if __name__ == "__main__":
    # Leave without interpreter finalisation, where the Temporal SDK may crash after a
    # successful run (temporalio/sdk-python#300), as worker.py and starter.py do.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
