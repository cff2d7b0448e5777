"""A prompt job's changes as its result: a patch per repository, and a branch pushed on request.

At the end of a prompt job, whatever its outcome, each checkout's change since the commit it was
cloned at (untracked files included, binary-safe, as `git apply` takes it) is uploaded to the
object store by the presigned SORTIE_CHANGES_URL, with its files and lines changed. With
`push_branch`, after Claude (and a passing `verify`) the change is committed on that branch and
pushed to the repository's origin, the job's GITHUB_TOKEN given to git as an HTTP header through
git's environment: never in a URL, the repository's config, a commit or a log.
Standard library only, like the rest of the agent.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.parse
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.entrypoint import Machine
    from agent.job import Checkout

CHANGES_URL = "SORTIE_CHANGES_URL"
"""The presigned PUT URL for the job attempt's changes (a secret like the others)."""
CHANGES_LIMIT = 32 << 20
"""Most patch bytes (all repositories together) uploaded; beyond it only the counts are."""
EXIT_PUSH_FAILED = 5
"""The entrypoint's exit code when a branch could not be pushed."""
AUTHOR = {
    "GIT_AUTHOR_NAME": "Sortie",
    "GIT_AUTHOR_EMAIL": "sortie@localhost",
    "GIT_COMMITTER_NAME": "Sortie",
    "GIT_COMMITTER_EMAIL": "sortie@localhost",
}
"""Who commits a pushed change, unless the job's env names someone."""


def stats(machine: Machine, checkout: Checkout, patch: bytes) -> dict[str, int]:
    """Files, inserted and deleted lines of a patch (`git apply --numstat`: binary files count
    as files, without lines)."""
    if not patch.strip():
        return {"files": 0, "insertions": 0, "deletions": 0}
    proc = subprocess.run(
        ["git", "apply", "--numstat", "-"],
        cwd=checkout.dir,
        env=machine.git_env,
        input=patch,
        capture_output=True,
        check=False,
    )
    files = insertions = deletions = 0
    for line in proc.stdout.decode("utf-8", errors="replace").splitlines():
        added, _, rest = line.partition("\t")
        deleted, _, _ = rest.partition("\t")
        files += 1
        insertions += int(added) if added.isdigit() else 0
        deletions += int(deleted) if deleted.isdigit() else 0
    return {"files": files, "insertions": insertions, "deletions": deletions}


def capture(machine: Machine) -> tuple[list[dict[str, Any]], bool]:
    """Every checkout's change, uploaded as one document; the counts per repository for the
    report, and whether the document reached the store."""
    repos: list[dict[str, Any]] = []
    patches: list[bytes] = []
    for checkout in machine.checkouts:
        try:
            patch = machine.patch(checkout)
        except (RuntimeError, OSError) as error:
            machine.note(f"changes of {checkout.path} not read: {error}")
            patch = b""
        entry = {**checkout.describe(), **stats(machine, checkout, patch)}
        if machine.scrub.holds(patch):
            machine.note(f"the change to {checkout.path} holds a secret value: not stored")
            entry["withheld"], patch = True, b""
        repos.append(entry)
        patches.append(patch)
    if not repos:
        return [], False
    whole = sum(len(patch) for patch in patches) <= CHANGES_LIMIT
    document = {
        "repos": [
            {
                **repo,
                "patch": None
                if not whole or repo.get("withheld")
                else base64.b64encode(patch).decode("ascii"),
            }
            for repo, patch in zip(repos, patches, strict=True)
        ]
    }
    if not whole:
        machine.note(f"the changes exceed {CHANGES_LIMIT} bytes: only their counts are stored")
    body = json.dumps(document).encode("utf-8")
    return repos, machine.upload(CHANGES_URL, "changes", body)


def auth_env(env: Mapping[str, str], url: str) -> dict[str, str]:
    """git's environment carrying the GITHUB_TOKEN header for the origin's own host only.

    GIT_CONFIG_COUNT/KEY/VALUE set config for one git process: nothing is written to disk, and
    the value is in no argv a process listing shows.
    """
    from agent.job import _basic_auth

    token = env.get("GITHUB_TOKEN")
    parts = urllib.parse.urlsplit(url)
    if not token or parts.scheme not in ("http", "https") or not parts.netloc:
        return {}
    origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"http.{origin}.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {_basic_auth(token)}",
    }


def push(
    machine: Machine, branch: str, job_id: str, withheld: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Commit each checkout's change on `branch` and push it to origin; per repository the
    branch and commit, or the error. A repository without changes is left alone; a branch that
    exists gets the change as a new commit on its tip."""
    return [
        {"path": c.path, "branch": branch, "error": f"the change to {c.path} holds a secret value"}
        if c.path in withheld
        else _push_one(machine, c, branch, job_id)
        for c in machine.checkouts
    ]


def _push_one(machine: Machine, checkout: Checkout, branch: str, job_id: str) -> dict[str, Any]:
    """Commit one checkout's change on `branch` and push it."""
    env = {**AUTHOR, **machine.git_env}
    entry: dict[str, Any] = {"path": checkout.path, "branch": branch}

    def git(args: Sequence[str], extra: Mapping[str, str] | None = None) -> int:
        return machine.git(args, checkout.dir, env={**env, **(extra or {})}).returncode

    auth = auth_env(machine.env, checkout.url)
    failed = git(["checkout", "-q", "-B", branch])
    if not failed and not git(["fetch", "-q", "origin", f"refs/heads/{branch}"], auth):
        # The branch exists (an earlier turn or attempt pushed it): build on its tip, so the
        # push is a fast-forward; the working tree, the job's change, stays as it is.
        failed = git(["reset", "-q", "--soft", "FETCH_HEAD"])
    failed = failed or git(["add", "-A"])
    if not failed and git(["diff", "--cached", "--quiet", "HEAD"]):
        failed = git(["commit", "-q", "-m", f"Sortie job {job_id}"])
    head = machine.git(["rev-parse", "HEAD"], checkout.dir).stdout.decode("ascii").strip()
    if failed:
        entry["error"] = f"could not commit the change on {branch} in {checkout.path}"
    elif head == checkout.commit:
        entry["branch"] = None
        entry["skipped"] = "no changes"
    elif code := git(["push", "-q", "origin", f"HEAD:refs/heads/{branch}"], auth):
        entry["error"] = f"git push of {branch} from {checkout.path} failed (exit {code})"
    else:
        entry["commit"] = head
        machine.note(f"pushed {head[:12]} to {branch} of {checkout.path}")
    return entry
