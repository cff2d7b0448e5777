"""Payload encryption: no prompt text in an exported history, the codec server reads it back."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.testing import WorkflowEnvironment

from client import batches
from client.stack import free_port, listening
from sortie.codec import (
    ENCODING,
    KEY_ID,
    DecryptionError,
    EncryptionCodec,
    KeysMisconfigured,
    codec_app,
    data_converter,
    new_key,
    parse_keys,
)
from sortie.spec import parse_batch
from sortie.temporal import connect
from tests.helpers.batches import settings_for
from tests.helpers.history import decoded_payloads
from tests.helpers.processes import WorkerProcess
from tests.helpers.stack import ROOT, TEMPORAL_CLI
from tests.helpers.waiting import eventually

OLD, NEW, OTHER = new_key("2026-01"), new_key("2026-12"), new_key("2026-12")


def codec(*entries: str) -> EncryptionCodec:
    return EncryptionCodec(parse_keys(",".join(entries)))


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


async def test_payloads_are_sealed_under_the_first_key_and_open_under_any() -> None:
    secret = f"private code {uuid.uuid4().hex}"
    [sealed] = await codec(OLD).encode([plain(secret)])
    assert sealed.metadata["encoding"] == ENCODING and sealed.metadata[KEY_ID] == b"2026-01"
    assert secret.encode() not in sealed.SerializeToString()
    [again] = await codec(OLD).encode([plain(secret)])
    assert again.data != sealed.data, "a fresh nonce for every payload"

    rotated = codec(NEW, OLD)
    assert await rotated.decode([sealed]) == [plain(secret)], "old histories stay readable"
    [newer] = await rotated.encode([plain(secret)])
    assert newer.metadata[KEY_ID] == b"2026-12"
    assert await rotated.decode([plain("as is")]) == [plain("as is")]


async def test_a_wrong_or_missing_key_fails_clearly() -> None:
    [sealed] = await codec(NEW).encode([plain("x")])
    with pytest.raises(DecryptionError, match=r"key '2026-12' does not decrypt.*wrong key"):
        await codec(OTHER).decode([sealed])
    with pytest.raises(DecryptionError, match=r"key '2026-12', which SORTIE_ENCRYPTION_KEYS"):
        await codec(OLD).decode([sealed])
    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(DecryptionError, match="altered"):
        await codec(NEW).decode([tampered])


def test_malformed_keys_are_refused_without_showing_them() -> None:
    short = base64.b64encode(b"k" * 16).decode()
    with pytest.raises(KeysMisconfigured, match="16 bytes, not 32") as caught:
        parse_keys(f"k1:{short}")
    assert short not in str(caught.value)
    with pytest.raises(KeysMisconfigured, match="not `id:base64key`"):
        parse_keys("justakey")
    with pytest.raises(KeysMisconfigured, match="not base64"):
        parse_keys("k1:%%%")
    assert data_converter({}).payload_codec is None, "off unless keys are set"
    assert isinstance(
        data_converter({"SORTIE_ENCRYPTION_KEYS": NEW}).payload_codec, EncryptionCodec
    )


@pytest.fixture
async def codec_server() -> AsyncIterator[tuple[str, EncryptionCodec]]:
    """The codec server's app on a loopback port, with the new and the old key."""
    ring = codec(NEW, OLD)
    runner = web.AppRunner(codec_app(ring, ["http://localhost:8233"]))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", ring
    finally:
        await runner.cleanup()


