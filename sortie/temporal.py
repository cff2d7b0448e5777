"""Connecting to Temporal the same way from the worker, the starter and the tests."""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from collections.abc import Coroutine
from typing import Any, NoReturn

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from sortie.settings import Settings


async def connect(settings: Settings) -> Client:
    """A client that speaks pydantic models, for the configured namespace."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
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
    except BaseException:
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
