"""A prompt job's changes as its result: the patches its machine stored, read for `diff`.

The agent (agent/changes.py) stores one JSON document per job attempt under
`changes/<batch>/<job>/t<turn>-a<attempt>.json`: for each repository its path, URL, the commit it
was cloned at, files and lines changed, and the patch (base64, as `git apply` takes it).
"""

from __future__ import annotations

import base64
import binascii
import json

from pydantic import BaseModel, ConfigDict, ValidationError

from sortie.models import JobResult
from sortie.store import ObjectStore


class ChangesUnavailable(LookupError):
    """The job has no stored changes to show, or not for that repository."""


class RepoPatch(BaseModel):
    """One repository's change as stored."""

    model_config = ConfigDict(extra="ignore")

    path: str
    url: str | None = None
    commit: str | None = None
    files: int = 0
    insertions: int = 0
    deletions: int = 0
    patch: str | None = None
    withheld: bool = False
    """The change held a secret value as it is: the agent counted it but did not store it."""

    def data(self) -> bytes:
        """The patch's bytes."""
        if self.withheld:
            raise ChangesUnavailable(
                f"the change to {self.path} holds a secret value: it was not stored"
            )
        if self.patch is None:
            raise ChangesUnavailable(
                f"the change to {self.path} was too large to store: only its counts were kept"
            )
        try:
            return base64.b64decode(self.patch, validate=True)
        except binascii.Error:
            raise ChangesUnavailable(f"the stored change to {self.path} is garbled") from None


class StoredChanges(BaseModel):
    """Every repository's change of a job attempt."""

    model_config = ConfigDict(extra="ignore")

    repos: list[RepoPatch] = []


def latest_turn(result: JobResult) -> JobResult:
    """The job's last turn: its changes are the job's latest (a follow-up builds on the last)."""
    return result.followups[-1] if result.followups else result


async def job_patch(store: ObjectStore, result: JobResult, repo: str | None) -> RepoPatch:
    """The job's change to `repo` (a repository path; may be left out when it has one)."""
    turn = latest_turn(result)
    where = f"job {result.job_id}"
    if turn.changes is None or turn.changes.ref is None:
        raise ChangesUnavailable(f"{where} stored no changes (not a prompt job, or not finished)")
    data = await store.get(turn.changes.ref)
    if data is None:
        raise ChangesUnavailable(f"{where}: {turn.changes.ref} is no longer in the object store")
    try:
        stored = StoredChanges.model_validate(json.loads(data))
    except (ValueError, ValidationError):
        raise ChangesUnavailable(f"{where}: {turn.changes.ref} is not readable") from None
    paths = [r.path for r in stored.repos]
    if repo is None and len(stored.repos) == 1:
        return stored.repos[0]
    for found in stored.repos:
        if found.path == repo:
            return found
    asked = "name one with --repo" if repo is None else f"no repository {repo!r}"
    raise ChangesUnavailable(f"{where} changed {len(paths)} repositories ({asked}): {paths}")
