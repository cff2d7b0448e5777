"""A running job's spend passed to its chunk as it grows (`finish_job`, under a budget)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from temporalio import activity

from activities.machine_collect import _attempt_key
from activities.machine_models import FinishJobInput, Spend
from sortie.store import ObjectStore, spend_key


@asynccontextmanager
async def watching_spend(
    store: ObjectStore, input: FinishJobInput, seen: dict[str, Any]
) -> AsyncIterator[None]:
    """While the block runs, pass what the job's verify loop spent to its chunk as it grows,
    so the batch's budget counts every turn when it happens, not when the job ends."""
    index, chunk_id = input.collect.spend_of, activity.info().workflow_id
    if index is None or chunk_id is None:
        yield
        return
    key = spend_key(*_attempt_key(input.collect))
    chunk = activity.client().get_workflow_handle(chunk_id)

    async def watch() -> None:
        told = 0.0
        while True:
            await asyncio.sleep(input.wait.heartbeat_every_s)
            try:
                payload = await store.get(key)
                if payload is None:
                    continue
                spent = json.loads(payload)
                spend = Spend(
                    index=index,
                    attempt=input.collect.attempt,
                    cost_usd=float(spent.get("cost_usd") or 0.0),
                    num_turns=int(spent.get("num_turns") or 0),
                )
                if spend.cost_usd <= told:
                    continue
                await chunk.signal("spent", spend)
                told = seen["spent_usd"] = spend.cost_usd
            except asyncio.CancelledError:
                raise
            except Exception as error:  # best effort: the final report is the truth
                job = input.collect.job_id
                activity.logger.warning("spend of job %s not passed on: %s", job, error)

    watching = asyncio.create_task(watch())
    try:
        yield
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
