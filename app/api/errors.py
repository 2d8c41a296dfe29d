"""The one place where domain errors become HTTP answers: ``{"detail": message}`` with the status
of the error's type. Services raise ``app.services.errors``; routes never build error responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.services import errors

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.ServiceError], int] = {
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.UnsupportedMedia: 415,
    errors.Invalid: 422,
    errors.Unavailable: 503,
}


def status_of(error: errors.ServiceError) -> int:
    """The HTTP status of a domain error (the most specific registered type wins)."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 400


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    return JSONResponse({"detail": exc.message}, status_code=status_of(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(errors.ServiceError, _service_error)
    app.add_exception_handler(Exception, _unexpected)
