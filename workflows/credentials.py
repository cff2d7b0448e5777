"""CredentialPoolWorkflow: which Claude credential a prompt job gets, decided once for all workers.

The story: one long-lived workflow per task queue keeps, by name only, the credential handed out
last and the credentials resting after a rate-limit or authentication failure: until the
usage limit resets when Claude said when, else for a fixed span. A worker about to
create a prompt job's machine asks `take` with the names it holds; the pool answers the next one
after the last handed out (round robin across every worker) that is not resting, or none when
all rest. A worker whose job met a refusal sends `rest`. The pool continues-as-new when its run
grows long, carrying only rests not yet over. Values never reach it: they stay on the workers.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.credential_models import (
        POOL_WORKFLOW,
        REST,
        TAKE,
        CredentialChoice,
        PoolState,
        PoolView,
        RestCredential,
        TakeCredential,
    )

RUN_EVENTS = 2_000
"""The pool continues-as-new past this many events (each take is about five)."""
MOST_REST = timedelta(days=8)
"""The latest reset a refusal may name: Claude's longest usage window is seven days."""


@workflow.defn(name=POOL_WORKFLOW)
class CredentialPoolWorkflow:
    """Hands out credentials in turn to every worker, skipping the resting ones."""

    @workflow.init
    def __init__(self, state: PoolState) -> None:
        self._state = state

    @workflow.run
    async def run(self, state: PoolState) -> None:
        """Serve takes and rests until the run is long, then continue as new."""
        await workflow.wait_condition(self._run_is_long)
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._forget_rests_over()
        workflow.continue_as_new(self._state)

    @workflow.update(name=TAKE)
    def take(self, request: TakeCredential) -> CredentialChoice:
        """The next of the asker's credentials after the last handed out, not resting."""
        names = sorted(set(request.names))
        now = workflow.now()
        last = self._state.last
        start = next((i for i, name in enumerate(names) if last is not None and name > last), 0)
        for step in range(len(names)):
            name = names[(start + step) % len(names)]
            until = self._state.rested_until.get(name)
            if until is None or until <= now:
                self._state.last = name
                return CredentialChoice(name=name)
        return CredentialChoice(
            name=None, resting_until=min(self._state.rested_until[name] for name in names)
        )

    @workflow.update(name=REST)
    def rest(self, request: RestCredential) -> None:
        """Set the credential aside for every worker (a longer rest already set stays): until
        the reset Claude named when it lies ahead within MOST_REST, else for `seconds`."""
        now = workflow.now()
        until = now + timedelta(seconds=request.seconds)
        if request.until is not None and now < request.until <= now + MOST_REST:
            until = request.until
        current = self._state.rested_until.get(request.name)
        if current is None or current < until:
            self._state.rested_until[request.name] = until
            self._state.reasons[request.name] = request.reason

    @workflow.query
    def resting(self) -> PoolView:
        """The credentials resting now."""
        now = workflow.now()
        resting = {n: t for n, t in self._state.rested_until.items() if t > now}
        reasons = {n: r for n, r in self._state.reasons.items() if n in resting}
        return PoolView(last=self._state.last, resting=resting, reasons=reasons)

    def _run_is_long(self) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() > RUN_EVENTS

    def _forget_rests_over(self) -> None:
        now = workflow.now()
        for name in [n for n, t in self._state.rested_until.items() if t <= now]:
            del self._state.rested_until[name]
            self._state.reasons.pop(name, None)
