"""Sessions of the web dashboard: opened with an API key (or for the local owner when
authentication is off), looked up by the cookie's token, closed on sign-out.

Only the token's sha256 is stored (like API keys). A session is valid until it expires and, when
it came from an API key, only while that key is not revoked: the owner and scopes are the key's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from http.cookies import SimpleCookie

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, UiSession, utcnow
from app.services import api_keys
from app.services.api_keys import Principal
from app.services.errors import Forbidden

LIFETIME = timedelta(hours=12)
COOKIE = "dpaat_session"  # the cookie holding a session's token


@dataclass(frozen=True)
class Opened:
    """A session as the web layer needs it: who, and the token its forms must carry."""

    principal: Principal
    csrf_token: str


def cookie_value(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    """A cookie of the request (None when absent or unparsable)."""
    for key, value in headers:
        if key.lower() == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed Cookie header is as good as none
                continue
            if name in jar:
                return jar[name].value
    return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(session: Session, principal: Principal) -> tuple[str, Opened]:
    """A new session for ``principal``; returns the cookie token (never stored) and the session.
    Expired sessions are swept here, so the table does not grow without bound."""
    now = utcnow()
    session.execute(delete(UiSession).where(UiSession.expires_at < now))
    token = secrets.token_urlsafe(32)
    row = UiSession(
        token_sha256=_digest(token),
        owner=principal.owner,
        key_id=principal.key_id,
        scopes=sorted(principal.scopes),
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + LIFETIME,
    )
    session.add(row)
    session.commit()
    return token, Opened(principal, row.csrf_token)


def sign_in(session: Session, raw_key: str) -> tuple[str, Opened] | None:
    """Open a session with an API key; None when the key is not valid, ``Forbidden`` when it
    cannot read (every page is a read, as GET is in the API)."""
    principal = api_keys.verify_key(session, raw_key.strip())
    if principal is None:
        return None
    if "read" not in principal.scopes:
        raise Forbidden("this API key lacks the 'read' scope the dashboard needs")
    return open_session(session, principal)


def resolve(session: Session, token: str | None) -> Opened | None:
    """The live session of a cookie token (None: no, expired or revoked-key session)."""
    if not token or len(token) > 128:
        return None
    row = session.get(UiSession, _digest(token))
    if row is None or row.expires_at < utcnow():
        return None
    if row.key_id is not None:
        key = session.get(ApiKey, row.key_id)
        if key is None or key.revoked_at is not None:
            return None
    principal = Principal(owner=row.owner, scopes=frozenset(row.scopes), key_id=row.key_id)
    return Opened(principal, row.csrf_token)


def close(session: Session, token: str | None) -> None:
    """Sign out: the session's row is deleted (its cookie is then worth nothing)."""
    if token:
        session.execute(delete(UiSession).where(UiSession.token_sha256 == _digest(token)))
        session.commit()


def csrf_ok(opened: Opened, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(opened.csrf_token, presented or "")
