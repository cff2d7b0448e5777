"""Reading what a workflow's exported history holds, payloads decoded."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterable
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory


def decoded_payloads(node: object) -> list[str]:
    """Every base64 `data` field of every payload, decoded."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    found.append(base64.b64decode(value).decode(errors="replace"))
            found.extend(decoded_payloads(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(decoded_payloads(item))
    return found


def payload_sizes(message: Any) -> list[int]:
    """The size of every payload (an input or a result) a history event holds, at any depth."""
    sizes: list[int] = []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        for item in items:
            if field.message_type.name == "Payload":
                sizes.append(item.ByteSize())
            elif hasattr(item, "ListFields"):
                sizes.extend(payload_sizes(item))
    return sizes


def chunk_end_sizes(events: Iterable[HistoryEvent]) -> list[int]:
    """The bytes each chunk's end brought into a batch run: the child's result, or its share of
    a `watch_chunks` result (a later run hears the chunks it inherited that way). A run that
    continues-as-new before it applied a child's result hands that chunk on as running, so its
    end can be heard both ways (the batch records it once)."""
    events = list(events)
    watches = {
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "watch_chunks"
    }
    sizes: list[int] = []
    for e in events:
        if e.event_type == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED:
            sizes.extend(payload_sizes(e))
        elif (
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            and e.activity_task_completed_event_attributes.scheduled_event_id in watches
        ):
            for payload in e.activity_task_completed_event_attributes.result.payloads:
                if ends := len(json.loads(payload.data)):
                    sizes.extend([payload.ByteSize() // ends] * ends)
    return sizes


async def largest_payload(client: Client, query: str) -> tuple[int, int]:
    """The largest payload in the history of every run the visibility query lists, and how
    many runs there were."""
    largest = runs = 0
    async for execution in client.list_workflows(query):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        async for event in handle.fetch_history_events():
            largest = max([largest, *payload_sizes(event)])
        runs += 1
    return largest, runs


def assert_no_create_while_paused(history: WorkflowHistory) -> None:
    """A chunk scheduled no `create_machine` between a `pause` signal and the next `resume`."""
    paused = False
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            name = event.workflow_execution_signaled_event_attributes.signal_name
            paused = {"pause": True, "resume": False}.get(name, paused)
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            kind = event.activity_task_scheduled_event_attributes.activity_type.name
            assert not (paused and kind == "create_machine"), "created a machine while paused"


async def every_run(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """The history of every run of a workflow (a batch continues-as-new)."""
    return [
        await client.get_workflow_handle(workflow_id, run_id=e.run_id).fetch_history()
        async for e in client.list_workflows(f'WorkflowId="{workflow_id}"')
    ]


async def signal_handled(handle: Any, name: str) -> bool:
    """Whether the run's newest `name` signal was handled: a workflow task completed after it,
    so a query now reads the state that signal left."""
    signaled = None
    async for event in handle.fetch_history_events():
        if (
            event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            and event.workflow_execution_signaled_event_attributes.signal_name == name
        ):
            signaled = event.event_id
        elif (
            event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
            and signaled is not None
            and event.event_id > signaled
        ):
            return True
    return False
