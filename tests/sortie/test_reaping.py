"""The worker's reaper schedules: no failure to make one is final."""

from __future__ import annotations

import logging

import pytest

from sortie.reaping import ReaperSchedules
from tests.helpers.waiting import eventually


async def test_a_reaper_schedule_that_fails_is_tried_again_until_it_exists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tries: list[str] = []

    async def ensure(app: str) -> None:
        tries.append(app)
        if len(tries) < 3:
            raise RuntimeError("Temporal unavailable")

    schedules = ReaperSchedules(ensure, first_delay_s=0.01)
    with caplog.at_level(logging.WARNING, logger="sortie.reaper"):
        await schedules.ensure("app-a")
        await schedules.ensure("app-a")  # asked again while trying: still one try at a time
        assert schedules.missing() == ["app-a"]
        await eventually(lambda: not schedules.missing(), what="the schedule made")
    await schedules.close()

    assert tries == ["app-a"] * 3
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("no reaper schedule for Fly app app-a" in m for m in said)
