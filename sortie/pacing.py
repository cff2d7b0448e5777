"""Machine creates paced for all workers together: one task queue and one pacer per Fly app.

Fly allows each app about one create a second (bursts of 3). A limiter in each worker would let
N workers send N times that, so creates run as activities on `<task-queue>.fly.<app>`, and every
create task there first takes its turn from the app's CreatePacerWorkflow (workflows/pacer.py),
one token bucket kept in Temporal for every worker: it answers how long to wait, the task waits,
then calls Fly. This holds on any Temporal server with default settings (the dev server, Cloud):
a rate limit set on the queue is split among its partitions and came out in clumps.

While paced, a worker runs only a few of an app's creates at once (`creates_at_once`): the rest
wait in Temporal's queue, where priority orders them on any server and fairness between batches
(the fairness key) on a server with fairness switched on.

A worker polls an app's queue once it knows the app is in use: the apps it is configured with
(FLY_APP, SORTIE_FLY_APPS), the apps of a batch it checked at submit, and every DISCOVER_EVERY
the apps of the batches and follow-ups running on its queue (their `fly_apps` memo).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import Priority, WorkflowIDConflictPolicy
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
    WorkerDeploymentConfig,
)

from workflows.pacer import CreatePacerWorkflow, PacerState, ReserveCreates

log = logging.getLogger("sortie.pacing")

APPS_MEMO = "fly_apps"
"""The memo of a batch (and of a follow-up turn) naming the Fly apps it creates machines in."""
DISCOVER_EVERY = 5.0
"""Seconds between two looks for apps in use that this worker does not poll yet."""
CREATES_AT_ONCE = 200
"""Creates one worker runs at once on an app's unpaced queue: each is one short Fly call, and
200 machines' first creates come at once. At 20, 10,000 jobs of 1 s on 200 localfly machines
took 400 s instead of 279 s (docs/benchmarks.md)."""
CREATE_BURST = 2
"""Creates a pacer lets go at once: Fly allows bursts of 3, and the token left unused absorbs
the jitter between when a worker sends and when Fly sees a request arrive."""
TURNS_AHEAD_S = 2.0
"""How far ahead one worker takes an app's turns: it runs rate x this + burst of the app's
creates at once (4 at 1/s), and leaves the rest in Temporal's queue, ordered by priority and
fairness. One worker alone keeps the pace while a Fly create call takes under 4 s."""


def batch_priority(priority: int, batch_id: str) -> Priority:
    """How a batch's work is ordered on the shared workers' queues: its priority (1 first, 5
    last), then a fair share per batch (its id as the fairness key), whoever submitted first.

    Set on the batch and its chunks; their activities (creates included) inherit it.
    """
    return Priority(priority_key=priority, fairness_key=batch_id)


def create_queue(task_queue: str, app: str) -> str:
    """The task queue of an app's creates: `<task-queue>.fly.<app>`."""
    return f"{task_queue}.fly.{app}"


def pacer_workflow_id(task_queue: str, app: str) -> str:
    """The id of the pacer of an app's creates on a task queue."""
    return f"sortie-pacer-{create_queue(task_queue, app)}"


def creates_at_once(rate: float | None) -> int:
    """Creates one worker runs at once on an app's queue, paced at `rate` (None: unpaced)."""
    return CREATES_AT_ONCE if rate is None else math.ceil(rate * TURNS_AHEAD_S) + CREATE_BURST


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
                CreatePacerWorkflow.reserve,
                ReserveCreates(count=len(asking), rate=self.rate, burst=CREATE_BURST),
                start_workflow_operation=self._start(),
            )
        except BaseException:  # this create fails (Temporal retries it); the others ask again
            self._waiting[:0] = [t for t in asking if t is not mine and not t.done()]
            raise
        now = asyncio.get_running_loop().time()
        for ticket, wait in zip(asking, turns.waits_s, strict=True):
            if not ticket.done():
                ticket.set_result(now + wait)

    def _start(self) -> WithStartWorkflowOperation[CreatePacerWorkflow, None]:
        """Start the app's pacer if it is not running (an update then reaches it at once)."""
        return WithStartWorkflowOperation(
            CreatePacerWorkflow.run,
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
