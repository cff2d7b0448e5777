"""Tell a batch's webhook of its end and its pauses: a signed POST per event, once.

Once means: at least once, and every try of one event carries the same `Sortie-Delivery` key and
the same body. Temporal retries the activity until the receiver answers 2xx (or NOTIFY_DEADLINE
passes), also after a worker died mid-POST; a delivered notice is marked in the object store, so
a retry after a lost completion does not POST again. Only a worker that dies between the
receiver's 2xx and that mark makes a second POST, with the same key: receivers drop a key they
have seen. The URL's `${NAME}` parts and the signing key are worker secrets, resolved here and
never logged; logs name the receiver's scheme and host only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.job_models import StoredRows, rows_key
from activities.notify_models import NoticeInput, NoticeOutput
from activities.secrets import SecretStore
from sortie.failures import Cause, Summary, cause_lines
from sortie.labels import chunk_workflow_id
from sortie.models import JobResult
from sortie.notify import NotifyFormat
from sortie.store import ObjectStore, notice_key

SIGNATURE = "Sortie-Signature"
DELIVERY = "Sortie-Delivery"
EVENT = "Sortie-Event"
TOP_CAUSES = 3
POST_TIMEOUT_S = 10.0
_PLACEHOLDER = "${"


class NotifyActivities:
    """The webhook POSTs; owns the worker's secrets, the object store and the Web UI's address."""

    def __init__(
        self, secrets: SecretStore, store: ObjectStore, workflow_url: Callable[[str], str]
    ) -> None:
        self._secrets = secrets
        self._store = store
        self._workflow_url = workflow_url

    @activity.defn(name="notify")
    async def notify(self, input: NoticeInput) -> NoticeOutput:
        """POST the event to the batch's webhook, signed; done already: nothing."""
        marked = notice_key(input.delivery)
        if await self._store.get(marked) is not None:
            return NoticeOutput(delivered_before=True)
        spec = input.notify
        names = spec.secret_names()
        try:
            values = self._secrets.resolve(names)
        except KeyError as error:
            why = str(error.args[0])
            raise ApplicationError(why, type="UnknownSecrets", non_retryable=True) from None
        url = spec.url
        for name in names:
            url = url.replace(f"${{{name}}}", values[name])
        body = json.dumps(await self._document(input), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", DELIVERY: input.delivery}
        headers[EVENT] = input.event.value
        if spec.secret is not None:
            digest = hmac.new(values[spec.secret].encode(), body, hashlib.sha256).hexdigest()
            headers[SIGNATURE] = f"sha256={digest}"
        where = receiver(spec.url)
        try:
            async with httpx.AsyncClient(timeout=POST_TIMEOUT_S) as http:
                answer = await http.post(url, content=body, headers=headers)
        except httpx.HTTPError as error:
            why = self._secrets.scrub(str(error) or type(error).__name__, names)
            raise ApplicationError(f"POST to {where} failed: {why}", type="NotifyFailed") from None
        if not answer.is_success:
            code = answer.status_code
            retry_after = answer.headers.get("retry-after", "")
            raise ApplicationError(
                f"POST to {where} answered {code}",
                type="NotifyRefused",
                non_retryable=code < 500 and code not in (408, 429),
                next_retry_delay=timedelta(seconds=int(retry_after))
                if retry_after.isdigit()
                else None,
            )
        mark = {"status": answer.status_code, "at": datetime.now(UTC).isoformat()}
        await self._store.put(marked, json.dumps(mark).encode(), {"batch": input.batch_id})
        activity.logger.info("told %s of batch %s: %s", where, input.batch_id, input.event)
        return NoticeOutput(status=answer.status_code)

    async def _document(self, input: NoticeInput) -> dict[str, Any]:
        """The POST's body: the batch's counts, cost, top causes and Web UI link."""
        c = input.counts
        causes = await self._causes(input) if c.failed or c.timed_out or c.cancelled else []
        link = self._workflow_url(input.batch_id)
        if input.notify.format is NotifyFormat.SLACK:
            return {"text": slack_text(input, causes, link)}
        return {
            "event": input.event.value,
            "delivery": input.delivery,
            "batch_id": input.batch_id,
            "name": input.name,
            "status": input.status,
            "reason": input.reason,
            "counts": c.model_dump(include=COUNTED),
            "cost_usd": round(c.cost_usd, 6),
            "num_turns": c.num_turns,
            "causes": [cause.model_dump() for cause in causes],
            "url": link,
        }

    async def _causes(self, input: NoticeInput) -> list[Cause]:
        """The batch's top causes of failure, from its chunks' rows: those a closed chunk left
        in the store, else asked of the running chunk (best effort: none if unreadable)."""
        summary = Summary()
        try:
            for index in range(input.chunks):
                workflow_id = chunk_workflow_id(input.batch_id, index)
                data = await self._store.get(rows_key(input.batch_id, workflow_id))
                for row in await self._rows(workflow_id, data):
                    summary.add(row)
        except Exception as error:  # the notice goes without its causes; the rows are kept
            activity.logger.warning("causes of batch %s not read: %s", input.batch_id, error)
            return []
        return summary.causes()[:TOP_CAUSES]

    @staticmethod
    async def _rows(workflow_id: str, stored: bytes | None) -> list[JobResult]:
        """A chunk's rows: stored when it closed, else its `results` query; none if unstarted."""
        if stored is not None:
            return StoredRows.model_validate_json(stored).rows
        chunk = activity.client().get_workflow_handle(workflow_id)
        try:
            rows: list[JobResult] = await chunk.query("results", result_type=list[JobResult])
        except RPCError:
            return []  # never started (pending, or skipped by a cancel)
        return rows


COUNTED = {"total", "pending", "running", "succeeded", "failed", "timed_out", "cancelled"}
"""The counts a notice carries."""


def receiver(url: str) -> str:
    """What logs and errors may name of a webhook: its scheme and host (no path, no secret)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{'…' if _PLACEHOLDER in host else host}"


def slack_text(input: NoticeInput, causes: list[Cause], link: str) -> str:
    """A Slack message: what happened, the counts and cost, the top causes, the link."""
    c = input.counts
    lines = [
        f"Sortie batch *{input.name}* {input.event.value}: {c.done}/{c.total} jobs done, "
        f"{c.succeeded} succeeded, {c.failed + c.timed_out} failed, {c.cancelled} cancelled, "
        f"${c.cost_usd:.2f}"
    ]
    if input.reason:
        lines.append(f"_{input.reason}_")
    lines += [f"• {line}" for line in cause_lines(causes)]
    lines.append(f"<{link}|{input.batch_id} in the Temporal Web UI>")
    return "\n".join(lines)
