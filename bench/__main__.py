"""Benchmarks: Sortie against the ideal makespan and against a plain asyncio runner.

    python -m bench --jobs N --concurrency C --duration T [--json] [--enforce-limits]
        [--no-baseline] [--batches K] [--workers W] [--apps A] [--max-failures F] [--job-bytes B]
        [--plain-server]
    python -m bench --submit-only --jobs N [--job-bytes B] [--json]
    python -m bench --standard [--large] [--json]
    python -m bench --pacing [--json]
    python -m bench --jobs N --concurrency C --duration T --reuse [--chunk-size S] [--check-root]

Each run starts its own Temporal dev server, S3 server (moto) and localfly, runs N `sleep T`
jobs (each padded to B bytes with --job-bytes, a command that long) through Sortie
(a worker in this process) and then the same jobs through a semaphore-and-gather runner that
uses the same Fly client with no Temporal, and prints one table row per configuration.

With --enforce-limits localfly answers 429 as Fly does and the Fly client paces itself; the row
then gives the sustained create rate localfly saw (creates after the first burst of 3, over the
time from the first create to the last) against Fly's allowed 1/s, and the 429s Sortie drew.
With --apps A the batch spreads its jobs over A Fly apps (allowed A creates a second); with
--workers W (more than one) the batch runs on W `worker.py` processes instead of one in this
process, all pacing creates as on real Fly; the batch is submitted once all of them poll.
With --plain-server the dev server runs as `temporal server start-dev` starts it (no dynamic
config, as on Temporal Cloud) instead of with the stack's settings (client/stack.py).
--pacing runs the rows that show each app's create rate held for all workers: 150 jobs of 10 s
over 3 apps, cap 60, 2 worker processes, Fly's limits enforced, on a plain start-dev and on the
stack's; the last column compares the makespan with what Fly's create rate allows.
Fly API calls are counted at localfly, 429s included; peak RSS is this process's (the worker's)
during the Sortie run, reset per configuration on Linux.

--reuse runs each configuration twice, one machine per job and then with `reuse_machines`, and
gives the machines each run created; --check-root makes every job fail if it finds anything
under its machine's root ($LOCALFLY_ROOT) and leave a file there for the next job to find.

--submit-only submits N jobs and measures what the starter does: the time to validate, store the
jobs in the object store (the claim check) and start the batch, and the largest workflow input
in the batch's history; no worker runs and the batch is terminated afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from activities.secrets import SecretStore
from bench.costs import CpuMeter, count_events
from client import batches
from client.stack import DevServer, LocalS3
from fly import FlyClient, FlySettings, FlyToken, InitConfig, MachineConfig, RestartConfig
from localfly.process import LocalFlyProcess
from sortie.settings import Settings
from sortie.spec import parse_batch
from worker import build_worker

STANDARD = [(100, 10, 2.0), (1000, 100, 5.0)]
LARGE = [(10000, 200, 1.0)]
PACING = (150, 60, 10.0)
"""--pacing: N, C, T of the batch that shows each app's create rate held by two workers."""
ENDPOINTS = ["create", "update", "wait", "get", "list", "logs", "destroy"]
SIGNAL_WINDOW_S = 10.0
"""The window the batch's busiest stretch of signals is measured over."""
CREATE_RATE, CREATE_BURST = 1.0, 3
"""Fly's published limit on machine creates per app: 1 request/s sustained, bursts of 3."""