async def test_the_codec_server_encodes_decodes_and_answers_the_web_ui(
    codec_server: tuple[str, EncryptionCodec],
) -> None:
    url, _ = codec_server
    body = json_format.MessageToJson(Payloads(payloads=[plain("hello")]))
    async with httpx.AsyncClient() as http:
        encoded = await http.post(f"{url}/encode", content=body)
        assert encoded.status_code == 200
        sealed = json_format.Parse(encoded.text, Payloads()).payloads
        assert sealed[0].metadata["encoding"] == ENCODING
        decoded = await http.post(
            f"{url}/decode", content=encoded.text, headers={"X-Namespace": "default"}
        )
        assert json_format.Parse(decoded.text, Payloads()).payloads[0] == plain("hello")

        [foreign] = await codec(OTHER).encode([plain("x")])
        refused = await http.post(
            f"{url}/decode", content=json_format.MessageToJson(Payloads(payloads=[foreign]))
        )
        assert refused.status_code == 400 and "wrong key" in refused.json()["error"]

        preflight = await http.options(
            f"{url}/decode",
            headers={
                "Origin": "http://localhost:8233",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
        assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:8233"
        assert "x-namespace" in preflight.headers["Access-Control-Allow-Headers"]
        stranger = await http.options(f"{url}/decode", headers={"Origin": "http://evil.test"})
        assert "Access-Control-Allow-Origin" not in stranger.headers


async def test_python_m_sortie_codec_serves_until_terminated(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "SORTIE_ENCRYPTION_KEYS": NEW, "PYTHONWARNINGS": "error"}
    server = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "sortie.codec", "--address", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await eventually(lambda: listening("127.0.0.1", port), what="the codec server")
        [sealed] = await codec(NEW).encode([plain("round trip")])
        async with httpx.AsyncClient() as http:
            decoded = await http.post(
                f"http://127.0.0.1:{port}/decode",
                content=json_format.MessageToJson(Payloads(payloads=[sealed])),
            )
        assert json_format.Parse(decoded.text, Payloads()).payloads[0] == plain("round trip")
    finally:
        server.terminate()
        _, err = await asyncio.wait_for(server.communicate(), timeout=30)
    assert server.returncode == 0, err.decode()
    assert NEW.partition(":")[2] not in err.decode()

    unset = {k: v for k, v in os.environ.items() if k != "SORTIE_ENCRYPTION_KEYS"}
    refused = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "sortie.codec"],
        cwd=ROOT,
        env=unset,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(refused.communicate(), timeout=30)
    assert refused.returncode == 2 and "set SORTIE_ENCRYPTION_KEYS" in err.decode()


async def _cli(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(TEMPORAL_CLI), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.slow
async def test_no_prompt_text_in_an_encrypted_history(
    temporal: WorkflowEnvironment,
    localfly: Any,
    app_name: str,
    tmp_path: Path,
    codec_server: tuple[str, EncryptionCodec],
) -> None:
    url, _ = codec_server
    address = temporal.client.service_client.config.target_host
    settings = settings_for(address).model_copy(update={"state_dir": tmp_path / "state"})
    keys = {"SORTIE_ENCRYPTION_KEYS": f"{NEW},{OLD}"}
    marker = f"confidential-{uuid.uuid4().hex}"
    worker = WorkerProcess(
        settings,
        localfly.url,
        tmp_path / "worker.log",
        env={**keys, "CLAUDE_CODE_OAUTH_TOKEN": f"sk-ant-oat01-{uuid.uuid4().hex}"},
    ).start()
    spec = parse_batch(
        {
            "name": f"e{uuid.uuid4().hex[:8]}",
            "app": app_name,
            "max_machines": 2,
            "defaults": {"timeout": "2m"},
            "jobs": [
                {"id": "review", "prompt": f"Review {marker}"},
                {"id": "fails", "command": f"echo {marker}-out; exit 3", "retries": 0},
            ],
        }
    )
    client = await connect(settings, keys)
    try:
        submitted = await batches.submit(client, settings, spec)
        await batches.batch_handle(client, submitted.batch_id).result()
        report = await batches.results(client, submitted.batch_id, store=settings.blob_store())
        progress = await batches.progress(client, submitted.batch_id)
    finally:
        worker.stop()
    assert report.results[0].state == "succeeded" and marker in (report.results[0].result or "")
    ids = [submitted.batch_id, *(chunk.workflow_id for chunk in progress.chunks)]

    for workflow_id in ids:
        raw = await _cli("workflow", "show", "-w", workflow_id, "-o", "json", "--address", address)
        texts = [raw, *decoded_payloads(json.loads(raw))]
        assert not [t for t in texts if marker in t], f"prompt text in {workflow_id}'s history"
        assert base64.b64encode(ENCODING).decode() in raw, "metadata says encrypted"

    readable = []
    for workflow_id in ids:
        shown = await _cli(
            *("workflow", "show", "-w", workflow_id, "-o", "json", "--address", address),
            *("--codec-endpoint", url),
        )
        readable.append("\n".join([shown, *decoded_payloads(json.loads(shown))]))
    assert any(marker in text for text in readable), "the codec server decodes it back"

    wrong = await connect(settings, {"SORTIE_ENCRYPTION_KEYS": OTHER})
    with pytest.raises(Exception, match="wrong key") as caught:
        await batches.batch_handle(wrong, submitted.batch_id).result()
    assert marker not in str(caught.value)
