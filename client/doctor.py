"""`python starter.py doctor [FILE]`: is this setup ready for a batch, and what to fix if not.

Checks in order, one line each: Temporal (address, namespace, TLS or API key), the `BatchId`
search attribute, what the create pacing needs from the server, the workers polling the task
queue, the object store (a presigned round-trip), Fly (the token, each app, a batch file's
apps and images), Claude credentials and the secrets a batch file names. Names are printed,
never a secret's value.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta

import httpx
from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    DescribeTaskQueueRequest,
    GetSystemInfoRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.credentials import ClaudePool
from fly import FlyClient
from fly.exceptions import FlyError, FlyForbidden, FlyNotFound, FlyUnauthorized
from sortie.pacing import create_queue
from sortie.reaping import queue_schedule_id
from sortie.settings import Settings, TemporalConfigError, fly_connection, temporal_profile
from sortie.spec import BatchSpec, resolve_job
from sortie.store import ObjectStore, StoreError
from sortie.temporal import connect

CONNECT_TIMEOUT_S = 10.0
PACER_SINCE = (1, 28)
"""Update-with-start, which a create's turn from its app's pacer needs."""
FAIRNESS_SINCE = (1, 29)
"""The first Temporal server release with task-queue fairness (a batch's id as fairness key)."""


@dataclass(frozen=True)
class Check:
    """One line of the doctor's answer: ok, failed (with how to fix it), or skipped."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""

    def line(self) -> str:
        """✓ or ✗ (or - when skipped), the name, what was found, and how to fix it."""
        mark = {True: "✓", False: "✗", None: "-"}[self.ok]
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{mark} {self.name}: {self.detail}{fix}"


async def diagnose(
    spec: BatchSpec | None = None, environ: Mapping[str, str] | None = None
) -> list[Check]:
    """Every check, in order; those that need Temporal are skipped when it cannot be reached."""
    env = dict(os.environ if environ is None else environ)
    settings = Settings.from_env(env)
    checks: list[Check] = []
    client, temporal = await _temporal(settings, env)
    checks.append(temporal)
    if client is None:
        for name in ("search attribute", "create pacing", "workers", "reaper schedule"):
            checks.append(Check(name, None, "skipped: needs Temporal"))
    else:
        apps = _apps(settings, env, spec)
        checks.append(await _answered("search attribute", _search_attribute(client, settings)))
        checks.append(await _answered("create pacing", server_pacing(client, settings, apps)))
        checks.append(await _answered("workers", _workers(client, settings)))
        checks.append(await _answered("reaper schedule", reaper_schedule(client, settings)))
    checks.append(await _store(env))
    checks.append(await _fly(settings, env, spec))
    checks.append(_claude(env, spec))
    checks.append(_secrets(env, spec))
    return checks


def report(checks: list[Check], *, as_json: bool) -> tuple[str, int]:
    """The printed answer and the exit code: 0 when nothing failed, 2 otherwise."""
    failed = any(check.ok is False for check in checks)
    if as_json:
        text = json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2)
    else:
        text = "\n".join(check.line() for check in checks)
    return text, 2 if failed else 0


async def _answered(name: str, check: Awaitable[Check]) -> Check:
    """The check's answer; a server that refuses the question fails it with its reason."""
    try:
        return await check
    except RPCError as error:
        return Check(
            name, False, f"Temporal refused: {_first_line(error)}", "check the API key's role"
        )


async def _temporal(settings: Settings, env: Mapping[str, str]) -> tuple[Client | None, Check]:
    """Connect as the worker and the starter do, and ask for the namespace."""
    try:
        profile = temporal_profile(env)
    except TemporalConfigError as error:
        return None, Check("Temporal", False, str(error), "fix the profile file or unset it")
    security = "TLS" if profile.tls else "no TLS"
    if profile.api_key:
        security += ", API key from the profile or TEMPORAL_API_KEY"
    where = f"{settings.temporal_address}, namespace {settings.temporal_namespace} ({security})"
    fix = "start it (`make up`), or set TEMPORAL_ADDRESS / TEMPORAL_PROFILE to where it runs"
    try:
        client = await asyncio.wait_for(connect(settings, env), CONNECT_TIMEOUT_S)
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=settings.temporal_namespace),
            timeout=_timeout(),
        )
    except TimeoutError:
        return None, Check("Temporal", False, f"no answer from {where}", fix)
    except Exception as error:  # connection refused, TLS, auth, no such namespace: all said
        return None, Check("Temporal", False, f"cannot use {where}: {_first_line(error)}", fix)
    return client, Check("Temporal", True, where)


async def _search_attribute(client: Client, settings: Settings) -> Check:
    """Batches are listed by their `BatchId` keyword attribute."""
    answer = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=settings.temporal_namespace), timeout=_timeout()
    )
    if "BatchId" in answer.custom_attributes:
        return Check("search attribute", True, "BatchId registered")
    return Check(
        "search attribute",
        False,
        f"BatchId is not registered in namespace {settings.temporal_namespace}",
        "temporal operator search-attribute create --name BatchId --type Keyword",
    )