class Row(BaseModel):
    """One configuration's measurements."""

    jobs: int
    batches: int = 1
    concurrency: int
    duration_s: float
    makespan_s: float
    ideal_s: float
    baseline_s: float | None
    jobs_per_s: float
    succeeded: int
    baseline_succeeded: int | None
    calls_per_job: dict[str, float]
    max_live: int
    rss_mb: float
    parent_events: int
    parent_bytes: int
    child_events: int
    child_bytes: int
    rate_limited: int
    enforced: bool = False
    apps: int = 1
    workers: int = 1
    one_machine_each: bool = True
    """No job got a second machine: machines made equal jobs run."""
    batch_run_events: list[int] = []
    """Events of every batch run (every batch's, with --batches), in the order they started."""
    chunk_runs: int = 0
    signals_per_s: float = 0.0
    """The most signals the batch took in any SIGNAL_WINDOW_S of its history, per second."""
    busiest: str = ""
    """What the busiest SIGNAL_WINDOW_S of signals held: when, which, from how many chunks."""
    creates_per_s: float | None = None
    """Creates beyond the first burst over the time from the first create to the last: the
    sustained rate, comparable with Fly's allowed 1/s (a full bucket lets 3 through at once)."""
    server: str = "the stack's dev server"
    """Which Temporal server: the stack's (client/stack.py) or a plain `start-dev`."""
    creates_s: tuple[float, float] | None = None
    """When the first and the last machine were created, in seconds after the batches were
    submitted: the makespan is submit-to-first + creating + last job's run + its end."""
    reuse: bool = False
    """The batch ran with `reuse_machines`."""
    machines_created: int = 0
    live_after: int = 0
    """Machines localfly still had alive when the batch had closed."""
    cpu_s: dict[str, float] = {}
    """CPU seconds each process used during the Sortie run: the worker (this process, or the
    worker processes), the dev server, localfly (its machines not counted), the S3 server."""
    workflow_tasks: int = 0
    """Workflow tasks completed in every batch and chunk run."""
    activities: dict[str, int] = {}
    """Activities scheduled by every batch and chunk run, by type."""

    @property
    def paced_ideal_s(self) -> float | None:
        """With Fly's limits: the makespan Fly's create rate allows, (N - 3A)/A + T for A apps
        (a burst of 3 each, then 1 a second), when creates are what limits it."""
        if not self.enforced:
            return None
        bursts = CREATE_BURST * self.apps
        return max(self.jobs - bursts, 0) / (CREATE_RATE * self.apps) + self.duration_s

    @property
    def ratio(self) -> float | None:
        """Makespan over the ideal ceil(N/C)*T (none for jobs of 0 s)."""
        return self.makespan_s / self.ideal_s if self.ideal_s else None

    @property
    def calls_total(self) -> float:
        """Fly API calls per job, every endpoint."""
        return sum(self.calls_per_job.values())

    @property
    def versus_baseline(self) -> float | None:
        """Makespan over the plain asyncio runner's."""
        return self.makespan_s / self.baseline_s if self.baseline_s else None


CHECK_ROOT = (
    'left=$(ls -A "$LOCALFLY_ROOT"); if [ -n "$left" ]; then echo "found $left"; exit 9; fi; '
    'touch "$LOCALFLY_ROOT/left-by-$SORTIE_JOB_ID"; sleep {t:g}'
)
"""--check-root: a job that fails on anything an earlier job left under its machine's root."""


def bench_jobs(
    first: int, last: int, t: float, job_bytes: int, check_root: bool = False
) -> list[dict[str, Any]]:
    """`sleep T` command jobs, each padded to about `job_bytes` bytes of command."""
    if check_root:
        return [
            {"id": f"j{i:06d}", "command": ["sh", "-c", CHECK_ROOT.format(t=t)]}
            for i in range(first, last)
        ]
    if job_bytes <= 0:
        return [{"id": f"j{i:06d}", "command": ["sleep", f"{t:g}"]} for i in range(first, last)]
    pad = "x" * max(job_bytes - 32, 0)
    return [
        {"id": f"j{i:06d}", "command": ["sh", "-c", f"sleep {t:g} # {i} {pad}"]}
        for i in range(first, last)
    ]


