"""A job's machine size: what Fly gives, and what a job gets when its file names none."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sortie.fields import MemoryMB

FLY_MEMORY_PER_CPU = {"shared": 2048, "performance": 8192}
"""The most memory Fly gives a machine per CPU of each kind, in MB (fly-go's presets)."""


class Guest(BaseModel):
    """The machine size of a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_kind: Literal["shared", "performance"] = "shared"
    cpus: int = Field(default=1, ge=1, le=16)
    memory_mb: MemoryMB = 256

    @classmethod
    def default(cls, prompt: bool) -> Guest:
        """A job's size when its file gives none: Claude Code's CLI alone holds about 220 MB,
        so a prompt job starts at PROMPT_MEMORY_MB, where 256 MB would be OOM-killed."""
        return cls(memory_mb=PROMPT_MEMORY_MB) if prompt else cls()


PROMPT_MEMORY_MB = 1024
