"""ReaperWorkflow: one sweep of orphaned machines, run on demand or by a Temporal Schedule."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.reaper import ReaperActivities
    from sortie.reaper_models import REAPER_WORKFLOW, ReapInput, ReapOutput
    from workflows import policies


@workflow.defn(name=REAPER_WORKFLOW)
class ReaperWorkflow:
    """Destroys Sortie machines whose batch or chunk workflow is closed or unknown."""

    @workflow.run
    async def run(self, input: ReapInput) -> ReapOutput:
        """Sweep the app once."""
        mode = "report" if input.dry_run else "destroy"
        return await workflow.execute_activity_method(
            ReaperActivities.reap_orphans,
            input,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(minutes=2),
            retry_policy=policies.FLY_RETRY,
            summary=f"{mode} orphaned machines in {input.app}",
        )
