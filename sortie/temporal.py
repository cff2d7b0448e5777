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
    command decided.
    """
    try:
        code = asyncio.run(main) or 0
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
