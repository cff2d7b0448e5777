"""Prometheus metrics: scraped over HTTP during a batch, checked against localfly's counts."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from activities.machine_models import CollectResultOutput, JobAnswer
from activities.metrics import SortieMetrics, metrics_runtime
from client import batches
from client.stack import free_port
from fly import FlyEvent
from sortie.reaper_models import ReapOutput
from sortie.spec import DEFAULT_IMAGE, parse_batch
from tests.helpers.batches import settings_for
from tests.helpers.processes import WorkerProcess
from tests.helpers.waiting import eventually

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the series called `name` whose labels include `labels`."""
    found = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match or match["name"] != name:
            continue
        have = dict(LABEL.findall(match["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(match["value"]))
    return found


def total(text: str, name: str, **labels: str) -> float:
    return sum(samples(text, name, **labels))


async def test_fly_events_become_series_by_app_batch_and_status() -> None:
    port = free_port()
    runtime = metrics_runtime({"SORTIE_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    assert runtime is not None and metrics_runtime({}) is None
    metrics = SortieMetrics(runtime.metric_meter)
    meta = {"sortie_batch": "batch-a"}
    for machine in ("m1", "m2", "m3"):
        metrics.observe_fly(FlyEvent("call", "create", "app-1", 200))
        metrics.observe_fly(FlyEvent("created", "create", "app-1", 200, machine, meta))
    metrics.observe_fly(FlyEvent("call", "create", "app-1", 429))
    metrics.observe_fly(FlyEvent("call", "wait", "app-1", None))
    metrics.observe_fly(FlyEvent("destroyed", "destroy", "app-1", 200, "m1"))
    metrics.observe_fly(FlyEvent("destroyed", "destroy", "app-1", 404, "m2"))
    metrics.credential_rested("CLAUDE_CODE_OAUTH_TOKEN_2")
    answer = JobAnswer(cost_usd=0.25, num_turns=3)
    metrics.activity_done(
        "finish_job",
        2,
        CollectResultOutput(state="stopped", exit_code=0, answer=answer),
        "batch-a",
    )
    metrics.activity_done(
        "finish_job", 1, CollectResultOutput(state="stopped", exit_code=0, answer=answer)
    )
    metrics.activity_done(
        "reap_orphans", 1, ReapOutput(app="app-1", checked=2, orphans=[], destroyed=2)
    )
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    assert total(text, "sortie_fly_calls", action="create", status="200") == 3
    assert total(text, "sortie_fly_calls", action="create", status="429", app="app-1") == 1
    assert total(text, "sortie_fly_calls", action="wait", status="error") == 1
    assert total(text, "sortie_machines_created", batch="batch-a", app="app-1") == 3
    assert total(text, "sortie_machines_destroyed", batch="batch-a") == 1, "404: was gone"
    assert samples(text, "sortie_machines_alive", batch="batch-a") == [1]
    assert total(text, "sortie_credential_rests", credential="CLAUDE_CODE_OAUTH_TOKEN_2") == 1
    assert total(text, "sortie_activity_retries", activity="finish_job") == 1
    assert total(text, "sortie_claude_cost_usd_sum") == 0.5
    assert total(text, "sortie_claude_cost_usd_sum", batch="batch-a") == 0.25
    assert total(text, "sortie_claude_turns_sum") == 6
    assert total(text, "sortie_reaper_destroyed", app="app-1") == 2


@pytest.mark.slow
async def test_a_scrape_during_a_100_job_batch_agrees_with_localfly(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    address = f"127.0.0.1:{free_port()}"
    env = {
        "SORTIE_METRICS_ADDRESS": address,
        "SORTIE_REAPER": "off",
        "CLAUDE_CODE_OAUTH_TOKEN": f"sk-ant-oat01-{uuid.uuid4().hex}",
    }
    worker = WorkerProcess(settings, localfly.url, tmp_path / "worker.log", env=env).start()
    cap = 10
    spec = parse_batch(
        {
            "name": f"m{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "max_machines": cap,
            "defaults": {"image": "alpine", "timeout": "1m"},
            "jobs": [
                # One Claude job (the stand-in answers with the cost it is told), 99 commands.
                {"id": "job-0", "prompt": "Review [[cost:0.5]]", "image": DEFAULT_IMAGE},
                *({"id": f"job-{i}", "command": "sleep 0.2"} for i in range(1, 100)),
            ],
        }
    )
    url = f"http://{address}/metrics"
    alive_seen: list[float] = []
    try:
        async with httpx.AsyncClient() as http:

            async def scrape() -> str:
                try:
                    return (await http.get(url)).text
                except httpx.TransportError:
                    return ""

            await eventually(scrape, what="the worker's /metrics")
            submitted = await batches.submit(temporal.client, settings, spec)
            result = asyncio.ensure_future(
                batches.batch_handle(temporal.client, submitted.batch_id).result()
            )
            deadline = time.monotonic() + 240
            curled = ""
            while not result.done():
                assert time.monotonic() < deadline, "the batch did not finish in time"
                text = await scrape()
                alive_seen.append(total(text, "sortie_machines_alive", app=app_name))
                if alive_seen[-1] and not curled:  # what an operator types, mid-batch
                    curled = await _curl(url)
                await asyncio.wait({result}, timeout=0.2)
            await result
            stats = localfly.stats(app_name)
            made = len(localfly.machines(app_name))

            def settled(text: str) -> bool:
                return total(text, "sortie_machines_destroyed", app=app_name) == made

            final = await eventually(lambda: _when(scrape(), settled), what="every destroy counted")
    finally:
        worker.stop()
    assert 0 < max(alive_seen) <= stats["max_live_machines"] <= cap, alive_seen
    assert 0 < total(curled, "sortie_machines_alive", app=app_name) <= cap
    assert 0 < total(curled, "sortie_machines_created", app=app_name) < 100, "mid-batch"
    assert total(final, "sortie_machines_created", app=app_name) == made == 100
    assert total(final, "sortie_machines_created", batch=submitted.batch_id) == 100
    assert total(final, "sortie_machines_alive", app=app_name) == 0
    # Jobs by state, counted by the chunks (a workflow's metrics, never counted on replay).
    batch = submitted.batch_id
    assert total(final, "sortie_jobs_started", batch=batch) == 100
    assert total(final, "sortie_jobs_finished", batch=batch, state="succeeded") == 100
    assert 0 < total(curled, "sortie_jobs_started", batch=batch) < 100, "mid-batch"
    calls = {
        action: total(final, "sortie_fly_calls", app=app_name, action=action)
        for action in stats["calls"]
    }
    assert calls == {action: float(n) for action, n in stats["calls"].items()}, stats
    assert total(final, "sortie_claude_cost_usd_sum", batch=submitted.batch_id) == 0.5
    assert total(final, "sortie_claude_cost_usd_count", batch=submitted.batch_id) == 1
    for status, n in stats["statuses"].items():
        assert total(final, "sortie_fly_calls", app=app_name, status=status) == n
    assert samples(final, "temporal_worker_task_slots_available"), "the SDK's own metrics too"


async def _when(text: Any, check: Any) -> str | None:
    value: str = await text
    return value if check(value) else None


async def _curl(url: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sf", url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    return out.decode()