async def run_sortie(
    client: Client,
    fly: FlyClient,
    apps: list[str],
    n: int,
    c: int,
    t: float,
    k: int = 1,
    workers: list[subprocess.Popen[bytes]] | None = None,
    task_queue: str | None = None,
    max_failures: int | None = None,
    job_bytes: int = 0,
    reuse: bool = False,
    chunk_size: int | None = None,
    check_root: bool = False,
) -> tuple[float, list[str], int]:
    """Run the jobs through a worker in this process (or the `workers` given, on
    `task_queue`), as `k` batches at once that share the `c` machines (under `max_failures` if
    given); return the makespan, the batch ids, and how many jobs succeeded."""
    settings = Settings(task_queue=task_queue or f"bench-{uuid.uuid4().hex}")
    specs = [
        parse_batch(
            {
                "name": f"bench{n}x{c}-{b}",
                **({"apps": apps} if len(apps) > 1 else {"app": apps[0]}),
                "max_machines": c // k,
                **({"max_failures": max_failures} if max_failures else {}),
                **({"chunk_size": chunk_size} if chunk_size else {}),
                "reuse_machines": reuse,
                "defaults": {"image": "bench", "timeout": "10m", "retries": 0},
                "jobs": bench_jobs(b * n // k, (b + 1) * n // k, t, job_bytes, check_root),
            }
        )
        for b in range(k)
    ]
    here = build_worker(client, fly, SecretStore({}), settings) if not workers else None
    async with here or contextlib.nullcontext():
        started = time.monotonic()
        ids = [
            (await batches.submit(client, settings, spec, suffix=uuid.uuid4().hex[:6])).batch_id
            for spec in specs
        ]
        outputs = await asyncio.gather(*(batches.batch_handle(client, i).result() for i in ids))
        makespan = time.monotonic() - started
    return makespan, ids, sum(o.succeeded for o in outputs)


async def run_baseline(fly: FlyClient, n: int, c: int, t: float) -> tuple[float, int]:
    """The plain asyncio runner a user would write: a semaphore and gather, nothing durable.

    Returns the makespan and how many jobs exited 0."""
    app = f"base-{uuid.uuid4().hex[:8]}"
    limit = asyncio.Semaphore(c)

    async def one(i: int) -> int | None:
        async with limit:
            config = MachineConfig(
                image="bench",
                init=InitConfig(exec=["sleep", f"{t:g}"]),
                restart=RestartConfig(policy="no"),
            )
            machine = await fly.create_machine(app, config, name=f"base-{i}")
            try:
                await fly.wait_for_state(
                    app,
                    machine.id,
                    ["stopped", "failed", "destroyed"],
                    version=machine.current_version,
                    timeout=600,
                )
                event = (await fly.get_machine(app, machine.id)).latest_exit_event()
                return event.exit_code if event else None
            finally:
                await fly.destroy_machine(app, machine.id)

    started = time.monotonic()
    codes = await asyncio.gather(*(one(i) for i in range(n)))
    return time.monotonic() - started, sum(1 for code in codes if code == 0)


class Histories(BaseModel):
    """The sizes of a configuration's workflow runs."""

    batch_runs: list[tuple[int, int]]
    """Events and bytes of every batch run, in the order the runs started."""
    chunk_runs: int
    largest_chunk: tuple[int, int]
    signals_per_s: float
    """The most signals the batch runs took in any SIGNAL_WINDOW_S, per second."""
    busiest: str = ""
    """What those signals were (see Row.busiest)."""
    workflow_tasks: int = 0
    activities: dict[str, int] = {}


async def histories(client: Client, batch_ids: list[str]) -> Histories:
    """Events and bytes of every batch run, and of the largest chunk run."""
    runs: list[tuple[datetime, int, int]] = []
    chunks: list[tuple[int, int]] = []
    signals: list[tuple[float, str, int]] = []  # when, what, from which chunk
    tasks = 0
    activities: Counter[str] = Counter()
    signaled = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    query = " OR ".join(f'BatchId="{batch_id}"' for batch_id in batch_ids)
    async for execution in client.list_workflows(query):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        history = await handle.fetch_history()
        size = (len(history.events), sum(e.ByteSize() for e in history.events))
        tasks += count_events(history.events, activities)
        if execution.workflow_type == "BatchWorkflow":
            runs.append((execution.start_time, *size))
            signals += [_signal(e) for e in history.events if e.event_type == signaled]
        else:
            chunks.append(size)
    return Histories(
        batch_runs=[(events, size) for _, events, size in sorted(runs)],
        chunk_runs=len(chunks),
        largest_chunk=max(chunks, default=(0, 0)),
        signals_per_s=_busiest([t for t, _, _ in sorted(signals)], SIGNAL_WINDOW_S)[0]
        / SIGNAL_WINDOW_S,
        busiest=_what(sorted(signals), min((r[0] for r in runs), default=None)),
        workflow_tasks=tasks,
        activities=dict(activities),
    )


def _signal(event: Any) -> tuple[float, str, int]:
    """When the batch took a signal, what it was (a report: what it told), from which chunk."""
    attributes = event.workflow_execution_signaled_event_attributes
    at = event.event_time.ToDatetime().timestamp()
    if attributes.signal_name != "chunk_report":
        return at, attributes.signal_name, -1
    report = json.loads(attributes.input.payloads[0].data)
    kind = (
        "give-back" if report.get("released") else "errors" if report.get("errors") else "progress"
    )
    return at, f"report ({kind})", report["index"]


def _what(signals: list[tuple[float, str, int]], began: datetime | None) -> str:
    """What the busiest SIGNAL_WINDOW_S of `signals` held, for the row's note."""
    most, first = _busiest([t for t, _, _ in signals], SIGNAL_WINDOW_S)
    if not most or began is None:
        return ""
    window = signals[first : first + most]
    kinds = Counter(kind for _, kind, _ in window)
    chunks = len({index for _, _, index in window if index >= 0})
    return (
        f"busiest {SIGNAL_WINDOW_S:g} s from {window[0][0] - began.timestamp():.0f} s: "
        + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        + f" from {chunks} chunks"
    )


def _busiest(times: list[float], window: float) -> tuple[int, int]:
    """The most of the sorted `times` within any `window` seconds, and where they start."""
    most, first, start = 0, 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        if last - first + 1 > most:
            most, start = last - first + 1, first
    return most, start


def start_workers(
    count: int, server: DevServer, localfly: LocalFlyProcess, task_queue: str, log: Path
) -> list[subprocess.Popen[bytes]]:
    """`count` worker processes on the task queue, pacing creates as they would on real Fly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "TEMPORAL_"))}
    env.update(
        TEMPORAL_ADDRESS=server.address,
        SORTIE_TASK_QUEUE=task_queue,
        SORTIE_LOCALFLY_URL=localfly.url,
        SORTIE_FLY_RATE_LIMIT="on",
        SORTIE_REAPER="off",
        SORTIE_STATE_DIR=str(log.parent / "state"),
    )
    root = Path(__file__).resolve().parents[1]
    with log.open("ab") as out:
        return [
            subprocess.Popen(
                [sys.executable, str(root / "worker.py")],
                cwd=root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            for _ in range(count)
        ]


class SubmitRow(BaseModel):
    """What submitting a large batch costs the starter."""

    jobs: int
    job_bytes: int
    submit_s: float
    chunks: int
    stored_bytes: int
    largest_input_bytes: int
    batch_events: int


async def measure_submit(n: int, job_bytes: int) -> SubmitRow:
    """Submit N jobs with no worker: time it, then read the largest payload in history."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        DevServer(Path(tmp) / "temporal.db", Path(tmp) / "temporal.log") as server,
        LocalS3(Path(tmp) / "s3.log") as s3,
    ):
        os.environ.update(s3.env())
        client = await Client.connect(
            server.address, data_converter=pydantic_data_converter, runtime=_runtime()
        )
        settings = Settings(task_queue=f"bench-{uuid.uuid4().hex}")
        started = time.monotonic()
        spec = parse_batch(
            {
                "name": f"submit{n}",
                "app": "bench",
                "max_machines": 200,
                "defaults": {"image": "bench", "timeout": "10m", "retries": 0},
                "jobs": bench_jobs(0, n, 0, job_bytes),
            }
        )
        submitted = await batches.submit(client, settings, spec)
        submit_s = time.monotonic() - started
        handle = client.get_workflow_handle(submitted.batch_id)
        history = await handle.fetch_history()
        largest = max((p.ByteSize() for e in history.events for p in _payloads(e)), default=0)
        stored = chunks = 0
        async for item in settings.blob_store().objects(f"jobs/{submitted.batch_id}"):
            stored, chunks = stored + item.size, chunks + 1
        await handle.terminate(reason="bench: submit only")
        await settings.blob_store().close()
    return SubmitRow(
        jobs=n,
        job_bytes=job_bytes,
        submit_s=submit_s,
        chunks=chunks,
        stored_bytes=stored,
        largest_input_bytes=largest,
        batch_events=len(history.events),
    )


