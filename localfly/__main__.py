"""`python -m localfly`: serve the Machines API and the logs API on one port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiohttp import web
from pydantic import ValidationError

from localfly.faults import FaultConfig
from localfly.server import LocalFly


def images(pairs: list[str]) -> dict[str, str]:
    """Parse repeated REF=COMMAND options."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        ref, sep, command = pair.partition("=")
        if not sep or not ref or not command:
            raise SystemExit(f"--image takes REF=COMMAND, got {pair!r}")
        mapping[ref] = command
    return mapping


def faults(text: str | None) -> FaultConfig:
    """Parse the fault config from --faults or LOCALFLY_FAULTS."""
    text = text or os.environ.get("LOCALFLY_FAULTS")
    if not text:
        return FaultConfig()
    try:
        return FaultConfig.model_validate_json(text)
    except ValidationError as error:
        raise SystemExit(f"invalid fault config: {error}") from None


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGTERM or SIGINT, then kill every machine and stop."""
    localfly = LocalFly(
        images=images(args.image),
        faults=faults(args.faults),
        token=args.token,
        apps=set(args.apps.split(",")) if args.apps else None,
    )
    runner = web.AppRunner(localfly.application(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"localfly listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        localfly.fleet.kill_everything()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve."""
    p = argparse.ArgumentParser(prog="python -m localfly", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4280, help="0 picks a free port")
    p.add_argument("--image", action="append", default=[], metavar="REF=COMMAND")
    p.add_argument("--faults", help="fault config as JSON (or env LOCALFLY_FAULTS)")
    p.add_argument("--token", help="accept only this token (default: any non-empty token)")
    p.add_argument("--apps", help="comma-separated known apps (default: any valid name)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
