"""What a valid batch file will do, worked out without a server: for `starter.py validate`."""

from __future__ import annotations

from dataclasses import dataclass, field

from activities.endings import seconds
from client.batches import batch_input
from sortie.fields import FAILURE_RATE_AFTER
from sortie.spec import BatchSpec
from workflows.guards import limit_text


@dataclass(frozen=True)
class Plan:
    """A batch's shape and its bounds in plain values."""

    name: str
    batch_id: str
    app: str
    apps: list[str]
    jobs: int
    command_jobs: int
    prompt_jobs: int
    chunk_size: int
    chunks: int
    max_machines: int
    secrets: list[str]
    longest_job_s: float
    """One job at its worst: every try boots and runs until its timeout."""
    time_bound_s: float
    """The whole batch at its worst on `max_machines` machines (list scheduling's bound)."""
    job_costs_usd: float | None
    """The prompt jobs' `max_cost_usd` added up (first turns), None when one has none."""
    budget_usd: float | None
    failure_limit: str | None = None
    """When failed jobs stop the batch, as the batch file says it; None: they never do."""
    storm: str | None = None
    open_network: list[str] = field(default_factory=list)
    """Prompt jobs with `network: open`: their agents may connect anywhere."""
    """When a storm of platform errors pauses the batch; None: the guard is off."""

    @property
    def machines_at_once(self) -> int:
        """Most machines alive at once: no more than the cap, nor than the jobs."""
        return min(self.max_machines, self.jobs)


def plan(spec: BatchSpec) -> Plan:
    """Resolve every job and bound the batch's time and cost; raises BatchFileError if too big."""
    batch_id = spec.batch_id()
    data = batch_input(spec, batch_id)  # resolves every job once: 10,000 take a while
    jobs, size = data.jobs, data.input.jobs.chunk_size
    worst = [(job.retries + 1) * (job.boot_timeout_s + job.timeout_s) for job in jobs]
    machines = min(spec.max_machines, len(jobs))
    prompts = [job for job in jobs if job.prompt is not None]
    caps = [job.max_cost_usd for job in prompts]
    return Plan(
        name=spec.name,
        batch_id=batch_id,
        app=spec.app,
        apps=spec.fly_apps,
        jobs=len(jobs),
        command_jobs=len(jobs) - len(prompts),
        prompt_jobs=len(prompts),
        chunk_size=size,
        chunks=-(-len(jobs) // size),
        max_machines=spec.max_machines,
        secrets=spec.secret_names(),
        open_network=spec.open_network(),
        longest_job_s=max(worst),
        time_bound_s=sum(worst) / machines + max(worst) * (machines - 1) / machines,
        job_costs_usd=None if None in caps else round(sum(c or 0.0 for c in caps), 6),
        budget_usd=spec.max_cost_usd,
        failure_limit=_failure_limit(limit_text(data.input.failure_limit), spec),
        storm=_storm(spec),
    )


def _failure_limit(text: str | None, spec: BatchSpec) -> str | None:
    if text is None or spec.max_failure_rate is None:
        return text
    return f"{text} (the rate counts once {FAILURE_RATE_AFTER} jobs have finished)"


def _storm(spec: BatchSpec) -> str | None:
    guard = spec.storm
    if guard is None:
        return None
    text = f"pause at {guard.errors} Claude or Fly errors within {seconds(guard.within)}"
    if guard.auto_resume_after is not None:
        text += f", resume after {seconds(guard.auto_resume_after)}"
    return text