async def server_pacing(client: Client, settings: Settings, apps: list[str]) -> Check:
    """What the create pacing needs from the server: update-with-start for each app's
    `CreatePacerWorkflow` (1.28 or later); fairness between batches (1.29 or later) is a plus.
    The one place to change when the pacing needs change."""
    info = await client.workflow_service.get_system_info(GetSystemInfoRequest(), timeout=_timeout())
    version = info.server_version
    if version and _release(version) < PACER_SINCE:
        return Check(
            "create pacing",
            False,
            f"Temporal {version} has no update-with-start, which each app's pacer needs",
            "run Temporal 1.28 or later (1.29 or later for fairness between batches)",
        )
    if version and _release(version) < FAIRNESS_SINCE:
        return Check(
            "create pacing",
            True,
            f"Temporal {version}: paced by each app's pacer; no fairness, batches first come "
            "first served (1.29 or later has it)",
        )
    queue = create_queue(settings.task_queue, apps[0] if apps else "app")
    return Check(
        "create pacing", True, f"Temporal {version or '?'}: {queue} paced by its pacer workflow"
    )


async def pollers(client: Client, settings: Settings) -> list[str]:
    """The identities of the workers polling the task queue for workflows and activities."""
    found: set[str] = set()
    for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
        answer = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=settings.temporal_namespace,
                task_queue=TaskQueue(
                    name=settings.task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL
                ),
                task_queue_type=kind,
            ),
            timeout=_timeout(),
        )
        found.update(poller.identity for poller in answer.pollers)
    return sorted(found)


async def _workers(client: Client, settings: Settings) -> Check:
    """At least one worker polls the task queue batches are submitted to."""
    identities = await pollers(client, settings)
    if not identities:
        return Check(
            "workers",
            False,
            f"no worker polls task queue {settings.task_queue}",
            "start one (`make up`, or `python worker.py` with the same SORTIE_TASK_QUEUE)",
        )
    return Check(
        "workers",
        True,
        f"{len(identities)} polling task queue {settings.task_queue} ({', '.join(identities)})",
    )


async def reaper_schedule(client: Client, settings: Settings) -> Check:
    """The schedule that sweeps FLY_APP's orphaned machines: workers make it, and keep trying
    until it exists; said (not failed) when it does not exist yet."""
    if not settings.reaper:
        return Check("reaper schedule", None, "off (SORTIE_REAPER=off): orphans are not swept")
    sid = queue_schedule_id(settings.task_queue)
    try:
        described = await client.get_schedule_handle(sid).describe()
    except RPCError as error:
        if error.status is not RPCStatusCode.NOT_FOUND:
            raise
        return Check(
            "reaper schedule",
            None,
            f"no schedule {sid} yet: orphaned machines are not swept",
            "start a worker with FLY_APP set (it makes the schedule; its log says if it cannot)",
        )
    every = [i.every for i in described.schedule.spec.intervals]
    return Check("reaper schedule", True, f"{sid} every {every[0] if every else '?'}")


async def _store(env: Mapping[str, str]) -> Check:
    """The bucket answers to these keys, and a presigned PUT then GET round-trips an object."""
    store = ObjectStore.from_env(env)
    where = store.settings.describe()
    keys = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if env.get(name)]
    if env.get("BUCKET_NAME") and len(keys) < 2:
        missing = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} - set(keys)
        return Check(
            "object store",
            False,
            f"{where}: {', '.join(sorted(missing))} not set",
            "set the variables `fly storage create` printed",
        )
    key = f"doctor/{uuid.uuid4().hex}.txt"
    body = b"sortie doctor"
    try:
        await store.check()
        async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S) as http:
            put = await http.put(await store.presign_put(key, 300), content=body)
            get = await http.get(await store.presign_get(key, 300))
        await store.delete(key)
    except StoreError as error:
        return Check("object store", False, str(error), _store_fix(env))
    except Exception as error:  # whatever failed is this check's failure, shown with its fix
        return Check("object store", False, f"{where}: {_first_line(error)}", _store_fix(env))
    finally:
        await store.close()
    if put.status_code >= 300 or get.status_code >= 300 or get.content != body:
        return Check(
            "object store",
            False,
            f"{where}: a presigned PUT answered {put.status_code}, its GET {get.status_code}",
            "check SORTIE_S3_PUBLIC_URL and SORTIE_S3_ADDRESSING",
        )
    return Check("object store", True, f"{where}, presigned PUT and GET round-trip")


def _store_fix(env: Mapping[str, str]) -> str:
    if env.get("BUCKET_NAME"):
        return "check AWS_ENDPOINT_URL_S3, BUCKET_NAME and the keys (docs/real-fly.md)"
    return "start the local store (`make up`), or set BUCKET_NAME and the AWS_* variables"


