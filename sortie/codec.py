"""The data converter every Sortie client uses, and the optional AES-GCM payload encryption.

With SORTIE_ENCRYPTION_KEYS set (`id:base64key`, comma separated, the first encrypts, all
decrypt), every payload (inputs, results, heartbeats, signals, memos, UI summaries, failure
messages) reaches Temporal encrypted with AES-256-GCM under a random nonce; the key id travels in
the payload's metadata, so keys rotate by putting a new one first and keeping the old ones until
the histories they wrote are gone. The worker, the starter and the tests all get their converter
from `data_converter`.

`python -m sortie.codec` serves `/encode` and `/decode` for the Web UI (its codec endpoint
setting) and the CLI (`temporal workflow show --codec-endpoint URL`); `--new-key` prints a key.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hmac
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

KEYS_VARIABLE = "SORTIE_ENCRYPTION_KEYS"
ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
DEFAULT_ADDRESS = "127.0.0.1:8081"
DEFAULT_ORIGINS = "http://localhost:8233,http://localhost:8080"


class KeysMisconfigured(ValueError):
    """SORTIE_ENCRYPTION_KEYS is malformed; says which entry, never a key."""


class DecryptionError(ValueError):
    """A payload that these keys cannot decrypt, with the key id it names."""


def parse_keys(text: str) -> dict[str, bytes]:
    """`id:base64key,...` into ids and 32-byte keys, in order (the first one encrypts)."""
    keys: dict[str, bytes] = {}
    for n, entry in enumerate(e.strip() for e in text.split(",") if e.strip()):
        key_id, sep, encoded = entry.partition(":")
        if not sep or not key_id:
            raise KeysMisconfigured(f"{KEYS_VARIABLE} entry {n + 1} is not `id:base64key`")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise KeysMisconfigured(f"{KEYS_VARIABLE} key {key_id!r} is not base64") from None
        if len(key) != 32:
            raise KeysMisconfigured(f"{KEYS_VARIABLE} key {key_id!r} has {len(key)} bytes, not 32")
        keys[key_id] = key
    if not keys:
        raise KeysMisconfigured(f"{KEYS_VARIABLE} holds no key")
    return keys


def new_key(key_id: str) -> str:
    """A fresh `id:base64key` entry for SORTIE_ENCRYPTION_KEYS."""
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over each serialized payload; the key id is metadata and associated data."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._ids = list(keys)
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}

    def __repr__(self) -> str:
        return f"EncryptionCodec(key ids {self._ids})"

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt every payload with the first key."""
        key_id = self._ids[0]
        cipher = self._ciphers[key_id]
        encoded = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), key_id.encode())
            encoded.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID: key_id.encode()},
                    data=nonce + sealed,
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt the encrypted payloads (any known key id); pass the others through."""
        return [self._decode_one(p) for p in payloads]

    def _decode_one(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise DecryptionError(
                f"payload encrypted with key {key_id!r}, which {KEYS_VARIABLE} does not hold "
                f"(it holds {', '.join(map(repr, self._ids))})"
            )
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, key_id.encode())
        except InvalidTag:
            raise DecryptionError(
                f"payload encrypted with key {key_id!r} does not decrypt with the key of that id "
                f"in {KEYS_VARIABLE}: wrong key, or an altered payload"
            ) from None
        return Payload.FromString(plain)


def codec_from_env(environ: Mapping[str, str]) -> EncryptionCodec | None:
    """The codec for SORTIE_ENCRYPTION_KEYS, or None when encryption is off."""
    text = environ.get(KEYS_VARIABLE, "").strip()
    return EncryptionCodec(parse_keys(text)) if text else None


def data_converter(environ: Mapping[str, str]) -> DataConverter:
    """The converter for the worker, the starter and the tests alike."""
    codec = codec_from_env(environ)
    if codec is None:
        return pydantic_data_converter
    # Failure messages and stack traces can quote a prompt: they move into the encrypted part.
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def codec_app(
    codec: PayloadCodec, origins: Iterable[str] = (), auth: str | None = None
) -> web.Application:
    """`/encode` and `/decode` over JSON Payloads, with CORS for the Web UI's origins."""
    allowed = {o.rstrip("/") for o in origins}

    def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if origin.rstrip("/") in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = (
                "content-type,x-namespace,authorization"
            )
            response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    def authorised(request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        return auth is None or hmac.compare_digest(given.encode(), auth.encode())

    def handler(encode: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.method == "OPTIONS":
                return cors(request, web.Response())
            if not authorised(request):
                return cors(request, web.json_response({"error": "unauthorised"}, status=401))
            try:
                payloads = json_format.Parse(await request.text(), Payloads())
            except json_format.ParseError as error:
                return cors(request, web.json_response({"error": str(error)}, status=400))
            try:
                converted = await (codec.encode if encode else codec.decode)(payloads.payloads)
            except DecryptionError as error:
                return cors(request, web.json_response({"error": str(error)}, status=400))
            body = json_format.MessageToJson(Payloads(payloads=converted))
            return cors(request, web.Response(text=body, content_type="application/json"))

        return handle

    app = web.Application()
    for name, encode in (("encode", True), ("decode", False)):
        app.router.add_route("POST", f"/{name}", handler(encode))
        app.router.add_route("OPTIONS", f"/{name}", handler(encode))
    return app


async def serve(address: str, app: web.Application, stop: asyncio.Event) -> None:
    """Serve the codec app at host:port until `stop` is set."""
    host, port = address.rsplit(":", 1)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, int(port)).start()
        print(f"codec server on http://{address} (/encode, /decode)", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


async def _main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then serve or print a key."""
    p = argparse.ArgumentParser(prog="python -m sortie.codec", description=__doc__.splitlines()[0])
    p.add_argument("--address", default=os.environ.get("SORTIE_CODEC_ADDRESS", DEFAULT_ADDRESS))
    p.add_argument(
        "--origins",
        default=os.environ.get("SORTIE_CODEC_ORIGINS", DEFAULT_ORIGINS),
        help="Web UI origins allowed to call it, comma separated",
    )
    p.add_argument("--new-key", metavar="ID", help="print a new SORTIE_ENCRYPTION_KEYS entry")
    args = p.parse_args(argv)
    if args.new_key:
        print(new_key(args.new_key))
        return 0
    try:
        codec = codec_from_env(os.environ)
    except KeysMisconfigured as error:
        print(error, file=sys.stderr)
        return 2
    if codec is None:
        print(f"set {KEYS_VARIABLE} to the worker's keys", file=sys.stderr)
        return 2
    auth = os.environ.get("SORTIE_CODEC_AUTH") or None
    app = codec_app(codec, args.origins.split(","), auth)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(args.address, app, stop)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
