"""A batch file's field values read: durations, sizes, percents, branch names, commands."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
)

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
APP_PATTERN = r"^[a-z0-9][a-z0-9-]{0,61}$"
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
SECRET_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+)\s*(mb|m|mib|gb|g|gib)?$", re.IGNORECASE)


class BatchFileError(ValueError):
    """A batch file that cannot be run; `problems` lists one line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        """Return a human-readable, multi-line report."""
        lines = [f"{self.source} is not a valid batch file:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def parse_duration(value: object) -> float:
    """Parse '30m', '1h30m', '90s', '500ms' or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"invalid duration {value!r} (use e.g. 90s, 30m, 1h30m)")
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"invalid duration {value!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def parse_memory_mb(value: object) -> int:
    """Parse 4096, '4096mb' or '4gb' into megabytes, a multiple of 256 as Fly requires."""
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int):
        mb = value
    elif isinstance(value, str) and (m := _SIZE.match(value.strip())):
        unit = (m.group(2) or "mb").lower()
        mb = int(m.group(1)) * (1024 if unit.startswith("g") else 1)
    else:
        raise ValueError(f"invalid memory size {value!r} (use e.g. 4096, 512mb, 4gb)")
    if mb < 256 or mb % 256:
        raise ValueError(f"memory must be a positive multiple of 256 MB, got {value!r}")
    return mb


MAX_ITERATIONS = 10
"""Most Claude turns a prompt job with `verify` may take to make its check pass."""
DEFAULT_ITERATIONS = 2
_BRANCH_FIELDS = re.compile(r"\{([^{}]*)\}")
_BRANCH = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*/\.)(?!\.)[A-Za-z0-9._/-]+(?<![/.])$")


def branch_name(template: str, batch_id: str, job_id: str) -> str:
    """The git branch a `push_branch` template names for one job: {batch} and {job} filled in."""
    unknown = sorted({f for f in _BRANCH_FIELDS.findall(template) if f not in ("batch", "job")})
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}} (use {{batch}} and {{job}})")
    name = template.replace("{batch}", batch_id).replace("{job}", job_id)
    if not _BRANCH.fullmatch(name) or name.endswith(".lock") or name.startswith("-"):
        raise ValueError(f"{template!r} does not make a valid git branch name")
    return name


_BYTES = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?$", re.IGNORECASE)
_BYTE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


def parse_bytes(value: object) -> int:
    """Parse 1048576, '500kb', '100mb' or '1gb' into bytes (a bare number is bytes)."""
    match = _BYTES.match(value.strip()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif match:
        count = int(float(match.group(1)) * _BYTE_UNITS[(match.group(2) or "b").lower()])
    else:
        raise ValueError(f"invalid size {value!r} (use e.g. 100mb, 500kb, 1gb)")
    if count <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return count


def check_glob(pattern: str) -> str:
    """An artifacts glob: relative to the job's working directory, never out of it."""
    pure = PurePosixPath(pattern)
    if not pattern.strip() or pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"{pattern!r} must be a relative path inside the job's directory")
    return pattern


def parse_stall_timeout(value: object) -> float:
    """A stall timeout: a duration, or `off` (YAML's false too), which is 0."""
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return 0.0
    return parse_duration(value)


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) the CLI can answer to: an object schema, itself valid."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        where = "/".join(map(str, error.absolute_path)) or "the schema"
        raise ValueError(f"not a valid JSON Schema at {where}: {error.message}") from None
    if schema.get("type") != "object":
        raise ValueError("must describe an object (`type: object`): Claude answers with one")
    return schema


def _command(value: object) -> object:
    """Accept a command as an argv list or as one shell string."""
    if isinstance(value, str):
        return ["sh", "-c", value]
    return value


FAILURE_RATE_AFTER = 20
"""`max_failure_rate` counts once this many jobs have finished (succeeded, failed or timed out):
before that one early failure would already be a rate of 100%."""


def parse_percent(value: object) -> float:
    """Parse '10%', '12.5%' or a number of percent into a percentage in (0, 100]."""
    text = value.strip().removesuffix("%").strip() if isinstance(value, str) else value
    try:
        percent = float(text) if isinstance(text, str | int | float) else None
    except ValueError:
        percent = None
    if isinstance(value, bool) or percent is None or not 0 < percent <= 100:
        raise ValueError(
            f"invalid failure rate {value!r}: use a percentage above 0% and at most 100%, "
            f"e.g. 10% (it counts once {FAILURE_RATE_AFTER} jobs have finished)"
        )
    return percent


def _off(value: object) -> object:
    """`storm: off` (YAML's false) or null turns the storm guard off."""
    return None if value is False else value


Seconds = Annotated[float, BeforeValidator(parse_duration)]
StallSeconds = Annotated[float, BeforeValidator(parse_stall_timeout)]
JsonSchema = Annotated[dict[str, Any], AfterValidator(check_json_schema)]
Percent = Annotated[float, BeforeValidator(parse_percent)]
MemoryMB = Annotated[int, BeforeValidator(parse_memory_mb)]
Command = Annotated[list[str], BeforeValidator(_command), Field(min_length=1)]
Bytes = Annotated[int, BeforeValidator(parse_bytes)]
Glob = Annotated[str, AfterValidator(check_glob)]
