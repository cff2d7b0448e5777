"""`make demo`: the whole stack on one machine, an example batch, its results, then cleanup.

Starts what is not already running (a Temporal dev server with its SQLite file under .state/,
localfly, the loopback S3 store with its bucket, a worker; `make up`'s stack is used as it is),
submits examples/demo.yaml, shows
progress to the end, prints the results and where to look in the Web UI, checks localfly has no
machine left, and stops what it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx

from client.local_stack import localfly_process, running_worker, worker_environment
from client.stack import DevServer, LocalS3, listening
from sortie.settings import Settings
from sortie.store import OFFLINE_URL, StoreSettings

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".state"
BATCH_FILE = ROOT / "examples" / "demo.yaml"


def stop(process: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM, then SIGKILL if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print(f"stopped {name}")


def start_temporal(stack: ExitStack) -> None:
    """A dev server with persistence and the Web UI, unless one already runs."""
    if listening("127.0.0.1", 7233):
        print("using the Temporal server already on localhost:7233")
        return
    server = DevServer(STATE / "temporal.db", STATE / "temporal.log", port=7233, ui_port=8233)
    stack.enter_context(server)
    stack.callback(print, "stopped the Temporal dev server")
    print("started the Temporal dev server (history in .state/temporal.db, UI on :8233)")


def start_localfly(stack: ExitStack) -> str:
    """localfly on its usual port, unless one already runs."""
    if listening("127.0.0.1", 4280):
        print("using the localfly already on 127.0.0.1:4280")
        return "http://127.0.0.1:4280"
    # Offline, the agent image runs our entrypoint and `claude` is the stand-in from tests/bin.
    process = stack.enter_context(localfly_process(4280, STATE / "localfly.log"))
    print(f"started localfly at {process.url}")
    return process.url


def start_store(stack: ExitStack) -> None:
    """moto's S3 on its usual port with the bucket made, unless the environment names a bucket."""
    if not StoreSettings.from_env().offline:
        print(f"using the object store {StoreSettings.from_env().describe()}")
        return
    port = int(OFFLINE_URL.rsplit(":", 1)[1])
    if listening("127.0.0.1", port):
        print(f"using the S3 server already on {OFFLINE_URL}")
        return
    stack.enter_context(LocalS3(STATE / "s3.log", port=port))
    stack.callback(print, "stopped the S3 server")
    print(f"started the S3 server (moto) at {OFFLINE_URL}, bucket sortie")


def start_worker(stack: ExitStack, localfly_url: str) -> None:
    """A Sortie worker, offline against localfly, unless `make up`'s worker runs."""
    if running_worker(STATE):
        print("using the worker `make up` started (log in .state/worker.log)")
        return
    env = worker_environment(os.environ, localfly_url)
    log = (STATE / "worker.log").open("ab")
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")], env=env, stdout=log, stderr=log, cwd=ROOT
    )
    stack.callback(stop, worker, "the worker (log in .state/worker.log)")
    print("started a worker (log in .state/worker.log)")


def live_machines(localfly_url: str, app: str) -> int:
    """Machines localfly still has alive for the app: what would cost money."""
    machines = httpx.get(f"{localfly_url}/_localfly/machines", params={"app": app}).json()
    return sum(1 for m in machines if m["state"] != "destroyed")


def main() -> int:
    """Run the demo; succeed when the batch ran to the end and left no machine behind."""
    STATE.mkdir(exist_ok=True)
    settings = Settings.from_env()
    with ExitStack() as stack:
        start_temporal(stack)
        localfly_url = start_localfly(stack)
        start_store(stack)
        start_worker(stack, localfly_url)
        print(f"\nsubmitting {BATCH_FILE.relative_to(ROOT)}\n")
        ran = subprocess.run(
            [
                sys.executable,
                str(ROOT / "starter.py"),
                "submit",
                str(BATCH_FILE),
                "--new",
                "--wait",
            ],
            cwd=ROOT,
        )
        left = live_machines(localfly_url, "sortie-demo")
        print(f"\nmachines left running at localfly: {left}")
        print(
            f"\nIn the Web UI ({settings.ui_url}) open the batch: its chunks are its children "
            "(Relationships),\neach with a summary, live details, its jobs' outcomes and one "
            "activity per machine step.\nList them with the query "
            'ParentWorkflowId="<batch id>" (or BatchId="<batch id>").\nRun `make ui` '
            "afterwards to browse this history again.\n"
        )
    # The demo batch fails one job and times out another on purpose: exit 1 is expected.
    return 0 if ran.returncode in (0, 1) and left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
