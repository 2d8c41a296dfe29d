"""Shapes shared by every resource: errors and pages."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.core import text_policy

T = TypeVar("T")
# Offsets past this are refused (422) rather than handed to the database as huge integers.
MAX_OFFSET = 1_000_000_000


# Single-line printable texts (see app.core.text_policy), for request fields. The API's input
# middleware already applies the policy to every field; these types also bound each field's length
# in the schema and cover JSON that reaches a model by another way (a form field sent as a file).
Identifier = Annotated[
    str,
    Field(min_length=1, max_length=64),
    AfterValidator(partial(text_policy.check, max_length=64)),
]
Name = Annotated[
    str,
    Field(min_length=1, max_length=200),
    AfterValidator(partial(text_policy.check, max_length=200)),
]
Label = Annotated[
    str, Field(max_length=200), AfterValidator(partial(text_policy.check, max_length=200))
]


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer: ``detail`` is a message (or FastAPI's list of validation errors)."""

    detail: str | list[dict[str, Any]] = Field(examples=["job 3f2a... not found"])


class Page(BaseModel, Generic[T]):
    """A page of a list, newest first; ``total`` counts every match."""

    items: list[T]
    total: int = Field(ge=0, examples=[42])
    limit: int = Field(ge=1, examples=[50])
    offset: int = Field(ge=0, examples=[0])


class ORMModel(BaseModel):
    """A response model read from ORM rows."""

    model_config = ConfigDict(from_attributes=True)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error codes a route can answer."""
    text = {
        401: "No valid API key (missing, unknown or revoked)",
        403: "The API key lacks the scope this request needs",
        404: "Not found (or owned by another API key)",
        409: "Conflicts with the current state",
        413: "Too large",
        415: "Unsupported media type",
        422: "Invalid input",
        429: "A per-owner quota is used up (see the Retry-After header)",
        503: "A dependency is unavailable",
    }
    return {c: {"model": ErrorOut, "description": text.get(c, "Error")} for c in codes}
