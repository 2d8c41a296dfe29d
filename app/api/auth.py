"""Authentication, scopes and the upload quota, decided before a request's body is read.

A pure ASGI middleware: it matches the request to its route, so the scope a route needs follows
from the route itself and no route can be left out:

- outside ``/api/v1`` (health, metrics, the OpenAPI documents): public (the dashboard under
  ``/ui`` checks its own sessions, ``app.ui.session``);
- ``/api/v1/keys...``: ``admin``;
- any other ``/api/v1`` route: ``read`` for GET/HEAD, ``submit`` for everything else.

With authentication on, a missing, malformed, unknown or revoked key is a 401 (with a
``WWW-Authenticate`` challenge) and a key without the scope a 403 naming it. With it off, the
owner is the sha256 of whatever ``X-API-Key`` says (no key: ``local``): a namespace, not a lock.
A GET without a key may carry the dashboard's session cookie instead: it reads as the session's
owner with the ``read`` scope only (figures and the progress stream load in a browser), never
writes. The resolved :class:`Principal` is left in the ASGI scope for ``deps.current_owner``.

Uploads (POST routes with a file in their body that the service keeps: datasets, models; not
predictions) are checked against the owner's upload quota with the declared Content-Length
before the body streams in, and counted once answered 2xx.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import params
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import API_PREFIX
from app.api.errors import error_response
from app.core.settings import Settings
from app.services import api_keys, quotas, ui_sessions
from app.services.api_keys import Principal
from app.services.errors import Forbidden, ServiceError, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

PRINCIPAL = "dpaat.principal"  # the ASGI scope entry holding the request's Principal
LOCAL_OWNER = "local"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_NO_KEY = (
    "an API key is required: send it as 'X-API-Key: dpk_...' or 'Authorization: Bearer dpk_...'"
)


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs (None: public). ``path`` is the route template or raw path."""
    if path != API_PREFIX and not path.startswith(f"{API_PREFIX}/"):
        return None
    if path == f"{API_PREFIX}/keys" or path.startswith(f"{API_PREFIX}/keys/"):
        return "admin"
    return "read" if method.upper() in _SAFE_METHODS else "submit"


def presented_key(headers: dict[str, str]) -> str | None:
    """The key of a request: ``X-API-Key``, else an ``Authorization: Bearer`` token."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def unauthenticated_principal(key: str | None) -> Principal:
    """Authentication off: read and submit, owner from the key's hash (``local`` without one)."""
    owner = hashlib.sha256(key.encode()).hexdigest() if key else LOCAL_OWNER
    return Principal(owner=owner, scopes=frozenset({"read", "submit"}))


def is_upload(route: BaseRoute | None, method: str, content_type: str = "") -> bool:
    """A POST whose body carries a file that is stored (every multipart route but predict).

    A route that declares a File parameter is one; so is a multipart body sent to a route that
    parses its multipart form itself (POST /audits takes JSON or a model upload)."""
    if method != "POST" or not isinstance(route, APIRoute):
        return False
    if route.path.endswith(("/predict", "/predict/batch")):
        return False
    if content_type.lower().startswith("multipart/"):
        return True
    return any(isinstance(p.field_info, params.File) for p in route.dependant.body_params)


def flat_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """Every route of an app, included routers unfolded (FastAPI keeps them nested)."""
    return [context.original_route for context in iter_route_contexts(routes)]


def _match(routes: Sequence[BaseRoute], scope: Scope) -> BaseRoute | None:
    for route in routes:
        match, _child = route.matches(scope)
        if match == Match.FULL:
            return route
    return None


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _content_length(headers: dict[str, str]) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


