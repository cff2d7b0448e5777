"""Prometheus metrics at SORTIE_METRICS_ADDRESS: the Temporal SDK's own and Sortie's.

Both go out through the SDK's runtime (`PrometheusConfig`): one endpoint, `/metrics`, one
exporter. Sortie's come from what the worker itself sees, so they need no workflow change:

- `sortie_fly_calls{action,status,app}`: every Machines API call by endpoint and HTTP status
  (`429` is Fly refusing for rate; `error` a transport failure);
- `sortie_machines_created`, `sortie_machines_destroyed{app,batch}` and the gauge
  `sortie_machines_alive{app,batch}` (machines this worker created and has not destroyed);
- `sortie_activity_retries{activity}`: activity attempts after the first;
- `sortie_claude_cost_usd` and `sortie_claude_turns{batch}`: histograms of Claude's answers
  (their `_sum` is the money spent and the turns taken);
- `sortie_credential_rests{credential}` (by name, never value) and `sortie_reaper_destroyed{app}`.

- `sortie_jobs_started{batch}` and `sortie_jobs_finished{batch,state}`: counted by the chunk
  workflows themselves (a workflow's metrics, which replays never count again); started minus
  finished is what runs now.

The batch label stays bounded: machine counts, jobs and Claude's answers carry it, a few series
per batch the worker ran.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from temporalio import activity
from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from activities.logs import ids_of, models_within
from fly import FlyEvent
from sortie.labels import META_BATCH

ADDRESS_VARIABLE = "SORTIE_METRICS_ADDRESS"
JOBS_STARTED = "sortie_jobs_started"
JOBS_FINISHED = "sortie_jobs_finished"
"""Counted by the chunk workflows (workflows/chunk.py), through the workflow's metric meter."""


def metrics_runtime(environ: Mapping[str, str]) -> Runtime | None:
    """A runtime exporting Prometheus metrics at SORTIE_METRICS_ADDRESS, None when unset."""
    address = environ.get(ADDRESS_VARIABLE, "").strip()
    if not address:
        return None
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=address)))


class SortieMetrics:
    """Sortie's own instruments on the runtime's meter; fed by the Fly client and activities."""

    def __init__(self, meter: MetricMeter) -> None:
        self.fly_calls = meter.create_counter(
            "sortie_fly_calls", "Fly Machines API calls by endpoint and status"
        )
        self.created = meter.create_counter("sortie_machines_created", "machines created")
        self.destroyed = meter.create_counter("sortie_machines_destroyed", "machines destroyed")
        self.alive = meter.create_gauge(
            "sortie_machines_alive", "machines this worker created and has not destroyed yet"
        )
        self.retries = meter.create_counter(
            "sortie_activity_retries", "activity attempts after the first"
        )
        self.cost = meter.create_histogram_float(
            "sortie_claude_cost_usd", "cost of each Claude answer", "USD"
        )
        self.turns = meter.create_histogram("sortie_claude_turns", "turns of each Claude answer")
        self.rests = meter.create_counter(
            "sortie_credential_rests", "Claude credentials set aside after a 429 or auth error"
        )
        self.reaped = meter.create_counter(
            "sortie_reaper_destroyed", "orphaned machines the reaper destroyed"
        )
        self._batch_of: dict[str, tuple[str, str]] = {}
        self._alive: Counter[tuple[str, str]] = Counter()

    def observe_fly(self, event: FlyEvent) -> None:
        """A Fly observer: count the call, and track machines made and destroyed."""
        if event.kind == "call":
            status = "error" if event.status is None else str(event.status)
            self.fly_calls.add(1, {"action": event.action, "status": status, "app": event.app})
        elif event.kind == "created" and event.machine_id:
            key = (event.app, event.metadata.get(META_BATCH, ""))
            self._batch_of[event.machine_id] = key
            self.created.add(1, {"app": key[0], "batch": key[1]})
            self._alive[key] += 1
            self.alive.set(self._alive[key], {"app": key[0], "batch": key[1]})
        elif event.kind == "destroyed" and event.machine_id:
            known = self._batch_of.pop(event.machine_id, None)
            if event.status == 200:
                app, batch = known or (event.app, "")
                self.destroyed.add(1, {"app": app, "batch": batch})
            if known is not None:
                self._alive[known] -= 1
                self.alive.set(self._alive[known], {"app": known[0], "batch": known[1]})

    def credential_rested(self, name: str) -> None:
        """A Claude pool observer: one rest of the named credential."""
        self.rests.add(1, {"credential": name})

    def activity_done(
        self, activity_type: str, attempt: int, result: object, batch: str = ""
    ) -> None:
        """Count a retry, and the cost and turns of any Claude answer in the result."""
        if attempt > 1:
            self.retries.add(1, {"activity": activity_type})
        if activity_type == "reap_orphans":
            destroyed, app = getattr(result, "destroyed", 0), getattr(result, "app", "")
            if isinstance(destroyed, int) and destroyed:
                self.reaped.add(destroyed, {"app": str(app)})
        for answer in _answers(result):
            self.cost.record(float(answer.cost_usd), {"batch": batch})
            self.turns.record(int(answer.num_turns), {"batch": batch})


def _answers(value: object, depth: int = 3) -> list[Any]:
    """Models with `cost_usd` and `num_turns` (Claude's answers) anywhere in a result."""
    return [
        item
        for item in models_within(value, depth)
        if {"cost_usd", "num_turns"} <= type(item).model_fields.keys()
    ]


class _MetricsActivity(ActivityInboundInterceptor):
    """Reports each completed activity to the metrics."""

    def __init__(self, next: ActivityInboundInterceptor, metrics: SortieMetrics) -> None:
        super().__init__(next)
        self._metrics = metrics

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        """Run the activity, then count what it did."""
        info = activity.info()
        batch = next((str(b) for a in input.args if (b := ids_of(a).get("batch_id"))), "")
        try:
            result = await self.next.execute_activity(input)
        except BaseException:  # counted, then raised as it came
            self._metrics.activity_done(info.activity_type, info.attempt, None)
            raise
        self._metrics.activity_done(info.activity_type, info.attempt, result, batch)
        return result


class MetricsInterceptor(Interceptor):
    """The worker interceptor feeding `SortieMetrics` from activities."""

    def __init__(self, metrics: SortieMetrics) -> None:
        self._metrics = metrics

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap every activity."""
        return _MetricsActivity(next, self._metrics)
