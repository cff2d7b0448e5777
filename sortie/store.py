"""The object store every worker and the starter share: any S3 endpoint (Tigris, MinIO, AWS).

History holds a job's small result and keys into this store: long answers, log tails, the
agent's reports, session archives and a batch's jobs (its claim check) live here, so any worker
or starter on any host reads what another wrote. Keys are deterministic per (batch, job, turn,
attempt), so a collect retried after a crash rewrites the same object instead of adding one.

Configured as Tigris' `fly storage create` sets it: AWS_ENDPOINT_URL_S3, BUCKET_NAME,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (SORTIE_S3_ADDRESSING: path, the default,
or virtual; SORTIE_S3_PUBLIC_URL: the endpoint as machines reach it, when the worker reaches the
store by another name, e.g. MinIO in docker-compose). Without BUCKET_NAME Sortie is offline:
the bucket `sortie` on the loopback S3 server the stack starts (moto, SORTIE_LOCAL_S3_URL). The
client is aiobotocore's, one per process and event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

_Opened = tuple[AsyncExitStack, "S3Client"]
OFFLINE_URL = "http://127.0.0.1:4281"
OFFLINE_BUCKET = "sortie"
OFFLINE_REGION = "us-east-1"
OFFLINE_KEY = "sortie-offline"
"""moto takes any credentials; these only have to be present."""
MISSING = {"404", "NoSuchKey", "NotFound"}
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class StoreError(RuntimeError):
    """The object store refused or could not be reached; names the endpoint and bucket."""


class StoreSettings(BaseModel):
    """Where the bucket is; holds no secret (the keys stay in StoreCredentials)."""

    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = OFFLINE_URL
    bucket: str = OFFLINE_BUCKET
    region: str = OFFLINE_REGION
    addressing: Literal["path", "virtual"] = "path"
    public_url: str | None = None
    """The endpoint presigned URLs name, when machines reach the store by another address."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreSettings:
        """AWS's variable names as Tigris sets them; the loopback store without BUCKET_NAME."""
        env = os.environ if environ is None else environ
        if not env.get("BUCKET_NAME"):
            return cls(endpoint_url=env.get("SORTIE_LOCAL_S3_URL") or OFFLINE_URL)
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            bucket=env["BUCKET_NAME"],
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "auto",
            addressing="virtual" if env.get("SORTIE_S3_ADDRESSING") == "virtual" else "path",
            public_url=env.get("SORTIE_S3_PUBLIC_URL") or None,
        )

    @property
    def offline(self) -> bool:
        """Whether this is the stack's loopback store."""
        return (self.endpoint_url or "").startswith("http://127.0.0.1")

    def describe(self) -> str:
        """The bucket and endpoint, for error messages (never a key)."""
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"


@dataclass(frozen=True)
class StoreCredentials:
    """The access key pair, from the environment; None leaves botocore's own chain to find one."""

    access_key_id: str | None
    secret_access_key: str | None

    def __repr__(self) -> str:
        return "StoreCredentials(<values hidden>)"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreCredentials:
        """AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; offline placeholders without BUCKET_NAME."""
        env = os.environ if environ is None else environ
        if not env.get("BUCKET_NAME"):
            return cls(
                env.get("AWS_ACCESS_KEY_ID") or OFFLINE_KEY,
                env.get("AWS_SECRET_ACCESS_KEY") or OFFLINE_KEY,
            )
        return cls(env.get("AWS_ACCESS_KEY_ID") or None, env.get("AWS_SECRET_ACCESS_KEY") or None)

    def values(self) -> list[str]:
        """The secret values, for scrubbing."""
        return [v for v in (self.secret_access_key,) if v]


@dataclass(frozen=True)
class StoredObject:
    """One object under a prefix: its key, size and when it was last written."""

    key: str
    size: int
    modified: datetime


