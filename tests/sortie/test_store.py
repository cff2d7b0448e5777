"""The object store against a real S3-protocol server (moto, the session's): keys, prefixes,
presigned uploads, and configuration by the variables Tigris sets."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import pytest

from sortie.store import StoreCredentials, StoreSettings, shared_store


def test_tigris_variables_are_taken_as_they_are() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "tid_abc",
        "AWS_SECRET_ACCESS_KEY": "tsec_xyz",
        "AWS_ENDPOINT_URL_S3": "https://fly.storage.tigris.dev",
        "AWS_REGION": "auto",
        "BUCKET_NAME": "my-sortie",
    }
    settings = StoreSettings.from_env(env)
    assert (settings.endpoint_url, settings.bucket, settings.region) == (
        "https://fly.storage.tigris.dev",
        "my-sortie",
        "auto",
    )
    assert not settings.offline
    assert settings.describe() == "bucket 'my-sortie' at https://fly.storage.tigris.dev"
    credentials = StoreCredentials.from_env(env)
    assert credentials.access_key_id == "tid_abc" and "tsec_xyz" not in repr(credentials)
    assert "tsec_xyz" not in settings.model_dump_json(), "settings hold no secret"
    offline = StoreSettings.from_env({})
    assert offline.offline and offline.bucket == "sortie"


async def test_objects_prefixes_and_deletes() -> None:
    store = shared_store(StoreSettings.from_env())
    base = f"t/{uuid.uuid4().hex}"
    await asyncio.gather(
        store.put(f"{base}/a/1.txt", b"one", {"batch": "b1"}),
        store.put(f"{base}/a/2.txt", b"two"),
        store.put(f"{base}/b/3.txt", b"three"),
    )
    assert await store.get(f"{base}/a/1.txt") == b"one"
    assert await store.metadata(f"{base}/a/1.txt") == {"batch": "b1"}
    assert await store.get(f"{base}/nope") is None and await store.metadata(f"{base}/x") is None
    assert await store.prefixes(base) == [f"{base}/a", f"{base}/b"]
    assert [o.key async for o in store.objects(f"{base}/a")] == [
        f"{base}/a/1.txt",
        f"{base}/a/2.txt",
    ]
    assert await store.delete(f"{base}/a") is True
    assert await store.prefixes(base) == [f"{base}/b"]
    assert await store.delete(f"{base}/a") is False
    with pytest.raises(ValueError):
        await store.put("../escape", b"x")


async def test_a_presigned_put_writes_exactly_one_object() -> None:
    store = shared_store(StoreSettings.from_env())
    key = f"t/{uuid.uuid4().hex}/report.json"
    url = await store.presign_put(key, 60)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url, "SigV4, as Tigris needs"
    request = urllib.request.Request(
        url,
        data=b'{"ok": true}',
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    await asyncio.to_thread(lambda: urllib.request.urlopen(request).close())
    assert await store.get(key) == b'{"ok": true}'
    read = await store.presign_get(key, 60)
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(read).read())
    assert body == b'{"ok": true}'
