"""The batch file's problems: checks across a job's fields and the defaults (run on the raw
data too, so they are reported beside field errors), and pydantic's errors worded as lines that
name the field and the job."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sortie.fields import parse_memory_mb
from sortie.sizes import FLY_MEMORY_PER_CPU, Guest

PROMPT_ONLY = (
    "repos",
    "model",
    "max_turns",
    "allowed_tools",
    "max_cost_usd",
    "verify",
    "max_iterations",
    "push_branch",
    "json_schema",
    "stall_timeout",
    "network",
)
"""Job fields that only a Claude Code (prompt) job uses."""


def job_where(job: object, index: int) -> str:
    """`job 'ID' (jobs[i])`, as every problem about a job begins."""
    job_id = job.get("id", "?") if isinstance(job, dict) else "?"
    return f"job {str(job_id)!r} (jobs[{index}])"


def cross_field_problems(jobs: object, defaults: object) -> list[str]:
    """Duplicate ids, not one of command and prompt, prompt-only fields on a command job.

    Read from raw data, so they are reported beside field errors; entries that are not mappings
    are left to the field validation, which names them.
    """
    if not isinstance(jobs, list):
        return []
    fallback = defaults if isinstance(defaults, dict) else {}
    problems: list[str] = []
    first: dict[str, int] = {}
    for i, job in enumerate(jobs):
        if not isinstance(job, dict):
            continue
        where = job_where(job, i)
        job_id = job.get("id")
        if isinstance(job_id, str):
            if job_id in first:
                problems.append(f"{where}: id: duplicate job id (first at jobs[{first[job_id]}])")
            first.setdefault(job_id, i)
        command = job.get("command") if job.get("command") is not None else fallback.get("command")
        prompt = job.get("prompt") if job.get("prompt") is not None else fallback.get("prompt")
        if (command is None) == (prompt is None):
            problems.append(f"{where}: set exactly one of command or prompt")
        elif command is not None:
            for field in PROMPT_ONLY:
                if job.get(field) is not None:
                    problems.append(f"{where}: {field} is only for prompt jobs")
        if (problem := max_memory_problem(job, fallback)) is not None:
            problems.append(f"{where}: max_memory: {problem}")
    return problems


def max_memory_problem(job: dict[str, Any], defaults: dict[str, Any]) -> str | None:
    """`max_memory` below the job's memory, or above what Fly allows for its CPUs (values that
    do not parse are the field validation's to report)."""
    given = (
        job.get("max_memory") if job.get("max_memory") is not None else defaults.get("max_memory")
    )
    guest = job.get("guest") if job.get("guest") is not None else defaults.get("guest")
    prompt = (job.get("prompt") or defaults.get("prompt")) is not None
    try:
        guest = Guest.model_validate(guest) if guest is not None else Guest.default(prompt)
        most = parse_memory_mb(given) if given is not None else None
    except (ValidationError, ValueError):
        return None
    fly_most = FLY_MEMORY_PER_CPU[guest.cpu_kind] * guest.cpus
    if most is not None and most < guest.memory_mb:
        return f"{most} MB is below the job's memory_mb ({guest.memory_mb} MB)"
    if most is not None and most > fly_most:
        cpus = f"{guest.cpus} {guest.cpu_kind} CPU{'s' * (guest.cpus > 1)}"
        return f"{most} MB is more than Fly gives {cpus} ({fly_most} MB)"
    return None


def describe(spec_data: object, loc: tuple[int | str, ...]) -> str:
    """Name the field and, for job fields, the job id, from a pydantic error location."""
    if len(loc) >= 2 and loc[0] == "jobs" and isinstance(loc[1], int):
        jobs = spec_data.get("jobs") if isinstance(spec_data, dict) else None
        job = jobs[loc[1]] if isinstance(jobs, list) and loc[1] < len(jobs) else None
        field = ".".join(str(p) for p in loc[2:]) or "job"
        return f"{job_where(job, loc[1])}: {field}"
    return ".".join(str(p) for p in loc) or "batch"


def messages(error: ValidationError, data: object) -> list[str]:
    """Pydantic's errors as the batch file's problems, one line each, naming field and job."""
    problems: list[str] = []
    for item in error.errors():
        loc = tuple(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required"
        elif loc == ("jobs",) and (item["type"] == "too_short" or item["input"] is None):
            message = "the batch has no jobs"
        if not loc:
            problems.extend(message.splitlines())
        else:
            problems.append(f"{describe(data, loc)}: {message}")
    return problems