def _payloads(event: Any) -> list[Any]:
    """Every payload an event carries (inputs and results), found by walking its fields."""
    found: list[Any] = []

    def walk(message: Any) -> None:
        for field, value in message.ListFields():
            if field.message_type is None:
                continue
            items = value if field.is_repeated else [value]
            for item in items:
                if field.message_type.name == "Payload":
                    found.append(item)
                elif hasattr(item, "ListFields"):
                    walk(item)

    walk(event)
    return found


def submit_table(rows: list[SubmitRow]) -> str:
    """A Markdown table of submit-only rows."""
    head = (
        "| N | bytes a job | submit time | chunks | jobs stored | largest workflow input "
        "| batch events |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.jobs:,} | {r.job_bytes:,} | {r.submit_s:.1f}s | {r.chunks:,} "
            f"| {r.stored_bytes / 1e6:.1f} MB | {r.largest_input_bytes:,} B | {r.batch_events} |"
        )
    return "\n".join(lines)


async def measure(
    n: int,
    c: int,
    t: float,
    *,
    enforce: bool,
    baseline: bool,
    split: int = 1,
    workers: int = 1,
    apps: int = 1,
    max_failures: int | None = None,
    job_bytes: int = 0,
    matching: list[str] | None = None,
    reuse: bool = False,
    chunk_size: int | None = None,
    check_root: bool = False,
) -> Row:
    """Start a stack, run Sortie and the baseline, and collect the numbers."""
    _reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        faults = {"rate_limits": {"enforce": True, "retry_after": True}} if enforce else {}
        with (
            DevServer(
                Path(tmp) / "temporal.db", Path(tmp) / "temporal.log", matching=matching
            ) as server,
            LocalFlyProcess(faults=faults) as localfly,
            LocalS3(Path(tmp) / "s3.log") as s3,
        ):
            os.environ.update(s3.env())
            client = await Client.connect(
                server.address, data_converter=pydantic_data_converter, runtime=_runtime()
            )
            fly_settings = FlySettings(
                api_base_url=localfly.url, logs_base_url=localfly.url, rate_limit=enforce
            )
            names = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(apps)]
            app = names[0]
            progress = asyncio.create_task(_progress(localfly, app, n))
            queue = f"bench-{uuid.uuid4().hex}"
            processes = (
                start_workers(workers, server, localfly, queue, Path(tmp) / "workers.log")
                if workers > 1
                else []
            )
            await _polling(client, queue, len(processes))
            async with FlyClient.open(fly_settings, FlyToken("bench")) as fly:
                began = time.time()
                pids = {
                    "dev server": [server.process.pid] if server.process else [],
                    "localfly": [localfly.pid],
                    "S3": [s3.process.pid] if s3.process else [],
                    "worker": [p.pid for p in processes],
                }
                meter = CpuMeter(pids, in_process=not processes)
                try:
                    makespan, batch_ids, succeeded = await run_sortie(
                        client,
                        fly,
                        names,
                        n,
                        c,
                        t,
                        split,
                        processes,
                        queue,
                        max_failures,
                        job_bytes,
                        reuse,
                        chunk_size,
                        check_root,
                    )
                finally:
                    cpu = meter.stop()
                    progress.cancel()
                    for process in processes:
                        process.terminate()
                    for process in processes:
                        process.wait(timeout=30)
                rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                _note(
                    f"Sortie: {succeeded}/{n} succeeded in {makespan:.1f}s, "
                    f"peak RSS {rss_mb:.0f} MB"
                )
                per_app = [localfly.stats(a) for a in names]
                stats = {
                    "calls": sum((Counter(s["calls"]) for s in per_app), Counter()),
                    "max_live_machines": sum(s["max_live_machines"] for s in per_app),
                    "rate_limited": sum(s.get("rate_limited", 0) for s in per_app),
                }
                made = [m for a in names for m in localfly.machines(a)]
                live_after = sum(m["state"] != "destroyed" for m in made)
                created = sorted(_when(m["created_at"]) for m in made)
                most = most_at_once(made)
                runs = await histories(client, batch_ids)
                base = await run_baseline(fly, n, c, t) if baseline else None
    calls: Counter[str] = Counter(stats["calls"])
    bursts = CREATE_BURST * apps
    span = created[-1] - created[0] if len(created) > bursts else 0.0
    creates_per_s = (len(created) - bursts) / span if span > 0 else None
    return Row(
        jobs=n,
        batches=split,
        concurrency=c,
        duration_s=t,
        makespan_s=makespan,
        ideal_s=math.ceil(n / c) * t,
        baseline_s=base[0] if base else None,
        jobs_per_s=n / makespan,
        succeeded=succeeded,
        baseline_succeeded=base[1] if base else None,
        calls_per_job={e: calls.get(e, 0) / n for e in ENDPOINTS},
        max_live=most if most is not None else int(stats["max_live_machines"]),
        rss_mb=rss_mb,
        parent_events=max(events for events, _ in runs.batch_runs),
        parent_bytes=max(size for _, size in runs.batch_runs),
        child_events=runs.largest_chunk[0],
        child_bytes=runs.largest_chunk[1],
        batch_run_events=[events for events, _ in runs.batch_runs],
        chunk_runs=runs.chunk_runs,
        signals_per_s=runs.signals_per_s,
        busiest=runs.busiest,
        rate_limited=int(stats.get("rate_limited", 0)),
        enforced=enforce,
        apps=apps,
        workers=workers,
        one_machine_each=len(made) == succeeded,
        creates_per_s=creates_per_s,
        creates_s=(created[0] - began, created[-1] - began) if created else None,
        server="a plain start-dev" if matching == [] else "the stack's dev server",
        reuse=reuse,
        machines_created=len(made),
        live_after=live_after,
        cpu_s=cpu,
        workflow_tasks=runs.workflow_tasks,
        activities=runs.activities,
    )


