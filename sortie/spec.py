"""The batch file: what a user writes, validated before anything is submitted.

A batch file (YAML or JSON) names a Fly app, a concurrency cap, a chunk size, job defaults and
the jobs. Every error names the field and the job it belongs to; nothing is created for a file
that does not validate. Secrets are named here and resolved only on the worker.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from sortie import table
from sortie.artifacts import DEFAULT_MAX_BYTES
from sortie.fields import (
    APP_PATTERN,
    DEFAULT_ITERATIONS,
    JOB_ID_PATTERN,
    MAX_ITERATIONS,
    NAME_PATTERN,
    SECRET_PATTERN,
    BatchFileError,
    Bytes,
    Command,
    Glob,
    JsonSchema,
    MemoryMB,
    Percent,
    Seconds,
    StallSeconds,
    _off,
    branch_name,
)
from sortie.notify import Notify
from sortie.problems import cross_field_problems, messages
from sortie.sizes import FLY_MEMORY_PER_CPU, Guest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogTail(StrEnum):
    """When a command job's log tail is read: always, or only when the job did not succeed.

    A successful command job needs only its exit code; skipping its logs saves a Fly call per
    job. A prompt job's answer is in its logs, so they are always read.
    """

    ON_FAILURE = "on_failure"
    ALWAYS = "always"


class OnOom(StrEnum):
    """What the retry of an OOM-killed job runs on: twice the memory, or the same size."""

    GROW = "grow"
    SAME = "same"


class Repo(_Strict):
    """A repository a prompt job clones before it runs."""

    url: str = Field(min_length=1)
    branch: str | None = Field(default=None, min_length=1)
    ref: str | None = Field(default=None, pattern=r"^[0-9a-f]{7,40}$")
    path: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")

    @field_validator("path")
    @classmethod
    def _inside_the_workspace(cls, path: str | None) -> str | None:
        if path is not None and ".." in path.split("/"):
            raise ValueError("must stay inside the workspace (no '..')")
        return path

    @classmethod
    def coerce(cls, value: object) -> object:
        """Accept a bare URL string for a repo."""
        return {"url": value} if isinstance(value, str) else value


RepoField = Annotated[Repo, BeforeValidator(Repo.coerce)]

DOMAIN_PATTERN = r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}$"
"""A host name or IP address the agent may reach, `*.` for every subdomain of one."""


class Network(_Strict):
    """Where a prompt job's agent may connect: its commands (through the sandbox's proxy) and
    WebFetch reach only `allow`, and the hosts of the job's repositories."""

    allow: list[Annotated[str, Field(pattern=DOMAIN_PATTERN)]] = []


OPEN = "open"
"""`network: open`: the allowlist off for a job (the sandbox still confines its writes)."""
NetworkField = Network | Literal["open"]


