"""Machine creates paced by Temporal: one task queue per Fly app, rate-limited by the server.

Fly allows each app about one create a second (bursts of 3). A limiter in each worker would let
N workers send N times that, so creates run as activities on `<task-queue>.fly.<app>`, which
every worker polls with `max_task_queue_activities_per_second`: Temporal's matching service
then hands out at most that many create tasks a second to all the queue's workers together.

A worker polls an app's queue once it knows the app is in use: the apps it is configured with
(FLY_APP, SORTIE_FLY_APPS), the apps of a batch it checked at submit, and every DISCOVER_EVERY
the apps of the batches and follow-ups running on its queue (their `fly_apps` memo).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from temporalio.client import Client
from temporalio.common import Priority
from temporalio.worker import Interceptor, Worker, WorkerDeploymentConfig

log = logging.getLogger("sortie.pacing")

APPS_MEMO = "fly_apps"
"""The memo of a batch (and of a follow-up turn) naming the Fly apps it creates machines in."""
DISCOVER_EVERY = 5.0
"""Seconds between two looks for apps in use that this worker does not poll yet."""
CREATES_AT_ONCE = 200
"""Creates one worker runs at once on an app's queue: each is one short Fly call, and 200
machines' first creates come at once. At 20, 10,000 jobs of 1 s on 200 localfly machines took
400 s instead of 279 s (docs/benchmarks.md); on Fly the app's rate paces them anyway."""


def batch_priority(priority: int, batch_id: str) -> Priority:
    """How a batch's work is ordered on the shared workers' queues: its priority (1 first, 5
    last), then a fair share per batch (its id as the fairness key), whoever submitted first.

    Set on the batch and its chunks; their activities (creates included) inherit it.
    """
    return Priority(priority_key=priority, fairness_key=batch_id)


def create_queue(task_queue: str, app: str) -> str:
    """The task queue of an app's creates: `<task-queue>.fly.<app>`."""
    return f"{task_queue}.fly.{app}"


def apps_query(task_queue: str) -> str:
    """Visibility query for the running batches and follow-up turns of a task queue."""
    return (
        f'TaskQueue="{task_queue}" AND ExecutionStatus="Running" AND ParentWorkflowId IS NULL '
        'AND WorkflowType IN ("BatchWorkflow", "ChunkWorkflow")'
    )


class CreateQueues:
    """This worker's pollers of the per-app create queues, started as apps come into use."""

    def __init__(
        self,
        client: Client,
        task_queue: str,
        create: Callable[..., Any],
        *,
        rate: float | None,
        deployment: WorkerDeploymentConfig | None = None,
        apps: Sequence[str] = (),
        interceptors: Sequence[Interceptor] = (),
    ) -> None:
        self._client = client
        self._task_queue = task_queue
        self._create = create
        self._rate = rate
        self._deployment = deployment
        self._configured = list(apps)
        self._interceptors = list(interceptors)
        self._workers: dict[str, Worker] = {}
        self._runs: list[asyncio.Task[None]] = []
        self._discovery: asyncio.Task[None] | None = None
        self.on_new_app: list[Callable[[str], Awaitable[None]]] = []
        """Told each app this worker starts polling for (e.g. to schedule its reaper)."""

    @property
    def apps(self) -> list[str]:
        """The apps whose create queue this worker polls."""
        return sorted(self._workers)

    async def serve(self, app: str) -> None:
        """Poll the app's create queue from now on (at once if already polled)."""
        if app in self._workers:
            return
        worker = Worker(
            self._client,
            task_queue=create_queue(self._task_queue, app),
            activities=[self._create],
            max_concurrent_activities=CREATES_AT_ONCE,
            max_task_queue_activities_per_second=self._rate,
            deployment_config=self._deployment,
            interceptors=self._interceptors,
        )
        self._workers[app] = worker
        self._runs.append(asyncio.create_task(self._run(app, worker)))
        rate = f"{self._rate:g}/s" if self._rate else "unpaced"
        log.info("polling %s for creates in Fly app %s (%s)", worker.task_queue, app, rate)
        for observer in self.on_new_app:
            try:
                await observer(app)
            except Exception:  # logged; an observer that must not fail retries itself
                log.exception("observer of new app %s failed", app)

    async def _run(self, app: str, worker: Worker) -> None:
        """Poll until shut down; a poller that fails is forgotten, so discovery starts it again."""
        try:
            await worker.run()
        except Exception:  # logged, and the next discovery polls the queue again
            log.exception("the create queue of %s stopped; polling it again on discovery", app)
            if self._workers.get(app) is worker:
                del self._workers[app]

    async def discover(self) -> None:
        """Serve every app a running batch or follow-up on this task queue names."""
        seen: set[str] = set()
        async for execution in self._client.list_workflows(apps_query(self._task_queue)):
            try:  # any other error fails the discovery, which is said and tried again
                apps: list[str] = await execution.memo_value(APPS_MEMO, [], type_hint=list[str])
            except (TypeError, ValueError) as error:  # a memo of another shape: not ours
                log.warning("workflow %s: memo %s unreadable: %s", execution.id, APPS_MEMO, error)
                continue
            seen.update(app for app in apps if isinstance(app, str))
        for app in sorted(seen):
            await self.serve(app)

    async def _keep_discovering(self) -> None:
        while True:
            try:
                await self.discover()
            except Exception as error:  # visibility briefly unavailable: look again later
                log.warning("could not list the apps in use: %s", error)
            await asyncio.sleep(DISCOVER_EVERY)

    async def __aenter__(self) -> CreateQueues:
        for app in self._configured:
            await self.serve(app)
        self._discovery = asyncio.create_task(self._keep_discovering())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
            await asyncio.gather(self._discovery, return_exceptions=True)
        await asyncio.gather(
            *(w.shutdown() for w in self._workers.values()), return_exceptions=True
        )
        await asyncio.gather(*self._runs, return_exceptions=True)
