"""What `status` prints for a batch."""

from __future__ import annotations

from client.batches.status import view
from client.render import progress_lines
from sortie.models import Counts
from workflows.batch_models import Progress


def test_status_shows_machines_created_against_jobs_run() -> None:
    counts = Counts(total=150, succeeded=120, running=30, live_machines=30, machines_created=33)
    progress = Progress(
        batch_id="batch-x",
        status="running",
        paused=False,
        pause_reason=None,
        cancelled=False,
        max_machines=30,
        counts=counts,
        chunks=[],
    )
    lines = progress_lines(view(progress))
    assert "  machines created 33 for 150 jobs run" in lines