class ObjectStore:
    """Objects addressed by slash-separated keys in one bucket; writes replace whole objects."""

    def __init__(self, settings: StoreSettings, credentials: StoreCredentials) -> None:
        self.settings = settings
        self._credentials = credentials
        self._clients: dict[tuple[asyncio.AbstractEventLoop, bool], asyncio.Task[_Opened]] = {}

    def __repr__(self) -> str:
        return f"ObjectStore({self.settings.describe()})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ObjectStore:
        """The store the environment names."""
        return cls(StoreSettings.from_env(environ), StoreCredentials.from_env(environ))

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    async def check(self) -> None:
        """Raise StoreError unless the bucket answers to these credentials (worker start)."""
        try:
            client = await self._client()
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = _code(error)
            why = {
                "404": "no such bucket (create it, e.g. `fly storage create`)",
                "NoSuchBucket": "no such bucket (create it, e.g. `fly storage create`)",
                "403": "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                "InvalidAccessKeyId": "unknown access key: check AWS_ACCESS_KEY_ID",
                "SignatureDoesNotMatch": "wrong secret key: check AWS_SECRET_ACCESS_KEY",
            }.get(code, f"refused ({code})")
            raise StoreError(f"the object store ({self.settings.describe()}): {why}") from None
        except (BotoCoreError, OSError) as error:
            raise StoreError(
                f"the object store ({self.settings.describe()}) cannot be reached: {error}"
            ) from None

    async def put(self, key: str, data: bytes, metadata: Mapping[str, str] | None = None) -> str:
        """Write `data` under `key` (replacing any earlier object) and return the key."""
        client = await self._client()
        await client.put_object(
            Bucket=self.bucket, Key=_checked(key), Body=data, Metadata=dict(metadata or {})
        )
        return key

    async def get(self, key: str) -> bytes | None:
        """The object under `key`, or None when there is none (never written, or expired)."""
        client = await self._client()
        try:
            response = await client.get_object(Bucket=self.bucket, Key=_checked(key))
        except ClientError as error:
            if _code(error) in MISSING:
                return None
            raise
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def metadata(self, key: str) -> dict[str, str] | None:
        """The user metadata of the object under `key`, None when there is no such object."""
        client = await self._client()
        try:
            head = await client.head_object(Bucket=self.bucket, Key=_checked(key))
        except ClientError as error:
            if _code(error) in MISSING:
                return None
            raise
        return dict(head.get("Metadata", {}))

    async def objects(self, prefix: str) -> AsyncIterator[StoredObject]:
        """Every object under `prefix/`, in key order."""
        client = await self._client()
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{_checked(prefix)}/"
        )
        async for page in pages:
            for item in page.get("Contents", []):
                yield StoredObject(item["Key"], item["Size"], item["LastModified"])

    async def prefixes(self, prefix: str) -> list[str]:
        """The keys of the "directories" directly under `prefix` (e.g. one per batch)."""
        client = await self._client()
        found: list[str] = []
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{_checked(prefix)}/", Delimiter="/"
        )
        async for page in pages:
            found += [p["Prefix"].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(found)

    async def delete(self, prefix: str) -> bool:
        """Delete the object `prefix` and every object under `prefix/`; whether there was any."""
        client = await self._client()
        keys = [o.key async for o in self.objects(prefix)]
        if await self.metadata(prefix) is not None:
            keys.append(prefix)
        for start in range(0, len(keys), 1000):
            await client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in keys[start : start + 1000]]},
            )
        return bool(keys)

    async def presign_put(self, key: str, expires_s: int) -> str:
        """A URL that lets its holder PUT one object under `key` until it expires; a secret."""
        client = await self._client(public=True)
        return await client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": _checked(key)}, ExpiresIn=expires_s
        )

    async def presign_get(self, key: str, expires_s: int) -> str:
        """A URL that lets its holder GET the object under `key` until it expires; a secret."""
        client = await self._client(public=True)
        return await client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": _checked(key)}, ExpiresIn=expires_s
        )

    async def close(self) -> None:
        """Close this event loop's clients (a later call opens new ones)."""
        loop = asyncio.get_running_loop()
        for public in (False, True):
            task = self._clients.pop((loop, public), None)
            if task is not None:
                stack, _ = await task
                await stack.aclose()
        self._clients = {key: t for key, t in self._clients.items() if not key[0].is_closed()}

    async def _client(self, *, public: bool = False) -> S3Client:
        """This event loop's client, opened on first use (concurrent first uses share it);
        `public`: the one that signs URLs for machines, on SORTIE_S3_PUBLIC_URL when set."""
        key = (asyncio.get_running_loop(), public and self.settings.public_url is not None)
        task = self._clients.get(key)
        if task is None:
            task = self._clients[key] = key[0].create_task(self._open(public=key[1]))
        try:
            _, client = await asyncio.shield(task)
        except BaseException:  # raised as it came; a failed open is tried afresh next time
            if task.done():
                self._clients.pop(key, None)
            raise
        return client

    async def _open(self, *, public: bool) -> _Opened:
        stack = AsyncExitStack()
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": self.settings.addressing},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=200,
        )
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=self.settings.public_url if public else self.settings.endpoint_url,
                region_name=self.settings.region,
                aws_access_key_id=self._credentials.access_key_id,
                aws_secret_access_key=self._credentials.secret_access_key,
                config=config,
            )
        )
        return stack, client


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _checked(key: str) -> str:
    if not _KEY.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"invalid object key {key!r}")
    return key


