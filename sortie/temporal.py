"""Connecting to Temporal the same way from the worker, the starter and the tests.

Where Temporal is and how to authenticate come from Temporal's own environment configuration
(`temporalio.envconfig`): the profile file (`TEMPORAL_CONFIG_FILE`, by default
`~/.config/temporalio/temporal.toml`), `TEMPORAL_PROFILE`, and the `TEMPORAL_ADDRESS`,
`TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY` and `TEMPORAL_TLS_*` variables that override it. The same
profile serves the `temporal` CLI.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from collections.abc import Coroutine, Mapping
from typing import Any, NoReturn

from temporalio.client import Client
from temporalio.envconfig import ClientConnectConfig
from temporalio.runtime import Runtime

from sortie.codec import data_converter
from sortie.settings import Settings, temporal_profile


def connect_options(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> ClientConnectConfig:
    """Client.connect's arguments: TLS, API key and gRPC metadata of the profile, with the
    address and namespace the settings resolved (from that same profile unless set by hand)."""
    options = temporal_profile(environ).to_client_connect_config()
    options["target_host"] = settings.temporal_address
    options["namespace"] = settings.temporal_namespace
    return options


async def connect(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    runtime: Runtime | None = None,
) -> Client:
    """A client that speaks pydantic models (encrypted when keys are configured)."""
    env = os.environ if environ is None else environ
    return await Client.connect(
        **connect_options(settings, env),
        data_converter=data_converter(env),
        runtime=runtime,
    )


def run_main(main: Coroutine[Any, Any, int | None]) -> NoReturn:
    """Run a command and exit without interpreter finalisation.

    The Temporal SDK's Rust threads can crash a finishing interpreter after a fully successful
    run (temporalio/sdk-python#300). Flushing and leaving with os._exit keeps the exit code the
    command decided. A SystemExit (argparse's for `--help` and usage errors) keeps its code and
    shows no traceback; any other exception is a crash and shows its traceback.
    """
    try:
        code = asyncio.run(main) or 0
    except KeyboardInterrupt:
        code = 130
    except SystemExit as done:
        code = _exit_code(done)
    except BaseException:  # printed whole, and the exit code says it failed
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(done: SystemExit) -> int:
    """The status a SystemExit asks for, as `sys.exit` would give it."""
    if done.code is None or isinstance(done.code, int):
        return done.code or 0
    print(done.code, file=sys.stderr)
    return 1
