"""The Sortie worker: runs batch and chunk workflows and the Fly machine activities.

Each worker polls its task queue (workflows, waits, destroys) and one create queue per Fly app
in use, paced for all workers together by the app's pacer workflow (activities/pacing.py).
Configured by environment (see sortie.settings). SIGTERM or SIGINT shuts it down gracefully:
waits in progress are handed over to the next worker, never lost. An object store it cannot use
(unreachable, no such bucket, refused keys) stops it at start with exit 2, before any batch runs.
"""

from __future__ import annotations

import asyncio
import compileall
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.worker import Interceptor, PollerBehaviorAutoscaling, Worker

import workflows
from activities.chunks import ChunkActivities
from activities.jobs import JobActivities
from activities.logs import LogContextInterceptor, configure_logging, note_machine
from activities.machines import MachineActivities
from activities.metrics import ADDRESS_VARIABLE, MetricsInterceptor, SortieMetrics, metrics_runtime
from activities.notify import NotifyActivities
from activities.pacing import CreateQueues
from activities.reaper import ReaperActivities
from activities.secrets import SecretStore
from fly import FlyClient
from sortie import reaping
from sortie.settings import Settings, fly_connection
from sortie.store import StoreError
from sortie.temporal import connect, run_main
from workflows.batch import BatchWorkflow
from workflows.chunk import ChunkWorkflow
from workflows.credentials import CredentialPoolWorkflow
from workflows.logs import MachineLogsWorkflow
from workflows.pacer import CreatePacerWorkflow
from workflows.reaper import ReaperWorkflow

log = logging.getLogger("sortie.worker")


@dataclass
class SortieWorker:
    """The worker of Sortie's task queue and its pollers of the per-app create queues."""

    main: Worker
    creates: CreateQueues

    async def __aenter__(self) -> SortieWorker:
        await self.creates.__aenter__()
        try:
            await self.main.__aenter__()
        except BaseException:  # raised as it came, the create queues closed first
            await self.creates.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.main.__aexit__(None, None, None)
        finally:
            await self.creates.__aexit__(None, None, None)


def build_worker(
    client: Client,
    fly: FlyClient,
    secrets: SecretStore,
    settings: Settings,
    interceptors: Sequence[Interceptor] = (),
) -> SortieWorker:
    """The worker for Sortie's task queue, and its create queues (one per Fly app in use)."""
    cache_workflow_bytecode()
    store = settings.blob_store()
    machines = MachineActivities(fly, secrets, store, task_queue=settings.task_queue)
    reaper = ReaperActivities(fly, store)
    jobs = JobActivities(store)
    notices = NotifyActivities(secrets, store, settings.workflow_url)
    chunks = ChunkActivities(client)
    deployment = settings.deployment_config()
    everywhere = [LogContextInterceptor(), *interceptors]
    creates = CreateQueues(
        client,
        settings.task_queue,
        machines.create_machine,
        rate=fly.settings.paced_create_rate,
        deployment=deployment,
        apps=[*filter(None, [fly.settings.app]), *settings.fly_apps],
        interceptors=everywhere,
    )
    machines.on_batch_apps.append(creates.serve)
    main = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[
            BatchWorkflow,
            ChunkWorkflow,
            ReaperWorkflow,
            CredentialPoolWorkflow,
            CreatePacerWorkflow,
            MachineLogsWorkflow,
        ],
        activities=[
            machines.check_batch,
            machines.reuse_machine,
            machines.finish_job,
            machines.read_logs,
            machines.destroy_machine,
            machines.release_sessions,
            jobs.load_jobs,
            jobs.store_rows,
            chunks.watch_chunks,
            reaper.reap_orphans,
            notices.notify,
        ],
        max_concurrent_activities=settings.max_concurrent_activities,
        # A batch starts hundreds of creates at once; polling more while the queue has a
        # backlog gets them to this worker sooner than five fixed pollers.
        activity_task_poller_behavior=PollerBehaviorAutoscaling(),
        graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace_s),
        # SORTIE_DEPLOYMENT and SORTIE_BUILD_ID set: Worker Versioning, workflows pinned to
        # the build they started on, their chunks (children) too; unset: unversioned.
        deployment_config=deployment,
        interceptors=everywhere,
    )
    return SortieWorker(main, creates)


def cache_workflow_bytecode() -> None:
    """Write the bytecode of the workflow modules, which the sandbox imports for every run.

    The sandbox imports a workflow's module afresh for each workflow it starts; without cached
    bytecode (PYTHONDONTWRITEBYTECODE, set in many container images) each of those imports
    compiles the source again, which cost most of the worker's CPU while a batch starts its
    chunks. Where the tree is read-only this does nothing and the sandbox compiles as before.
    """
    compileall.compile_dir(Path(workflows.__file__).parent, quiet=2)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run a worker until `stop` is set, then shut it down gracefully."""
    runtime = metrics_runtime(os.environ)
    client = await connect(settings, runtime=runtime)
    fly_settings, token = fly_connection()
    async with FlyClient.open(fly_settings, token) as fly:
        secrets = SecretStore()
        worker = build_worker(client, fly, secrets, settings, observe(fly, secrets, runtime))
        log.info(
            "worker on task queue %s at %s, namespace %s (%s; Fly API %s; object store %s)",
            settings.task_queue,
            settings.temporal_address,
            settings.temporal_namespace,
            connection_summary(client),
            fly_settings.api_base_url,
            settings.store.describe(),
        )
        # Every app the worker creates machines in gets swept: FLY_APP's schedule is the
        # queue's own, each other app's is named after it; all outlive the worker.
        schedules = reaping.ReaperSchedules(
            lambda app: reaping.ensure_reaper_schedule(
                client, settings, app, home=app == fly_settings.app
            )
        )
        worker.creates.on_new_app.append(schedules.ensure)
        try:
            async with worker:
                await stop.wait()
                log.info("shutting down: handing running waits over to the next worker")
        finally:
            await schedules.close()


def connection_summary(client: Client) -> str:
    """How the worker reaches Temporal, for its first log line: never a key's value."""
    config = client.service_client.config
    tls = "TLS" if config.tls else "no TLS"
    key = ", API key" if config.api_key else ""
    codec = client.data_converter.payload_codec
    return f"{tls}{key}, payloads " + (f"encrypted ({codec!r})" if codec else "in clear")


def observe(fly: FlyClient, secrets: SecretStore, runtime: Runtime | None) -> list[Interceptor]:
    """Let the logs name each created machine and, with a metrics runtime, count what happens."""
    fly.observers.append(note_machine)
    if runtime is None:
        return []
    metrics = SortieMetrics(runtime.metric_meter)
    fly.observers.append(metrics.observe_fly)
    secrets.claude.on_rest.append(metrics.credential_rested)
    log.info("metrics at http://%s/metrics", os.environ[ADDRESS_VARIABLE])
    return [MetricsInterceptor(metrics)]


async def main() -> int:
    """Entry point: check the object store, then serve until SIGTERM or SIGINT."""
    configure_logging(os.environ)
    settings = Settings.from_env()
    store = settings.blob_store()
    try:
        await store.check()
    except StoreError as error:
        print(f"sortie worker: {error}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(settings, stop)
    finally:
        await store.close()
    return 0


if __name__ == "__main__":
    run_main(main())
