"""/api/v1/keys: create, list and revoke API keys (admin scope; ``dpaat keys`` does the same
from the command line, which is how the first admin key is made)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.api import API_PREFIX
from app.api.deps import SessionDep, require_admin
from app.schemas.common import MAX_OFFSET, Page, error_responses
from app.schemas.keys import CreatedKeyOut, CreateKeyRequest, KeyOut
from app.services import api_keys

router = APIRouter(
    prefix=f"{API_PREFIX}/keys",
    tags=["keys"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 403),
)


@router.post(
    "",
    status_code=201,
    response_model=CreatedKeyOut,
    summary="Create an API key",
    responses=error_responses(422),
)
def create_key(body: CreateKeyRequest, session: SessionDep) -> CreatedKeyOut:
    """The answer holds the key once; only its hash is stored."""
    row, key = api_keys.create_key(session, owner=body.owner, scopes=body.scopes, label=body.label)
    return CreatedKeyOut.model_validate({**KeyOut.model_validate(row).model_dump(), "key": key})


@router.get("", response_model=Page[KeyOut], summary="List API keys (no secrets)")
def list_keys(
    session: SessionDep,
    owner: Annotated[str | None, Query(max_length=64, description="Only this owner's.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[KeyOut]:
    rows, total = api_keys.list_keys(session, owner=owner, limit=limit, offset=offset)
    items = [KeyOut.model_validate(r) for r in rows]
    return Page[KeyOut](items=items, total=total, limit=limit, offset=offset)


@router.post(
    "/{key_id}/revoke",
    response_model=KeyOut,
    summary="Revoke an API key",
    responses=error_responses(404),
)
def revoke_key(key_id: str, session: SessionDep) -> KeyOut:
    """The key is refused (401) from the next request on; the row stays for the record."""
    return KeyOut.model_validate(api_keys.revoke_key(session, key_id))