def most_at_once(machines: list[dict[str, Any]]) -> int | None:
    """The most machines that existed at once, all apps together (None: one never destroyed)."""
    if any(m.get("destroyed_at") is None for m in machines):
        return None
    changes = sorted(
        [(_when(m["created_at"]), 1) for m in machines]
        + [(_when(m["destroyed_at"]), -1) for m in machines]
    )
    live = most = 0
    for _, change in changes:
        live += change
        most = max(most, live)
    return most


async def _polling(client: Client, queue: str, count: int, timeout: float = 120) -> None:
    """Wait until `count` worker processes poll the task queue: the batch is submitted to
    running workers, as a user's would be, and their start is not counted in its makespan."""
    deadline = time.monotonic() + timeout
    while count:
        described = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
        if len({poller.identity for poller in described.pollers}) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not poll {queue} within {timeout:g}s")
        await asyncio.sleep(0.2)


async def _progress(localfly: LocalFlyProcess, app: str, n: int, every: float = 60) -> None:
    """Say on stderr how far a long Sortie run has got."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(every)
        stats = await asyncio.to_thread(localfly.stats, app)
        _note(
            f"{time.monotonic() - started:.0f}s: {stats['machines_created']}/{n} machines "
            f"created, {stats['live_machines']} live"
        )


@functools.cache
def _runtime() -> Runtime:
    """Temporal's core logs through Python's logging to stderr, so stdout holds only the table."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    forward = LogForwardingConfig(logger=logging.getLogger("temporal.core"))
    only_warnings = TelemetryFilter(core_level="WARN", other_level="ERROR")
    return Runtime(
        telemetry=TelemetryConfig(logging=LoggingConfig(filter=only_warnings, forwarding=forward))
    )