class JobFields(_Strict):
    """Fields a job may set, and the batch's `defaults` may set for every job.

    Serialised without the fields left unset: a batch of 10,000 jobs travels as its jobs'
    own settings, not as 10,000 copies of every empty field (Temporal caps a payload at 2 MB).
    """

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}

    command: Command | None = None
    prompt: str | None = Field(default=None, min_length=1)
    repos: list[RepoField] | None = None
    image: str | None = Field(default=None, min_length=1)
    region: str | None = Field(default=None, pattern=r"^[a-z]{3}$")
    guest: Guest | None = None
    timeout: Seconds | None = None
    boot_timeout: Seconds | None = None
    retries: int | None = Field(default=None, ge=0, le=10)
    env: dict[str, str] | None = None
    secrets: list[Annotated[str, Field(pattern=SECRET_PATTERN)]] | None = None
    model: str | None = None
    max_turns: int | None = Field(default=None, ge=1, le=1000)
    allowed_tools: list[str] | None = None
    max_cost_usd: float | None = Field(default=None, gt=0)
    log_tail: LogTail | None = None
    verify: Command | None = None
    max_iterations: int | None = Field(default=None, ge=1, le=MAX_ITERATIONS)
    push_branch: str | None = None
    json_schema: JsonSchema | None = None
    stall_timeout: StallSeconds | None = None
    max_memory: MemoryMB | None = None
    on_oom: OnOom | None = None
    artifacts: list[Glob] | None = None
    """Files to keep from the job's machine, globs relative to its working directory."""
    artifacts_max: Bytes | None = None
    network: NetworkField | None = None

    @field_validator("push_branch")
    @classmethod
    def _branch_template(cls, template: str | None) -> str | None:
        if template is not None:
            branch_name(template, "b", "j")
        return template

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str] | None) -> dict[str, str] | None:
        for key in env or {}:
            if not re.fullmatch(SECRET_PATTERN, key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return env


class JobSpec(JobFields):
    """One job as written in the batch file."""

    id: str = Field(pattern=JOB_ID_PATTERN)


class Defaults(JobFields):
    """Defaults applied to every job; a job's own value wins (env is merged key by key)."""


DEFAULT_IMAGE = "registry.fly.io/sortie-agent:latest"
DEFAULT_TIMEOUT_S = 30 * 60.0
DEFAULT_BOOT_TIMEOUT_S = 5 * 60.0
DEFAULT_RETRIES = 2
DEFAULT_STALL_TIMEOUT_S = 10 * 60.0


class Job(_Strict):
    """A job with the batch defaults applied: what a chunk runs (mutable defaults are factories:
    pydantic deep-copies a literal `[]` or `Guest()` per job, slow on 10,000 jobs)."""

    id: str
    index: int
    command: list[str] | None = None
    prompt: str | None = None
    repos: list[Repo] = Field(default_factory=list)
    image: str = DEFAULT_IMAGE
    region: str | None = None
    guest: Guest = Field(default_factory=Guest)
    timeout_s: float = DEFAULT_TIMEOUT_S
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)
    model: str | None = None
    max_turns: int | None = None
    allowed_tools: list[str] = Field(default_factory=list)
    max_cost_usd: float | None = None
    log_tail: LogTail = LogTail.ON_FAILURE
    verify: list[str] | None = None
    max_iterations: int = DEFAULT_ITERATIONS
    push_branch: str | None = None
    json_schema: dict[str, Any] | None = None
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    """0 is off: the CLI may go quiet as long as the job's timeout allows."""
    max_memory_mb: int | None = None
    on_oom: OnOom = OnOom.GROW
    artifacts: list[str] = Field(default_factory=list)
    artifacts_max_bytes: int = DEFAULT_MAX_BYTES

    def memory_after_oom(self, memory_mb: int) -> int:
        """The memory of the retry of an attempt OOM-killed at `memory_mb`: twice it, up to
        `max_memory` (by default four times the job's, within what Fly gives its CPUs)."""
        if self.on_oom is OnOom.SAME:
            return memory_mb
        guest = self.guest
        most = self.max_memory_mb or min(
            4 * guest.memory_mb, FLY_MEMORY_PER_CPU[guest.cpu_kind] * guest.cpus
        )
        return max(memory_mb, min(2 * memory_mb, most))

    def sized(self, memory_mb: int) -> Job:
        """The job on a machine of `memory_mb`."""
        if memory_mb == self.guest.memory_mb:
            return self
        guest = self.guest.model_copy(update={"memory_mb": memory_mb})
        return self.model_copy(update={"guest": guest})

    network: NetworkField = Network()
    """Nothing beyond the repositories' hosts unless the batch file allows it."""


MAX_APPS = 20
DEFAULT_PRIORITY = 3
"""Temporal's default priority key (the middle of 1..5)."""


def app_for(apps: list[str], index: int) -> str:
    """The Fly app of the job at `index`: jobs take the apps in turn, so each gets its share."""
    return apps[index % len(apps)]


class OnTooManyFailures(StrEnum):
    """What a batch does once its failures reach `max_failures` or `max_failure_rate`."""

    PAUSE = "pause"
    CANCEL = "cancel"


class StormGuard(_Strict):
    """Pause the batch when `errors` errors that blame the platform, not the job, come `within`.

    Those errors are Claude rate-limit, overloaded and authentication errors, and Fly 429s and
    5xx that outlasted their retries (workflows/guards.py has the rule); `auto_resume_after`
    resumes a batch paused by a storm by itself, on a durable timer.
    """

    errors: int = Field(default=10, ge=1, le=1000)
    within: Seconds = 300.0
    auto_resume_after: Seconds | None = None


