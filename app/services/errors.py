"""Domain errors raised by services. ``app.api.errors`` maps them to HTTP in one place, so services
never know about status codes and the worker can raise and catch the same types."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client caused or can act on; ``message`` is shown to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    """The object does not exist, or belongs to another owner (never reveal which)."""


class Conflict(ServiceError):
    """The request contradicts the current state (a finished job, a reused idempotency key)."""


class Invalid(ServiceError):
    """The input is well-formed but unacceptable (bad archive, wrong shapes, bad image)."""


class TooLarge(ServiceError):
    """The input exceeds a configured size limit."""


class UnsupportedMedia(ServiceError):
    """The input is not of an accepted type (not JPEG/PNG, not zip/tar.gz, not safetensors)."""


class Unavailable(ServiceError):
    """A dependency (database, broker, ML runtime) cannot serve the request right now;
    ``retry_after`` (seconds) when the caller knows better than the default."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = None if retry_after is None else max(1, int(retry_after))


class Unauthenticated(ServiceError):
    """No API key, or one that is unknown, malformed or revoked."""


class Forbidden(ServiceError):
    """A valid API key without the scope the request needs."""


class QuotaExceeded(ServiceError):
    """A per-owner quota is used up; ``retry_after`` says when trying again can succeed."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
