"""Fly's answers read: a success body validated against its model, Retry-After in seconds."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from fly.exceptions import (
    FlyAPIError,
)

ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_body(model: type[ModelT], response: httpx.Response) -> ModelT:
    """Validate a success body against its model, or fail as a (retryable) API oddity."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError as error:
        raise unexpected_body(response, error) from None


def unexpected_body(response: httpx.Response, error: ValidationError) -> FlyAPIError:
    """A 2xx whose body does not parse: likely a proxy or a partial response; retry may help."""
    return FlyAPIError(
        status_code=response.status_code,
        error_text=f"unexpected response body ({error.error_count()} validation errors)",
        method=response.request.method,
        path=response.request.url.path,
        request_id=response.headers.get("fly-request-id"),
        retryable=True,
    )


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