MAX_CHUNK_SIZE = 250
"""A chunk returns every job's result (up to about 5 KB each with a preview of Claude's answer
and a log tail) in one payload, which Temporal caps at 2 MB, and keeps about ten events a job."""


class BatchSpec(_Strict):
    """A whole batch file."""

    name: str = Field(pattern=NAME_PATTERN)
    app: str = Field(pattern=APP_PATTERN)
    """The Fly app of every machine, or with `apps` the first of them."""
    apps: list[Annotated[str, Field(pattern=APP_PATTERN)]] | None = Field(
        default=None, min_length=1, max_length=MAX_APPS
    )
    """Several Fly apps, each with its own create rate: the jobs are spread evenly over them."""
    priority: int = Field(default=DEFAULT_PRIORITY, ge=1, le=5)
    """1 (first) to 5 (last): which batch's work the shared workers take first."""
    max_machines: int = Field(default=10, ge=1, le=2000)
    chunk_size: int = Field(default=100, ge=1, le=MAX_CHUNK_SIZE)
    max_cost_usd: float | None = Field(default=None, gt=0)
    keep_sessions: Seconds | None = None
    reuse_machines: bool = False
    """A machine whose job ended cleanly takes a later job of the batch in its app (each job
    still starts on a fresh root filesystem): far fewer creates than jobs."""
    reuse_idle: Seconds = Field(default=30.0, gt=0, le=3600)
    """With `reuse_machines`: how long a stopped machine waits for a job before it is destroyed."""
    max_failures: int | None = Field(default=None, ge=1)
    max_failure_rate: Percent | None = None
    on_too_many_failures: OnTooManyFailures = OnTooManyFailures.PAUSE
    storm: Annotated[StormGuard | None, BeforeValidator(_off)] = StormGuard()
    notify: Notify | None = None
    defaults: Defaults = Defaults()
    jobs: list[JobSpec] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _app_or_apps(cls, data: Any) -> Any:
        """`app: a` or `apps: [a, b, c]`; with `apps`, `app` is the first of them."""
        if not isinstance(data, dict) or data.get("apps") is None:
            return data
        if data.get("app") is not None:
            raise ValueError("give `app` (one Fly app) or `apps` (several), not both")
        apps = data["apps"]
        if isinstance(apps, list) and apps:
            if len(set(map(str, apps))) != len(apps):
                raise ValueError("apps: each Fly app may be named once")
            return {**data, "app": apps[0]}
        return data

    @property
    def fly_apps(self) -> list[str]:
        """Every Fly app of the batch, in the file's order."""
        return list(self.apps) if self.apps else [self.app]

    @model_validator(mode="after")
    def _jobs_are_runnable(self) -> Self:
        problems = cross_field_problems(
            [job.model_dump() for job in self.jobs], self.defaults.model_dump()
        )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def balanced_chunk_size(self, most: int | None = None) -> int:
        """Jobs per chunk, at most `chunk_size` (or `most`), so every chunk gets the same slots.

        The batch shares `max_machines` among the chunks running at once. With k chunks of the
        same size and C machines, every chunk gets C/k slots when k divides C, or one slot each
        when k is a multiple of C; otherwise some chunks get a slot more than others, finish
        first, and the rest run on with their queues while slots wait in transit between them.
        So k is raised to the next divisor (or multiple) of C.
        """
        jobs, machines = len(self.jobs), self.max_machines
        size = self.chunk_size if most is None else min(self.chunk_size, most)
        chunks = -(-jobs // size)
        if chunks <= machines:
            chunks = next(k for k in range(chunks, machines + 1) if machines % k == 0)
        else:
            chunks = -(-chunks // machines) * machines
        return -(-jobs // min(chunks, jobs))

    def secret_names(self) -> list[str]:
        """Every secret name the batch refers to, sorted."""
        names = set(self.defaults.secrets or [])
        for job in self.jobs:
            names.update(job.secrets or [])
        return sorted(names | set(self.notify.secret_names() if self.notify else []))

    def open_network(self) -> list[str]:
        """The prompt jobs whose agent may connect anywhere (`network: open`): a warning."""
        return [
            job.id
            for job in self.jobs
            if (job.prompt or self.defaults.prompt)
            and (job.network if job.network is not None else self.defaults.network) == OPEN
        ]

    def fingerprint(self) -> str:
        """A short stable hash of the batch's content: the same file gives the same batch id."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:8]

    def batch_id(self, suffix: str | None = None) -> str:
        """The batch's workflow id, `batch-<name>-<suffix>`."""
        return f"batch-{self.name}-{suffix or self.fingerprint()}"


def resolve_job(defaults: Defaults, job: JobSpec, index: int) -> Job:
    """Apply the batch defaults to one job (pure and deterministic: safe in workflow code)."""
    merged: dict[str, Any] = {"id": job.id, "index": index}
    for field in JobFields.model_fields:
        own = getattr(job, field)
        default = getattr(defaults, field)
        if field == "env":
            merged["env"] = {**(default or {}), **(own or {})}
        elif field == "secrets":
            merged["secrets"] = sorted({*(default or []), *(own or [])})
        elif own is not None or default is not None:
            value = own if own is not None else default
            merged[_JOB_NAMES.get(field, field)] = value
    merged.setdefault("guest", Guest.default(merged.get("prompt") is not None))
    return Job.model_validate(merged)


_JOB_NAMES = {
    "timeout": "timeout_s",
    "boot_timeout": "boot_timeout_s",
    "stall_timeout": "stall_timeout_s",
    "max_memory": "max_memory_mb",
    "artifacts_max": "artifacts_max_bytes",
}


def parse_batch(data: object, source: str = "batch") -> BatchSpec:
    """Validate already-parsed batch data, raising BatchFileError with every problem.

    Pydantic runs the batch's cross-field checks only once every field is valid, so on field
    errors they are run on the raw data too: the file's problems are all reported at once.
    """
    if not isinstance(data, dict):
        raise BatchFileError(source, ["the batch must be a mapping with name, app and jobs"])
    try:
        return BatchSpec.model_validate(data)
    except ValidationError as error:
        problems = messages(error, data)
        if not any(not item["loc"] for item in error.errors()):
            problems += cross_field_problems(data.get("jobs"), data.get("defaults"))
        raise BatchFileError(source, problems) from None


_JOBS_FROM = TypeAdapter(list[table.JobsFrom])


def expand_tables(data: dict[str, Any], base: Path, source: str) -> BatchSpec:
    """Validate a batch whose `jobs_from` makes jobs: every problem of the tables and of the
    jobs they made reported at once, a made job's by its file and line."""
    raw = data["jobs_from"]
    written = data.get("jobs") or []
    rest = {key: value for key, value in data.items() if key != "jobs_from"}
    try:
        sources = _JOBS_FROM.validate_python(raw if isinstance(raw, list) else [raw])
    except ValidationError as error:
        problems = [
            f"jobs_from{table.at(item['loc'])}: {table.message(item)}" for item in error.errors()
        ]
        raise BatchFileError(source, problems) from None
    made = table.expand(sources, base, written if isinstance(written, list) else [])
    offset = len(written) if isinstance(written, list) else 0
    problems = made.report()
    try:
        spec = parse_batch({**rest, "jobs": [*written, *made.jobs]}, source)
    except BatchFileError as error:
        shown = error.problems
        if problems and shown == ["jobs: the batch has no jobs"]:
            shown = []
        problems += table.locate(shown, made.origins, offset)
    if problems:
        raise BatchFileError(source, problems)
    return spec


def load_batch_file(path: str | Path) -> BatchSpec:
    """Read and validate a YAML or JSON batch file, which must be UTF-8 text."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise BatchFileError(str(path), [f"cannot read: {error.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = raw[error.start]
        raise BatchFileError(
            str(path),
            [f"not UTF-8 text (byte 0x{byte:02x} at offset {error.start}): save it as UTF-8"],
        ) from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise BatchFileError(str(path), [f"not valid {kind}: {error}"]) from None
    if isinstance(data, dict) and data.get("jobs_from") is not None:
        return expand_tables(data, path.parent, str(path))
    return parse_batch(data, str(path))