class AuthMiddleware:
    """See the module docstring. ``factory`` opens database sessions (the app's own), ``reader``
    those of the checks that only read (``make_sessionmaker(reads_only=True)``): a key check is
    on every request's path."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        factory: sessionmaker[Session],
        reader: sessionmaker[Session],
    ) -> None:
        self.app = app
        self.settings = settings
        self.factory = factory
        self.reader = reader
        self._routes: list[BaseRoute] | None = None  # flattened once: routes are fixed at start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        if self._routes is None:
            self._routes = flat_routes(scope["app"].routes)
        route = _match(self._routes, scope)
        if route is not None:
            scope["route"] = route  # metrics label refusals with the route template too
        template = getattr(route, "path", None) or scope["path"]
        needed = required_scope(method, template)
        headers = _headers(scope)
        try:
            key = presented_key(headers)
            if key is None and needed == "read" and self.settings.auth_enabled:
                # A dashboard session may read (figures, the progress stream); never write.
                principal = await run_in_threadpool(self._session_principal, scope)
            else:
                principal = None
            principal = principal or await self._principal(needed, key)
            if principal is not None:
                scope[PRINCIPAL] = principal
            upload = principal is not None and is_upload(
                route, method, headers.get("content-type", "")
            )
            if upload:
                assert principal is not None
                declared = _content_length(headers)
                incoming = declared if declared is not None else self.settings.max_upload_mb << 20
                await run_in_threadpool(self._check_upload, principal.owner, incoming)
        except ServiceError as e:
            await self._refuse(e, scope, receive, send)
            return
        if not upload:
            await self.app(scope, receive, send)
            return
        assert principal is not None
        await self._counted_upload(principal.owner, scope, receive, send)

    async def _principal(self, needed: str | None, key: str | None) -> Principal | None:
        if needed is None:
            return None
        if not self.settings.auth_enabled:
            if needed == "admin":  # keys made here would be valid once auth is turned on
                raise Forbidden("authentication is off (DPAAT_AUTH): manage keys with `dpaat keys`")
            return unauthenticated_principal(key)
        if key is None:
            raise Unauthenticated(_NO_KEY)
        principal = await run_in_threadpool(self._verify, key)
        if principal is None:
            raise Unauthenticated("the API key is not valid (unknown, malformed or revoked)")
        if needed not in principal.scopes:
            raise Forbidden(
                f"this API key lacks the '{needed}' scope "
                f"(it has: {', '.join(sorted(principal.scopes))})"
            )
        return principal

    def _session_principal(self, scope: Scope) -> Principal | None:
        token = ui_sessions.cookie_value(scope["headers"], ui_sessions.COOKIE)
        if token is None:
            return None
        try:
            with self.reader() as session:
                opened = ui_sessions.resolve(session, token)
        except DBAPIError as e:
            log.warning("cannot verify a dashboard session: %s", type(e).__name__)
            raise Unavailable("the database is unavailable; try again shortly") from None
        if opened is None or "read" not in opened.principal.scopes:
            return None
        return Principal(opened.principal.owner, frozenset({"read"}), opened.principal.key_id)

    def _verify(self, key: str) -> Principal | None:
        try:
            with self.reader() as session:
                return api_keys.verify_key(session, key)
        except DBAPIError as e:
            log.warning("cannot verify an API key: %s", type(e).__name__)
            raise Unavailable("the database is unavailable; try again shortly") from None

    def _check_upload(self, owner: str, incoming: int) -> None:
        with self.factory() as session:
            quotas.check_upload(
                session,
                owner,
                incoming,
                limit_mb=self.settings.upload_quota_mb,
                window_seconds=self.settings.upload_quota_window_seconds,
            )

    def _record_upload(self, owner: str, nbytes: int) -> None:
        with self.factory() as session:
            quotas.record_upload(
                session, owner, nbytes, window_seconds=self.settings.upload_quota_window_seconds
            )

    async def _counted_upload(self, owner: str, scope: Scope, receive: Receive, send: Send) -> None:
        received, status = 0, 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, counting_receive, status_send)
        if 200 <= status < 300 and self.settings.upload_quota_mb > 0:
            await run_in_threadpool(self._record_upload, owner, received)

    async def _refuse(
        self, error: ServiceError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        response = error_response(error)
        if scope["method"] not in _SAFE_METHODS:
            # The body was not read: the connection cannot carry another request.
            response.headers["Connection"] = "close"
        await response(scope, receive, send)


def principal_of(scope: Mapping[str, Any]) -> Principal | None:
    """The principal the middleware resolved for this request (None: it did not run)."""
    value = scope.get(PRINCIPAL)
    return value if isinstance(value, Principal) else None
