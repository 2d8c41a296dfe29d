"""The one place where domain errors become HTTP answers: ``{"detail": message}`` with the status
of the error's type. Services raise ``app.services.errors``; routes never build error responses."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.session import DATABASE_DOWN
from app.services import errors, public_errors

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying a 503 (a database or broker blip is short).
RETRY_AFTER_SECONDS = 5

STATUS_OF: dict[type[errors.ServiceError], int] = {
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.UnsupportedMedia: 415,
    errors.Invalid: 422,
    errors.QuotaExceeded: 429,
    errors.Unavailable: 503,
}


def status_of(error: errors.ServiceError) -> int:
    """The HTTP status of a domain error (the most specific registered type wins)."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 400


# The realm named in 401 answers (RFC 9110 wants a challenge with every 401).
WWW_AUTHENTICATE = 'ApiKey realm="dpaat", header="X-API-Key"'


def headers_of(error: errors.ServiceError) -> dict[str, str]:
    """Headers an error's answer needs: a challenge for 401, Retry-After for 429 and 503."""
    if isinstance(error, errors.Unauthenticated):
        return {"WWW-Authenticate": WWW_AUTHENTICATE}
    if isinstance(error, errors.QuotaExceeded):
        return {"Retry-After": str(error.retry_after)}
    if isinstance(error, errors.Unavailable):
        return {"Retry-After": str(error.retry_after or RETRY_AFTER_SECONDS)}
    return {}


def error_response(error: errors.ServiceError) -> JSONResponse:
    """The JSON answer of a domain error (also used by middleware, outside the handlers)."""
    return JSONResponse(
        {"detail": error.message}, status_code=status_of(error), headers=headers_of(error)
    )


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    return error_response(exc)


def _printable(value: Any) -> Any:
    """``value`` as strict JSON can carry it: NaN and infinities as strings, bytes decoded with
    replacement. A 422 echoes the client's input (``Infinity``, a non-UTF-8 body) and must not
    turn into a 500 while it is rendered."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body (``{"detail": [errors]}``), safe for any input the client sent."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": jsonable_encoder(_printable(exc.errors()))}, status_code=422)


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    # One line, not a traceback: an outage makes every request fail the same way.
    first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, first_line)
    return JSONResponse(
        {"detail": "the database is unavailable; retry in a few seconds"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The client gets a reference to quote, never the exception's text (SQL, paths).
    reference = public_errors.new_reference()
    log.exception(
        "unhandled error on %s %s (reference %s)",
        request.method,
        request.url.path,
        reference,
        exc_info=exc,
    )
    return JSONResponse(
        {"detail": f"internal server error (reference {reference})"},
        status_code=500,
        headers={"X-Error-Reference": reference},
    )


class DatabaseDownMiddleware:
    """The outermost layer: a database outage met by a middleware (key checks, quotas), outside
    the route handlers, still answers 503 + Retry-After instead of a bare 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except DATABASE_DOWN as e:
            if scope["type"] != "http" or started:
                raise
            response = await _database_down(Request(scope), e)
            await response(scope, receive, send)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(errors.ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_type in DATABASE_DOWN:
        app.add_exception_handler(exc_type, _database_down)
    app.add_exception_handler(Exception, _unexpected)