async def _fly(settings: Settings, env: Mapping[str, str], spec: BatchSpec | None) -> Check:
    """The token is accepted and every app (FLY_APP, SORTIE_FLY_APPS, the file's) is known."""
    online = bool(env.get("FLY_API_TOKEN"))
    apps = _apps(settings, env, spec) or ["sortie-doctor"] * (not online)
    if not apps:
        return Check(
            "Fly",
            False,
            "FLY_API_TOKEN is set but no app is named",
            "set FLY_APP (docs/real-fly.md)",
        )
    fly_settings, token = fly_connection(env)
    where = "Fly" if online else f"localfly at {fly_settings.api_base_url} (FLY_API_TOKEN unset)"
    try:
        async with FlyClient.open(fly_settings, token) as fly:
            for app in apps:
                await fly.get_app(app)
    except (FlyNotFound, FlyUnauthorized, FlyForbidden) as error:
        return Check(
            "Fly",
            False,
            f"app {app!r} cannot be used: {_first_line(error)}",
            f"`fly apps create {app}`, or a FLY_API_TOKEN that may reach it",
        )
    except (FlyError, httpx.HTTPError, OSError) as error:
        fix = "check FLY_API_TOKEN" if online else "start localfly (`make up`)"
        return Check("Fly", False, f"{where}: {_first_line(error)}", fix)
    if not online:
        return Check("Fly", True, f"{where} answers")
    detail = f"token accepted, apps {', '.join(apps)} known"
    if spec is not None:
        missing = await _missing_images(spec, env)
        if missing:
            return Check(
                "Fly",
                False,
                f"{detail}; no such image: {', '.join(missing)}",
                "build and push agent/ (docs/real-fly.md)",
            )
    return Check("Fly", True, detail)


async def _missing_images(spec: BatchSpec, env: Mapping[str, str]) -> list[str]:
    """Images of the file's jobs in Fly's registry that the registry says do not exist."""
    images = sorted({resolve_job(spec.defaults, job, i).image for i, job in enumerate(spec.jobs)})
    token = env.get("FLY_API_TOKEN", "")
    missing: list[str] = []
    async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S, auth=("x", token)) as http:
        for image in images:
            if not image.startswith("registry.fly.io/"):
                continue  # other registries are not checked
            repository, _, tag = image.removeprefix("registry.fly.io/").partition(":")
            manifest = f"https://registry.fly.io/v2/{repository}/manifests/{tag or 'latest'}"
            answer = await http.head(manifest, headers={"Accept": MANIFESTS})
            if answer.status_code == 404:
                missing.append(image)
    return missing


MANIFESTS = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def _claude(env: Mapping[str, str], spec: BatchSpec | None) -> Check:
    """Claude credentials present here, by name (a batch with prompt jobs needs one)."""
    names = ClaudePool.from_env(env).names()
    prompts = spec is not None and any(
        job.prompt is not None or spec.defaults.prompt is not None for job in spec.jobs
    )
    if names:
        return Check("Claude", True, f"credentials {', '.join(names)}")
    if not env.get("FLY_API_TOKEN"):
        return Check(
            "Claude",
            True,
            "none set: offline, the stand-in `claude` answers prompt jobs "
            "(`make up` gives its worker a placeholder credential)",
        )
    if prompts:
        return Check(
            "Claude",
            False,
            "the batch has prompt jobs and no Claude credential is set",
            "set CLAUDE_CODE_OAUTH_TOKEN or ANTHROPIC_API_KEY where the worker runs",
        )
    return Check("Claude", True, "no credential set: command jobs only")


def _secrets(env: Mapping[str, str], spec: BatchSpec | None) -> Check:
    """The secrets the batch file names, set here (the worker reads its own environment)."""
    if spec is None:
        return Check("secrets", None, "no batch file given")
    names = spec.secret_names()
    if not names:
        return Check("secrets", True, "the batch names none")
    missing = [name for name in names if not env.get(name)]
    if missing:
        return Check(
            "secrets",
            False,
            f"not set: {', '.join(missing)}",
            "set them in the worker's environment (and here, to check them)",
        )
    return Check("secrets", True, f"{', '.join(names)} set")


def _apps(settings: Settings, env: Mapping[str, str], spec: BatchSpec | None) -> list[str]:
    """FLY_APP, SORTIE_FLY_APPS and the batch file's apps, in that order, once each."""
    named = [env.get("FLY_APP", ""), *settings.fly_apps, *(spec.fly_apps if spec else [])]
    return list(dict.fromkeys(app for app in named if app))


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a server version such as `1.29.1`."""
    parts = version.lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _timeout() -> timedelta:
    return timedelta(seconds=CONNECT_TIMEOUT_S)
