"""API keys over HTTP (admin scope): the secret appears once, in the answer that creates it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.common import Label, ORMModel

Scope = Literal["read", "submit", "admin"]


class CreateKeyRequest(BaseModel):
    owner: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Whose rows the key reads and creates.",
        examples=["radiology-ci"],
    )
    scopes: list[Scope] = Field(
        min_length=1, max_length=3, description="read, submit and/or admin.", examples=[["read"]]
    )
    label: Label | None = Field(default=None, description="A note for humans.")


class KeyOut(ORMModel):
    """A key without its secret."""

    key_id: str
    owner: str
    scopes: list[str]
    label: str | None
    created_at: datetime
    revoked_at: datetime | None


class CreatedKeyOut(KeyOut):
    key: str = Field(description="The full key: shown this once, never stored in clear.")