def answer_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where a job's full answer is kept."""
    return f"answers/{batch_id}/{job_id}/t{turn}-a{attempt}.txt"


def log_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where the tail of a job attempt's logs is kept."""
    return f"logs/{batch_id}/{job_id}/t{turn}-a{attempt}.txt"


def notice_key(delivery: str) -> str:
    """Where a batch's webhook notice is marked delivered (`delivery`: `<batch>/<event>`)."""
    return f"notices/{delivery}.json"


def changes_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where a prompt job attempt's changes are kept: a patch per repository, beside its answer."""
    return f"changes/{batch_id}/{job_id}/t{turn}-a{attempt}.json"


REPORTS = "reports"


def report_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where the agent uploads a prompt job attempt's report (through a presigned URL)."""
    return f"{REPORTS}/{batch_id}/{job_id}/t{turn}-a{attempt}.json"


def spend_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """What a running attempt's verify loop has spent so far (the agent uploads it after every
    turn, `finish_job` reads it); swept as reports."""
    return f"{REPORTS}/{batch_id}/{job_id}/t{turn}-a{attempt}.spend.json"


def finished_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """What `finish_job` learned of an attempt's machine before destroying it; swept as reports."""
    return f"{REPORTS}/{batch_id}/{job_id}/t{turn}-a{attempt}.finished.json"


SESSIONS = "sessions"


def session_prefix(batch_id: str) -> str:
    """Where a batch's session archives are kept: deleted with the batch unless kept longer."""
    return f"{SESSIONS}/{batch_id}"


def session_key(batch_id: str, job_id: str, turn: int, attempt: int) -> str:
    """Where the workspace and Claude session a job's turn left are kept."""
    return f"{session_prefix(batch_id)}/{job_id}/t{turn}-a{attempt}.tar.gz"


KEEP_UNTIL = "keep-until"
"""The object under a batch's session prefix that says until when its archives are kept."""


_OPEN: dict[StoreSettings, ObjectStore] = {}


def shared_store(settings: StoreSettings) -> ObjectStore:
    """The process's one store for `settings`, its keys read from the environment."""
    store = _OPEN.get(settings)
    if store is None:
        store = _OPEN[settings] = ObjectStore(settings, StoreCredentials.from_env())
    return store


async def close_shared() -> None:
    """Close the process's shared stores' clients on this event loop (at exit)."""
    for store in _OPEN.values():
        await store.close()
