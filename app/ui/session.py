"""Browser sessions of the dashboard: the cookie, the security headers, CSRF and sign-in checks.

``UiSessionMiddleware`` runs for ``/ui`` paths only. It resolves the session cookie to a
:class:`~app.services.ui_sessions.Opened` (left in the ASGI scope), opens one for the local owner
when authentication is off (the embedded default opens directly), and adds the security headers
(Content-Security-Policy without inline scripts or styles, no framing, no referrer leaks).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import unauthenticated_principal
from app.core.settings import Settings
from app.services import ui_sessions
from app.services.errors import Forbidden
from app.services.ui_sessions import COOKIE, Opened, cookie_value
from app.ui import UI_PREFIX

LOGIN_CSRF_COOKIE = "dpaat_login_csrf"
SCOPE_KEY = "dpaat.ui"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def set_cookie_header(
    name: str, value: str, *, secure: bool, max_age: int | None = None, path: str = "/"
) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Lax (top-level links keep the session; every form
    post also needs the CSRF token), Secure over HTTPS."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Lax"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


class UiSessionMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.app = app
        self.settings = settings
        self.factory = factory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == UI_PREFIX or path.startswith(UI_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        token = cookie_value(scope["headers"], COOKIE)
        static = path.startswith(f"{UI_PREFIX}/static/")
        opened = None if static else await run_in_threadpool(self._resolve, token)
        new_token = None
        if opened is None and not static and not self.settings.auth_enabled:
            new_token, opened = await run_in_threadpool(self._open_local)
        scope[SCOPE_KEY] = opened
        secure = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
                if new_token is not None:
                    headers.append(
                        "Set-Cookie",
                        set_cookie_header(
                            COOKIE,
                            new_token,
                            secure=secure,
                            max_age=int(ui_sessions.LIFETIME.total_seconds()),
                        ),
                    )
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _resolve(self, token: str | None) -> Opened | None:
        with self.factory() as session:
            return ui_sessions.resolve(session, token)

    def _open_local(self) -> tuple[str, Opened]:
        with self.factory() as session:
            return ui_sessions.open_session(session, unauthenticated_principal(None))


class SignInRequired(Exception):
    """A page that needs a session was asked for without one: the handler redirects to sign-in."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def current(request: Request) -> Opened:
    """The request's session, or a redirect to the sign-in page."""
    opened = request.scope.get(SCOPE_KEY)
    if not isinstance(opened, Opened):
        raise SignInRequired(request.url.path)
    return opened


def check_form(opened: Opened, csrf_token: str | None, scope: str = "submit") -> None:
    """Every form post: the session's CSRF token and the scope the action needs (as the API)."""
    if not ui_sessions.csrf_ok(opened, csrf_token):
        raise Forbidden("the form's security token is missing or out of date: reload the page")
    if scope not in opened.principal.scopes:
        raise Forbidden(f"this API key lacks the '{scope}' scope")


UiDep = Annotated[Opened, Depends(current)]
