"""MachineLogsWorkflow: one read of a job's machine logs, on a worker, for `starter.py logs`.

The worker holds the Fly token and the secret values, so the starter asks a worker to read the
logs and scrub them, like the reaper's one-off sweeps: each read is a short workflow of one
activity, and `logs --follow` runs one per poll.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.machine_models import ReadLogsInput, ReadLogsOutput
    from activities.machines import MachineActivities


@workflow.defn
class MachineLogsWorkflow:
    """Reads a machine's log lines after a token, scrubbed of the job's secrets."""

    @workflow.run
    async def run(self, input: ReadLogsInput) -> ReadLogsOutput:
        """Read once; a follower asks again with the token this returns."""
        return await workflow.execute_activity_method(
            MachineActivities.read_logs,
            input,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
            summary=f"read logs of machine {input.machine_id}",
        )
