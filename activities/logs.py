"""The worker's logs: plain text, or with SORTIE_LOG_FORMAT=json one JSON object per line.

Each JSON line names what it is about: the batch, chunk, job, machine and job attempt, taken
from the running activity's input (a worker interceptor puts them in a context variable, so the
Fly client's lines inside an activity carry them too) and from Temporal's own logger context
(workflow id, run id, activity type and attempt); a machine's id joins once the Fly client
reports it created (`note_machine`). Known secret values and presigned URLs are scrubbed from
every line, in either format.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from activities.secrets import REDACTED, redact_presigned
from fly import FlyEvent
from sortie.labels import META_ATTEMPT, META_BATCH, META_CHUNK, META_JOB

FORMAT_VARIABLE = "SORTIE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
SECRET_NAME = re.compile(r"TOKEN|API_KEY|SECRET|PASSWORD|SORTIE_CODEC_AUTH")
"""Variables whose values never reach a log line: Fly's, Temporal's and Claude's credentials,
and the tokens batches name as secrets (GITHUB_TOKEN, ...); encryption keys are added apart."""

_CHUNK_ID = re.compile(r"^(?P<batch>.+)-chunk-(?P<chunk>\d+)$")
_FIELDS = {
    "batch_id": "batch_id",
    "chunk_index": "chunk",
    "job_id": "job_id",
    "machine_id": "machine_id",
    "attempt": "attempt",
}
"""Input model fields, at any depth, and the log field each one fills (the shallowest wins)."""

log_context: contextvars.ContextVar[Mapping[str, object] | None] = contextvars.ContextVar(
    "sortie_log_context", default=None
)


def models_within(value: object, depth: int = 3) -> Iterator[BaseModel]:
    """`value` and the models in its fields, level by level, `depth` levels deep."""
    level = [value]
    for _ in range(depth):
        deeper: list[object] = []
        for item in level:
            if isinstance(item, BaseModel):
                yield item
                deeper.extend(getattr(item, name) for name in type(item).model_fields)
        level = deeper


def ids_of(value: object, depth: int = 3) -> dict[str, object]:
    """Batch, chunk, job, machine and attempt ids found in an activity's input models."""
    found: dict[str, object] = {}
    for item in models_within(value, depth):
        for name in type(item).model_fields:
            field = getattr(item, name)
            target = _FIELDS.get(name)
            if target and target not in found and isinstance(field, str | int):
                found[target] = field
            elif name == "job" and "job_id" not in found and isinstance(field, BaseModel):
                job_id = getattr(field, "id", None)
                if isinstance(job_id, str):
                    found["job_id"] = job_id
    return found


class _LogContextActivity(ActivityInboundInterceptor):
    """Sets the log context from the activity's input for the duration of the activity."""

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        """Run the activity with its ids in the log context."""
        ids: dict[str, object] = {}
        for arg in input.args:
            ids.update({k: v for k, v in ids_of(arg).items() if k not in ids})
        token = log_context.set(ids)
        try:
            return await self.next.execute_activity(input)
        finally:
            log_context.reset(token)


class LogContextInterceptor(Interceptor):
    """The worker interceptor that gives activity log lines their batch, job and machine ids."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap every activity."""
        return _LogContextActivity(next)


def note_machine(event: FlyEvent) -> None:
    """A Fly observer: once an activity created its machine, its later lines name the machine."""
    context = log_context.get()
    if event.kind != "created" or not event.machine_id or context is None:
        return
    # The machine's own labels win: a finishing job's activity may create the next job's machine.
    meta = event.metadata
    labelled: dict[str, object] = {"machine_id": event.machine_id}
    for key, field in ((META_BATCH, "batch_id"), (META_JOB, "job_id")):
        if meta.get(key):
            labelled[field] = meta[key]
    for key, field in ((META_CHUNK, "chunk"), (META_ATTEMPT, "attempt")):
        if meta.get(key, "").isdigit():
            labelled[field] = int(meta[key])
    log_context.set({**context, **labelled})


def _temporal_ids(record: logging.LogRecord) -> dict[str, object]:
    """Workflow and activity ids from the extras Temporal's loggers put on a record."""
    ids: dict[str, object] = {}
    context = getattr(record, "temporal_activity", None) or getattr(
        record, "temporal_workflow", None
    )
    if not isinstance(context, Mapping):
        return ids
    workflow_id = context.get("workflow_id")
    if isinstance(workflow_id, str):
        ids["workflow_id"] = workflow_id
        chunk = _CHUNK_ID.match(workflow_id)
        if chunk:
            ids["batch_id"], ids["chunk"] = chunk["batch"], int(chunk["chunk"])
        elif context.get("workflow_type") == "BatchWorkflow":
            ids["batch_id"] = workflow_id
    for key, field in (
        ("workflow_run_id", "run_id"),
        ("run_id", "run_id"),
        ("activity_type", "activity"),
        ("workflow_type", "workflow_type"),
    ):
        if context.get(key):
            ids[field] = context[key]
    if "activity_type" in context and context.get("attempt"):
        ids["activity_attempt"] = context["attempt"]
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the ids it concerns."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_temporal_ids(record))
        line.update(log_context.get() or {})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class ScrubFilter(logging.Filter):
    """Replaces known secret values in a record's message and arguments before it is written."""

    def __init__(self, scrub: Callable[[str], str]) -> None:
        super().__init__()
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the message once, scrubbed; keep the record."""
        message = record.getMessage()
        clean = self._scrub(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, self._scrub(text)
        return True


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values to scrub, longest first: credentials, tokens and encryption keys."""
    values = [v for name, v in environ.items() if SECRET_NAME.search(name)]
    keys = environ.get("SORTIE_ENCRYPTION_KEYS", "")
    values += [entry.partition(":")[2] for entry in keys.split(",")]
    return sorted({v.strip() for v in values if len(v.strip()) >= 4}, key=len, reverse=True)


def scrubber(values: Iterable[str]) -> Callable[[str], str]:
    """A function that replaces each of `values` in a text."""
    known = list(values)

    def scrub(text: str) -> str:
        for value in known:
            text = text.replace(value, REDACTED)
        return redact_presigned(text)

    return scrub


def configure_logging(environ: Mapping[str, str]) -> None:
    """Log to stderr in the configured format, every known secret value scrubbed."""
    handler = logging.StreamHandler(sys.stderr)
    fmt = environ.get(FORMAT_VARIABLE, "text").strip().lower()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        # The ids are fields of their own; Temporal need not append them to the message.
        activity.logger.activity_info_on_message = False
        workflow.logger.workflow_info_on_message = False
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"{FORMAT_VARIABLE} must be text or json, not {fmt!r}")
    handler.addFilter(ScrubFilter(scrubber(secret_values(environ))))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
