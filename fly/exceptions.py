"""Errors raised by the Fly client, classified so retry policies can act on them.

Every error carries ``retryable`` (would the same call plausibly succeed later?) and
``retry_after`` (seconds the server asked us to wait, when it said so). Messages never contain
the API token.

    FlyError
    ├── FlyConfigError            missing token, bad settings; not retryable
    ├── FlyTransportError         connect/read errors, timeouts, dropped connection; retryable
    └── FlyAPIError               .status_code .error_text .request_id .method .path
        ├── FlyRateLimited        429; retryable
        ├── FlyServerError        5xx; retryable
        ├── FlyWaitTimeout        408 from wait: "not yet"; retryable
        ├── FlyBadRequest         400
        ├── FlyUnauthorized       401
        ├── FlyForbidden          403
        ├── FlyNotFound           404
        │   └── FlyAppNotFound    404 on app, create or list: the app itself is unknown
        ├── FlyConflict           409 (name taken, lease held)
        ├── FlyPreconditionFailed 412
        └── FlyUnprocessable      422

Any other 4xx is a plain, non-retryable ``FlyAPIError``.
"""

from __future__ import annotations

__all__ = [
    "FlyAPIError",
    "FlyAppNotFound",
    "FlyBadRequest",
    "FlyConfigError",
    "FlyConflict",
    "FlyError",
    "FlyForbidden",
    "FlyNotFound",
    "FlyPreconditionFailed",
    "FlyRateLimited",
    "FlyServerError",
    "FlyTransportError",
    "FlyUnauthorized",
    "FlyUnprocessable",
    "FlyWaitTimeout",
    "error_for_status",
]


class FlyError(Exception):
    """Base of every error the Fly client raises."""

    retryable: bool = False

    def __init__(
        self, message: str, *, retryable: bool | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after


class FlyConfigError(FlyError):
    """The client is misconfigured (no token, bad setting); retrying cannot help."""


class FlyTransportError(FlyError):
    """The request or its response was lost on the wire; the call may or may not have happened."""

    retryable = True


class FlyAPIError(FlyError):
    """The API answered with an error status."""

    def __init__(
        self,
        *,
        status_code: int,
        error_text: str,
        method: str,
        path: str,
        request_id: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.error_text = error_text
        self.method = method
        self.path = path
        self.request_id = request_id
        message = f"{method} {path} -> {status_code}: {error_text or '(no error text)'}"
        if request_id:
            message += f" [fly-request-id {request_id}]"
        super().__init__(message, retryable=retryable, retry_after=retry_after)


class FlyRateLimited(FlyAPIError):
    """429: over Fly's rate limit; retry after ``retry_after`` or a backoff."""

    retryable = True


class FlyServerError(FlyAPIError):
    """5xx: a platform-side failure, usually transient."""

    retryable = True


class FlyWaitTimeout(FlyAPIError):
    """408 from wait, or a client-side wait deadline: the machine has not reached the state yet."""

    retryable = True


class FlyBadRequest(FlyAPIError):
    """400: the request is invalid as sent."""


class FlyUnauthorized(FlyAPIError):
    """401: the token is missing or invalid."""


class FlyForbidden(FlyAPIError):
    """403: the token lacks access, or an org quota refuses the request."""


class FlyNotFound(FlyAPIError):
    """404: the machine (or app) does not exist, or no longer does."""


class FlyAppNotFound(FlyNotFound):
    """404 on create or list: the app itself is unknown."""


class FlyConflict(FlyAPIError):
    """409: the machine name is taken or a lease is held by someone else."""


class FlyPreconditionFailed(FlyAPIError):
    """412: the machine is not in a state that allows the request."""


class FlyUnprocessable(FlyAPIError):
    """422: validation failed (org machine limit, bad config)."""


_BY_STATUS: dict[int, type[FlyAPIError]] = {
    400: FlyBadRequest,
    401: FlyUnauthorized,
    403: FlyForbidden,
    404: FlyNotFound,
    408: FlyWaitTimeout,
    409: FlyConflict,
    412: FlyPreconditionFailed,
    422: FlyUnprocessable,
    429: FlyRateLimited,
}


def error_for_status(status_code: int, *, action: str) -> type[FlyAPIError]:
    """The error class for an error status of a request made for ``action``."""
    if status_code >= 500:
        return FlyServerError
    if status_code == 404 and action in ("app", "create", "list"):
        return FlyAppNotFound
    if status_code == 408 and action != "wait":
        # A generic request timeout, not a wait's "not yet": still worth retrying.
        return FlyAPIError
    return _BY_STATUS.get(status_code, FlyAPIError)
