"""A batch tells its webhook of its end and its pauses: signed POSTs, one delivery per event,
also when the worker is SIGKILLed while it POSTs.

The receiver is tests/helpers/webhook.py on loopback; the signing key and the URL's secret
part are worker secrets, and the test looks for them in the batch's history and the worker's log.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from client import batches
from sortie.spec import parse_batch
from tests.helpers.batches import TUNING, settings_for, spec_for
from tests.helpers.history import decoded_payloads
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import Sortie
from tests.helpers.waiting import eventually
from tests.helpers.webhook import WebhookReceiver
from workflows.batch import BatchWorkflow

SIGNING_KEY = f"whsec-{uuid.uuid4().hex}"
HOOK_PATH = f"T0-B1-{uuid.uuid4().hex}"
SECRETS = {"HOOK_KEY": SIGNING_KEY, "HOOK_PATH": HOOK_PATH}


def notify(receiver: WebhookReceiver, **fields: Any) -> dict[str, Any]:
    return {"url": f"{receiver.url}/hooks/${{HOOK_PATH}}", "secret": "HOOK_KEY", **fields}


@pytest.mark.parametrize("worker_env", [SECRETS], indirect=True)
async def test_a_batch_tells_its_webhook_of_a_pause_and_its_end_signed_once_each(
    sortie: Sortie, app_name: str
) -> None:
    receiver = await WebhookReceiver().start()
    try:
        spec = parse_batch(
            {
                "name": f"n{uuid.uuid4().hex[:8]}",
                "app": app_name,
                "max_machines": 1,
                "defaults": {"image": "alpine", "timeout": "1m", "retries": 0},
                "notify": notify(receiver),
                "jobs": [
                    {"id": "fine", "command": "sleep 1"},
                    {"id": "broken", "command": "echo no such thing; exit 3"},
                    {"id": "also-fine", "command": "true"},
                ],
            }
        )
        submitted = await batches.submit(sortie.client, sortie.settings, spec, tuning=TUNING)
        handle = batches.batch_handle(sortie.client, submitted.batch_id)
        await handle.signal(BatchWorkflow.pause)
        await eventually(lambda: receiver.delivered("paused"), what="the paused POST")
        await handle.signal(BatchWorkflow.resume)
        await handle.result()
        await eventually(lambda: receiver.delivered("completed"), what="the completed POST")
    finally:
        await receiver.stop()

    batch_id = submitted.batch_id
    [paused] = receiver.arrived("paused")
    [completed] = receiver.arrived("completed")
    assert len(receiver.posts) == 2, [p.event for p in receiver.posts]
    for post in (paused, completed):
        assert post.signed_by(SIGNING_KEY), post.headers
        assert post.path == f"/hooks/{HOOK_PATH}", "the URL's secret part put in on the worker"
    assert paused.headers["Sortie-Delivery"] == f"{batch_id}/paused-1"
    assert completed.headers["Sortie-Delivery"] == f"{batch_id}/completed"
    document = completed.document
    assert (document["event"], document["batch_id"], document["name"]) == (
        "completed",
        batch_id,
        spec.name,
    )
    assert document["counts"] == {
        "total": 3,
        "pending": 0,
        "running": 0,
        "succeeded": 2,
        "failed": 1,
        "timed_out": 0,
        "cancelled": 0,
    }
    [cause] = document["causes"]
    assert cause["count"] == 1 and cause["jobs"] == ["broken"], cause
    assert document["url"] == sortie.settings.workflow_url(batch_id)
    assert "paused" in (paused.document["reason"] or "")

    raw = (await handle.fetch_history()).to_json_dict()
    history = json.dumps(raw) + "\n".join(decoded_payloads(raw))
    assert "${HOOK_PATH}" in history, "the URL's template is in history"
    assert HOOK_PATH not in history and SIGNING_KEY not in history


@pytest.mark.slow
async def test_one_completed_delivery_when_the_worker_is_killed_while_it_posts(
    temporal: WorkflowEnvironment, localfly: Any, app_name: str, tmp_path: Path
) -> None:
    settings = settings_for(temporal.client.service_client.config.target_host)
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    first = WorkerProcess(settings, localfly.url, logs[0], env=SECRETS).start()
    second = WorkerProcess(settings, localfly.url, logs[1], env=SECRETS)
    receiver = await WebhookReceiver(hold="completed").start()
    try:
        raw = spec_for(app_name).model_dump(mode="json", exclude_none=True)
        spec = parse_batch({**raw, "notify": notify(receiver, events=["completed"])})
        submitted = await batches.submit(temporal.client, settings, spec, tuning=TUNING)
        await eventually(lambda: receiver.arrived("completed"), timeout=90, what="the POST")
        first.kill()  # as the batch ends: its POST is in flight, unanswered
        await eventually(receiver.held_sender_gone, what="the killed worker's connection to end")
        receiver.release()
        second.start()
        await batches.batch_handle(temporal.client, submitted.batch_id).result()
    finally:
        first.stop()
        second.stop()
        await receiver.stop()

    tries = receiver.arrived("completed")
    assert len(tries) == 2, "the POST the kill cut off, then its retry"
    [delivered] = receiver.delivered("completed")
    assert delivered is tries[1] and delivered.signed_by(SIGNING_KEY)
    assert {p.headers["Sortie-Delivery"] for p in tries} == {f"{submitted.batch_id}/completed"}
    assert tries[0].body == tries[1].body, "every try of an event says the same"
    counts = delivered.document["counts"]
    assert (counts["total"], counts["succeeded"]) == (len(spec.jobs), len(spec.jobs))
    for log in logs:
        text = log.read_text()
        assert HOOK_PATH not in text and SIGNING_KEY not in text
