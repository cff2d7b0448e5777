"""The worker's side of the create pacing: each app's create queue polled, each create waiting
its turn from the app's pacer workflow (the rules both sides share: sortie/pacing.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from temporalio.api.deployment.v1 import WorkerDeploymentVersion
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.workflowservice.v1 import DescribeWorkerDeploymentVersionRequest
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    PollerBehaviorAutoscaling,
    Worker,
    WorkerDeploymentConfig,
)

from activities.pacer_models import PACER_WORKFLOW, RESERVE, CreateTurns, PacerState, ReserveCreates
from sortie.pacing import (
    APPS_MEMO,
    CREATE_BURST,
    apps_query,
    create_queue,
    creates_at_once,
    pacer_workflow_id,
)

log = logging.getLogger("sortie.pacing")

DISCOVER_EVERY = 5.0
"""Seconds between two looks for apps in use that this worker does not poll yet."""

JOIN_VERSION_S = 15.0
"""With Worker Versioning, how long a new create queue is waited for to join this build's version
before the batch goes on (its creates then wait on the server until the queue has joined)."""

JOIN_POLL_S = 0.2
"""Seconds between two looks at the version's task queues while waiting for a queue to join."""


class AppPacer:
    """This worker's side of an app's pacer: takes turns for its creates, several in one ask."""

    def __init__(self, client: Client, task_queue: str, app: str, rate: float) -> None:
        self._client = client
        self._task_queue = task_queue
        self.app = app
        self.rate = rate
        self._asking = asyncio.Lock()
        self._waiting: list[asyncio.Future[float]] = []

    async def turn(self) -> None:
        """Wait until one more create in the app may go."""
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[float] = loop.create_future()
        self._waiting.append(ticket)
        try:
            async with self._asking:  # one ask in flight; creates that come meanwhile share it
                if not ticket.done():
                    await self._ask(ticket)
        except asyncio.CancelledError:  # cancelled before its turn was asked for: ask none
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            raise
        await asyncio.sleep(max(0.0, ticket.result() - loop.time()))

    async def _ask(self, mine: asyncio.Future[float]) -> None:
        """Reserve a turn for every create waiting; on failure the others ask again."""
        asking, self._waiting = self._waiting, []
        try:
            turns = await self._client.execute_update_with_start_workflow(
                RESERVE,
                ReserveCreates(count=len(asking), rate=self.rate, burst=CREATE_BURST),
                start_workflow_operation=self._start(),
                result_type=CreateTurns,
            )
        except BaseException:  # this create fails (Temporal retries it); the others ask again
            self._waiting[:0] = [t for t in asking if t is not mine and not t.done()]
            raise
        now = asyncio.get_running_loop().time()
        for ticket, wait in zip(asking, turns.waits_s, strict=True):
            if not ticket.done():
                ticket.set_result(now + wait)

    def _start(self) -> WithStartWorkflowOperation[Any, Any]:
        """Start the app's pacer if it is not running (an update then reaches it at once)."""
        return WithStartWorkflowOperation(
            PACER_WORKFLOW,
            PacerState(),
            id=pacer_workflow_id(self._task_queue, self.app),
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"create turns in Fly app {self.app} for every worker",
        )


class _TakeTurns(Interceptor):
    """Every task of an app's create queue waits its turn from the app's pacer, then runs."""

    def __init__(self, pacer: AppPacer) -> None:
        self._pacer = pacer

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TurnThenRun(next, self._pacer)


class _TurnThenRun(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, pacer: AppPacer) -> None:
        super().__init__(next)
        self._pacer = pacer

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        await self._pacer.turn()
        return await super().execute_activity(input)


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
        interceptors = list(self._interceptors)
        if self._rate is not None:
            interceptors.append(
                _TakeTurns(AppPacer(self._client, self._task_queue, app, self._rate))
            )
        worker = Worker(
            self._client,
            task_queue=create_queue(self._task_queue, app),
            activities=[self._create],
            max_concurrent_activities=creates_at_once(self._rate),
            # As on the main queue: five fixed pollers left a create 0.9 s at the median
            # between its schedule and its start when hundreds wait.
            activity_task_poller_behavior=PollerBehaviorAutoscaling(),
            deployment_config=self._deployment,
            interceptors=interceptors,
        )
        self._workers[app] = worker
        self._runs.append(asyncio.create_task(self._run(app, worker)))
        if self._rate is None:
            log.info("polling %s for creates in Fly app %s (unpaced)", worker.task_queue, app)
        else:
            log.info(
                "polling %s for creates in Fly app %s: paced by workflow %s to %g/s, "
                "bursts of %d, for every worker",
                worker.task_queue,
                app,
                pacer_workflow_id(self._task_queue, app),
                self._rate,
                CREATE_BURST,
            )
        if self._deployment is not None and self._deployment.use_worker_versioning:
            await self._joined(worker.task_queue)
        for observer in self.on_new_app:
            try:
                await observer(app)
            except Exception:  # logged; an observer that must not fail retries itself
                log.exception("observer of new app %s failed", app)

    async def _joined(self, queue: str) -> None:
        """Wait until the server lists `queue` in this build's version.

        A pinned batch's create on a queue its version does not have yet goes to that queue's
        unversioned backlog, which no versioned worker polls, until the server takes the queue
        into the version; waiting here (the batch's check calls `serve`) sends its creates straight
        to this build.
        """
        assert self._deployment is not None
        version = self._deployment.version
        request = DescribeWorkerDeploymentVersionRequest(
            namespace=self._client.namespace,
            deployment_version=WorkerDeploymentVersion(
                deployment_name=version.deployment_name, build_id=version.build_id
            ),
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOIN_VERSION_S
        while loop.time() < deadline:
            try:
                described = await self._client.workflow_service.describe_worker_deployment_version(
                    request
                )
            except RPCError as error:  # not known yet (no poll reached the server): look again
                log.debug("version %s not described yet: %s", version, error)
            else:
                queues = described.worker_deployment_version_info.task_queue_infos
                if any(
                    q.name == queue and q.type == TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
                    for q in queues
                ):
                    log.info("%s joined version %s", queue, version.to_canonical_string())
                    return
            await asyncio.sleep(JOIN_POLL_S)
        log.warning(
            "%s has not joined version %s after %gs; its creates wait on the server until it has",
            queue,
            version.to_canonical_string(),
            JOIN_VERSION_S,
        )

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