def _note(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def _reset_peak_rss() -> None:
    """Start this configuration's peak RSS afresh (Linux); elsewhere it is the process's peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _when(value: Any) -> float:
    """A localfly timestamp (RFC 3339 text or epoch seconds) as epoch seconds."""
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    head = (
        "| N | C | T | makespan | ideal | makespan/ideal | baseline | Sortie/baseline | jobs/s "
        "| succeeded (Sortie/baseline) "
        "| reuse | machines created | left after "
        "| Fly calls per job: create/update/wait/get/list/logs/destroy = total | max live "
        "| worker peak RSS | largest parent history | largest child history "
        "| creates/s achieved vs allowed | 429s | workers, apps | one machine a job "
        "| first, last create | makespan/paced ideal "
        f"| batch signals/s, busiest {SIGNAL_WINDOW_S:g} s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        calls = "/".join(f"{r.calls_per_job[e]:.2f}" for e in ENDPOINTS)
        base = f"{r.baseline_s:.1f}s" if r.baseline_s else "-"
        versus = f"{r.versus_baseline:.3f}" if r.versus_baseline else "-"
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        base_ok = "-" if r.baseline_succeeded is None else str(r.baseline_succeeded)
        jobs = f"{r.jobs} in {r.batches} batches" if r.batches > 1 else str(r.jobs)
        rate = "-"
        allowed = CREATE_RATE * r.apps
        if r.enforced and r.creates_per_s is not None:
            rate = f"{r.creates_per_s:.3f} vs {allowed:g} ({r.creates_per_s / allowed:.1%})"
        lines.append(
            f"| {jobs} | {r.concurrency} | {r.duration_s:g}s | {r.makespan_s:.1f}s "
            f"| {r.ideal_s:.1f}s | {ratio} | {base} | {versus} | {r.jobs_per_s:.1f} "
            f"| {r.succeeded}/{base_ok} | {'yes' if r.reuse else 'no'} | {r.machines_created} "
            f"| {r.live_after} | {calls} = {r.calls_total:.2f} "
            f"| {r.max_live} | {r.rss_mb:.0f} MB | {r.parent_events} ev / {r.parent_bytes:,} B "
            f"| {r.child_events} ev / {r.child_bytes:,} B | {rate} | {r.rate_limited} "
            f"| {r.workers}, {r.apps} | {_one_each(r)} "
            f"| {_creates(r)} | {_paced(r)} | {r.signals_per_s:.1f} |"
        )
    lines.append("")
    for r in rows:
        runs = len(r.batch_run_events)
        lines.append(
            f"- N={r.jobs} C={r.concurrency} T={r.duration_s:g}s: "
            f"{runs} batch run{'s' * (runs > 1)}"
            f" of {', '.join(f'{e:,}' for e in r.batch_run_events)} events; "
            f"{r.chunk_runs:,} chunk runs; on {r.server}" + (f"; {r.busiest}" if r.busiest else "")
        )
        lines.append(f"  - per job: {_per_job(r)}")
    return "\n".join(lines)


def pacing_rows(as_json: bool) -> int:
    """The rows that show Fly's create rate held for all workers: the same batch on a plain
    `temporal server start-dev` (as Temporal Cloud: no dynamic config) and on the stack's."""
    n, c, t = PACING
    rows = []
    for plain in (True, False):
        row = asyncio.run(
            measure(
                n,
                c,
                t,
                enforce=True,
                baseline=False,
                workers=2,
                apps=3,
                matching=[] if plain else None,
            )
        )
        rows.append(row)
        _note(f"done: pacing on {row.server}, Sortie {row.makespan_s:.1f}s")
    print(json.dumps([r.model_dump() for r in rows], indent=2) if as_json else table(rows))
    sys.stdout.flush()
    os._exit(0)


def _per_job(r: Row) -> str:
    """The run's costs per job: workflow tasks, activities by type, CPU ms of each process."""
    activities = ", ".join(f"{name} {n / r.jobs:.2f}" for name, n in sorted(r.activities.items()))
    cpu = ", ".join(f"{name} {s * 1000 / r.jobs:.1f}" for name, s in r.cpu_s.items())
    return (
        f"{r.workflow_tasks / r.jobs:.2f} workflow tasks; activities: {activities}; "
        f"CPU ms (during the Sortie run): {cpu}"
    )


def _one_each(r: Row) -> str:
    """Whether no job got a second machine ("-" with reuse, where machines serve many jobs)."""
    return "-" if r.reuse else "yes" if r.one_machine_each else "NO"


def _creates(r: Row) -> str:
    return "-" if r.creates_s is None else f"{r.creates_s[0]:.1f}s, {r.creates_s[1]:.1f}s"


def _paced(r: Row) -> str:
    ideal = r.paced_ideal_s
    return "-" if ideal is None else f"{r.makespan_s / ideal:.3f} of {ideal:.1f}s"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the configurations, print the table (or JSON)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--standard", action="store_true", help="run the standard set")
    p.add_argument("--large", action="store_true", help="with --standard: add 10,000 jobs")
    p.add_argument("--enforce-limits", action="store_true", help="Fly's rate limits at localfly")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument(
        "--batches",
        type=int,
        default=1,
        help="submit the jobs as this many batches at once, sharing the machines",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (1: in this one)")
    p.add_argument("--apps", type=int, default=1, help="Fly apps the batch spreads over")
    p.add_argument(
        "--max-failures",
        type=int,
        help="run under this failure limit",
    )
    p.add_argument("--job-bytes", type=int, default=0, help="pad each job to this many bytes")
    p.add_argument(
        "--submit-only", action="store_true", help="with --jobs: time the submit, run nothing"
    )
    p.add_argument(
        "--plain-server",
        action="store_true",
        help="a plain `temporal server start-dev`: no dynamic config (as Temporal Cloud)",
    )
    p.add_argument(
        "--pacing",
        action="store_true",
        help="the pacing rows: 150 jobs of 10 s over 3 apps, cap 60, 2 workers, Fly's limits, "
        "on a plain start-dev and on the project's stack",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="run each configuration without and then with reuse_machines",
    )
    p.add_argument("--chunk-size", type=int, help="the batch's chunk_size")
    p.add_argument(
        "--check-root", action="store_true", help="jobs fail on files an earlier job left"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.submit_only:
        if not args.jobs:
            p.error("--submit-only needs --jobs")
        submitted = asyncio.run(measure_submit(args.jobs, args.job_bytes))
        if args.json:
            print(submitted.model_dump_json(indent=2))
        else:
            print(submit_table([submitted]))
        sys.stdout.flush()
        os._exit(0)
    if args.pacing:
        return pacing_rows(args.json)
    if args.standard:
        configs = STANDARD + (LARGE if args.large else [])
    elif args.jobs and args.concurrency and args.duration is not None:
        configs = [(args.jobs, args.concurrency, args.duration)]
    else:
        p.error("give --jobs, --concurrency and --duration, or --standard")
    if not all(1 <= args.batches <= c for _, c, _ in configs):
        p.error("--batches must be between 1 and the concurrency")
    rows = []
    for (n, c, t), reuse in [
        (config, reuse)
        for config in configs
        for reuse in ((False, True) if args.reuse else (False,))
    ]:
        row = asyncio.run(
            measure(
                n,
                c,
                t,
                enforce=args.enforce_limits,
                baseline=not args.no_baseline,
                split=args.batches,
                workers=args.workers,
                apps=args.apps,
                max_failures=args.max_failures,
                job_bytes=args.job_bytes,
                matching=[] if args.plain_server else None,
                reuse=reuse,
                chunk_size=args.chunk_size,
                check_root=args.check_root,
            )
        )
        rows.append(row)
        _note(f"done: N={n} C={c} T={t:g}s reuse={reuse}, Sortie {row.makespan_s:.1f}s")
    if args.json:
        print(json.dumps([r.model_dump() for r in rows], indent=2))
    else:
        print(table(rows))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
