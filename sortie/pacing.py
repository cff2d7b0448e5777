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

import math

from temporalio.common import Priority

APPS_MEMO = "fly_apps"
"""The memo of a batch (and of a follow-up turn) naming the Fly apps it creates machines in."""
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


def apps_query(task_queue: str) -> str:
    """Visibility query for the running batches and follow-up turns of a task queue."""
    return (
        f'TaskQueue="{task_queue}" AND ExecutionStatus="Running" AND ParentWorkflowId IS NULL '
        'AND WorkflowType IN ("BatchWorkflow", "ChunkWorkflow")'
    )
