"""Connecting to Temporal the same way from the worker, the starter and the tests."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import traceback
from collections.abc import Coroutine
from typing import Any, NoReturn

from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    StartWorkflowInput,
    WorkflowHandle,
)
from temporalio.common import PinnedVersioningOverride, WorkerDeploymentVersion
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import WorkerDeploymentConfig

from sortie.settings import Settings


async def connect(settings: Settings) -> Client:
    """A client that speaks pydantic models, for the configured namespace."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


def pinning_starts(client: Client, deployment: WorkerDeploymentConfig | None) -> Client:
    """The worker's client: the workflows it starts are pinned to the worker's own build.

    A batch starts its chunks from an activity, which runs on the batch's build; without the
    override a chunk started after a newer build became current would run that build's code
    under a batch pinned to the old one. Unversioned (None): the client as it is.
    """
    if deployment is None:
        return client
    config = client.config()
    config["interceptors"] = [*config["interceptors"], _PinStarts(deployment.version)]
    return Client(**config)


class _PinStarts(Interceptor):
    def __init__(self, version: WorkerDeploymentVersion) -> None:
        self._override = PinnedVersioningOverride(version)

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _PinnedStarts(next, self._override)


class _PinnedStarts(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, override: PinnedVersioningOverride) -> None:
        super().__init__(next)
        self._override = override

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        if input.versioning_override is None:
            input = dataclasses.replace(input, versioning_override=self._override)
        return await super().start_workflow(input)


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
