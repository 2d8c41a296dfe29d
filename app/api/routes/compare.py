"""/api/v1/compare: two or more reports (finished audits, or models' latest reports) side by side,
as a table (JSON or Markdown) and one robustness-curve figure."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Response
from fastapi.responses import PlainTextResponse

from app.api import API_PREFIX
from app.api.deps import OwnerDep, SessionDep, StoreDep
from app.client import render
from app.schemas.audits import Comparison
from app.schemas.common import error_responses
from app.services import compare, figures

router = APIRouter(prefix=f"{API_PREFIX}/compare", tags=["audits"])

AuditIds = Annotated[
    list[str],
    Query(alias="audit", max_length=compare.MAX_ITEMS, description="A finished audit (repeat)."),
]
ModelIds = Annotated[
    list[str],
    Query(
        alias="model",
        max_length=compare.MAX_ITEMS,
        description="A model: its latest report (repeat).",
    ),
]


def _query(audit: list[str], model: list[str]) -> str:
    return urlencode([("audit", a) for a in audit] + [("model", m) for m in model])


@router.get(
    "",
    response_model=Comparison,
    summary="Compare reports side by side",
    responses={
        200: {"content": {"text/markdown": {}}, "description": "JSON, or Markdown with ?format=md"},
        **error_responses(404, 409, 422),
    },
)
def get_comparison(
    session: SessionDep,
    owner: OwnerDep,
    audit: AuditIds = [],  # noqa: B006 (FastAPI copies defaults)
    model: ModelIds = [],  # noqa: B006
    format: Annotated[Literal["json", "md"], Query()] = "json",
) -> Comparison | Response:
    """``?audit=ID&audit=ID`` (finished audits: the reports they were judged on) and/or
    ``?model=ID`` (a model's latest report), 2 to 8 in all, audits first. ``comparable`` is false
    (with ``notes``) when the reports used other splits or attacks."""
    entries = compare.resolve(session, owner, audit, model)
    curve = f"{API_PREFIX}/compare/curve.png?{_query(audit, model)}"
    doc = compare.comparison(entries, curve)
    if format == "md":
        return PlainTextResponse(render.comparison_markdown(doc, curve), media_type="text/markdown")
    return Comparison.model_validate(doc)


@router.get(
    "/curve.png",
    summary="The robustness curves of the compared reports on one figure",
    responses={
        200: {"content": {"image/png": {}}, "description": "One line pair per report"},
        **error_responses(404, 409, 422),
    },
    response_class=Response,
)
def get_comparison_curve(
    session: SessionDep,
    store: StoreDep,
    owner: OwnerDep,
    audit: AuditIds = [],  # noqa: B006
    model: ModelIds = [],  # noqa: B006
) -> Response:
    entries = compare.resolve(session, owner, audit, model)
    png = figures.curve_png(
        store, [e.evaluation.report for e in entries], [e.label for e in entries]
    )
    return Response(png, media_type="image/png")
