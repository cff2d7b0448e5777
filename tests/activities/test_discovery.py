"""How a worker finds the Fly apps in use from the running workflows' memos: a memo that is not
ours is skipped and said, any other error surfaces and the discovery is tried again."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from temporalio.client import Client

from activities import pacing
from activities.pacing import CreateQueues
from tests.helpers.waiting import eventually


class Execution:
    """A listed workflow: its id and its apps memo (or what reading it raises)."""

    def __init__(self, workflow_id: str, memo: list[str] | Exception) -> None:
        self.id = workflow_id
        self._memo = memo

    async def memo_value(self, key: str, default: Any, type_hint: Any = None) -> Any:
        if isinstance(self._memo, Exception):
            raise self._memo
        return self._memo


class Visibility:
    """`list_workflows`, answering each listing with the next of `listings` (the last again)."""

    def __init__(self, *listings: list[Execution] | Exception) -> None:
        self._listings = list(listings)
        self.listed = 0

    def list_workflows(self, query: str) -> AsyncIterator[Execution]:
        listing = self._listings[min(self.listed, len(self._listings) - 1)]
        self.listed += 1

        async def executions() -> AsyncIterator[Execution]:
            if isinstance(listing, Exception):
                raise listing
            for execution in listing:
                yield execution

        return executions()


def queues(visibility: Visibility, served: list[str]) -> CreateQueues:
    created = CreateQueues(cast(Client, visibility), "q", lambda: None, rate=None)

    async def serve(app: str) -> None:
        served.append(app)

    created.serve = serve  # type: ignore[method-assign]
    return created


async def test_a_memo_not_ours_is_skipped_and_said(caplog: pytest.LogCaptureFixture) -> None:
    served: list[str] = []
    visibility = Visibility(
        [Execution("batch-a", ["app-a"]), Execution("other", ValueError("not a list"))]
    )
    with caplog.at_level(logging.WARNING, logger="sortie.pacing"):
        await queues(visibility, served).discover()
    assert served == ["app-a"]
    assert "workflow other: memo" in caplog.text and "unreadable" in caplog.text


async def test_any_other_error_reading_the_memos_surfaces() -> None:
    served: list[str] = []
    visibility = Visibility(
        [Execution("batch-a", ["app-a"]), Execution("batch-b", RuntimeError("codec failed"))]
    )
    with pytest.raises(RuntimeError, match="codec failed"):
        await queues(visibility, served).discover()
    assert served == [], "no app of a discovery that failed half way"


async def test_a_discovery_that_fails_is_said_and_tried_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pacing, "DISCOVER_EVERY", 0.01)
    served: list[str] = []
    visibility = Visibility(
        RuntimeError("visibility unavailable"),
        [Execution("batch-b", RuntimeError("codec failed"))],
        [Execution("batch-a", ["app-a"])],
    )
    with caplog.at_level(logging.WARNING, logger="sortie.pacing"):
        async with queues(visibility, served):
            await eventually(lambda: served, what="the app served once the memos read")
    assert served[0] == "app-a" and visibility.listed >= 3
    said = [r.getMessage() for r in caplog.records]
    assert "could not list the apps in use: visibility unavailable" in said
    assert "could not list the apps in use: codec failed" in said
