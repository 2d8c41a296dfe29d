"""API keys: create (the plaintext is returned once), verify, revoke, list.

A key is ``dpk_<key_id>_<secret>``. The row is found by ``key_id`` and the secret checked with
``hmac.compare_digest`` against its stored sha256: the secret is 256 random bits, so a fast hash
is as strong as a slow one here and keeps verification cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, utcnow
from app.services.errors import Invalid, NotFound

PREFIX = "dpk_"
SCOPES = ("read", "submit", "admin")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_SECRET = 128
# Compared against when the key id is unknown, so both paths do the same work.
_DUMMY_DIGEST = hashlib.sha256(b"dpaat-no-such-key").hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the owner of its rows and what the key allows."""

    owner: str
    scopes: frozenset[str]
    key_id: str | None = None  # None: authentication is off


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(raw: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    if not raw.startswith(PREFIX):
        return None
    key_id, sep, secret = raw[len(PREFIX) :].partition("_")
    if not sep or not _KEY_ID.match(key_id) or not 0 < len(secret) <= _MAX_SECRET:
        return None
    return key_id, secret


def normalize_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes in canonical order; ``Invalid`` for an unknown or empty set."""
    wanted = {s.strip() for s in scopes if s.strip()}
    unknown = wanted - set(SCOPES)
    if unknown or not wanted:
        raise Invalid(
            f"scopes must be a non-empty subset of {', '.join(SCOPES)}"
            + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
        )
    return [s for s in SCOPES if s in wanted]


def check_owner(owner: str) -> str:
    if not _OWNER.match(owner):
        raise Invalid("owner must be 1-64 characters: letters, digits, '.', '_', '-'")
    return owner


def create_key(
    session: Session, *, owner: str, scopes: Iterable[str], label: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for ``owner``; returns the row and the plaintext key (never stored)."""
    row = ApiKey(
        key_id=secrets.token_hex(8),
        owner=check_owner(owner),
        scopes=normalize_scopes(scopes),
        label=(label or None) and label[:200],
    )
    secret = secrets.token_urlsafe(32)
    row.secret_sha256 = secret_digest(secret)
    session.add(row)
    session.commit()
    return row, f"{PREFIX}{row.key_id}_{secret}"


def verify_key(session: Session, raw: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None for anything else."""
    parsed = parse_key(raw)
    if parsed is None:
        return None
    key_id, secret = parsed
    row = session.get(ApiKey, key_id)
    expected = row.secret_sha256 if row is not None else _DUMMY_DIGEST
    if not hmac.compare_digest(secret_digest(secret), expected):
        return None
    if row is None or row.revoked_at is not None:
        return None
    return Principal(owner=row.owner, scopes=frozenset(row.scopes), key_id=row.key_id)


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Mark a key revoked (idempotent); it stops working on the next request."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_keys(
    session: Session, *, owner: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[ApiKey], int]:
    """A page of keys (newest first) and the total; the rows hold no secret."""
    conditions = [ApiKey.owner == owner] if owner is not None else []
    total = session.scalar(select(func.count()).select_from(ApiKey).where(*conditions)) or 0
    rows = session.scalars(
        select(ApiKey)
        .where(*conditions)
        .order_by(ApiKey.created_at.desc(), ApiKey.key_id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total
