"""/api/v1/audits: CI audits (an evaluation job + thresholds + an optional baseline audit)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from sqlalchemy.orm import Session

from app.api import API_PREFIX
from app.api.deps import DispatcherDep, OwnerDep, SessionDep, StoreDep
from app.client import render
from app.db.tables import Audit
from app.schemas.audits import AuditDetail, AuditOut, AuditRequest
from app.schemas.common import MAX_OFFSET, Page, error_responses
from app.services import audits, jobs
from app.services.errors import NotFound, Unavailable

router = APIRouter(prefix=f"{API_PREFIX}/audits", tags=["audits"])


def _fields(session: Session, audit: Audit) -> dict[str, Any]:
    job = audits.job_of(session, audit)
    if job is not None:
        status, progress, error = job.status, job.progress, job.error
    else:  # the job row is gone: the settled outcome is all there is
        status = "succeeded" if audit.outcome in audits.SETTLED else "failed"
        progress, error = {}, (audit.result or {}).get("error")
    return {
        "id": audit.id,
        "model_id": audit.model_id,
        "dataset_id": audit.dataset_id,
        "job_id": audit.job_id,
        "status": status,
        "outcome": audit.outcome,
        "passed": audit.passed,
        "thresholds": audit.thresholds,
        "baseline": audit.baseline,
        "progress": progress,
        "error": error,
        "created_at": audit.created_at,
        "finished_at": audit.finished_at,
    }


def _detail(session: Session, audit: Audit) -> AuditDetail:
    result = audit.result or {}
    return AuditDetail.model_validate(
        {
            **_fields(session, audit),
            "evaluation_id": result.get("evaluation_id"),
            "threshold_results": result.get("thresholds", []),
            "regression_results": result.get("regression", []),
            "verdict": result.get("verdict"),
            "report_url": f"{API_PREFIX}/audits/{audit.id}/report"
            if audit.outcome in audits.SETTLED
            else None,
        }
    )


@router.post(
    "",
    status_code=201,
    response_model=AuditDetail,
    summary="Start an audit",
    responses={
        200: {"model": AuditDetail, "description": "An earlier submit with this Idempotency-Key"},
        **error_responses(404, 409, 422),
    },
)
def create_audit(
    body: AuditRequest,
    response: Response,
    session: SessionDep,
    dispatcher: DispatcherDep,
    owner: OwnerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="Retry-safe submit: the same key (per API key) returns the audit it "
            "created (200); the same key with another body is a 409.",
        ),
    ] = None,
) -> AuditDetail:
    """Queue the evaluation of a registered model and check ``thresholds`` on its report when it
    finishes; with ``baseline``, also fail when a threshold metric dropped by more than
    ``max_drop`` below the baseline audit's (pinned now to one finished audit)."""
    audit, created = audits.create_audit(
        session,
        dispatcher,
        owner=owner,
        request=body.model_dump(mode="json"),
        evaluation_params=body.evaluation_params(),
        idempotency_key=idempotency_key,
    )
    response.status_code = 201 if created else 200
    if created:
        response.headers["Location"] = f"{API_PREFIX}/audits/{audit.id}"
    return _detail(session, audits.refresh(session, audit))


@router.get("", response_model=Page[AuditOut], summary="List audits")
def list_audits(
    session: SessionDep,
    owner: OwnerDep,
    model_id: Annotated[str | None, Query(description="Only the audits of this model.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[AuditOut]:
    rows, total = audits.list_audits(session, owner, model_id=model_id, limit=limit, offset=offset)
    items = [AuditOut.model_validate(_fields(session, a)) for a in rows]
    return Page[AuditOut](items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/{audit_id}",
    response_model=AuditDetail,
    summary="Get an audit",
    responses=error_responses(404),
)
def get_audit(audit_id: str, session: SessionDep, owner: OwnerDep) -> AuditDetail:
    """Status and progress of the evaluation; once finished, every threshold's observed and
    required value, the regression results and the overall ``passed``."""
    return _detail(session, audits.get_audit(session, audit_id, owner))


@router.post(
    "/{audit_id}/cancel",
    status_code=202,
    response_model=AuditDetail,
    summary="Cancel an audit's evaluation",
    responses=error_responses(404, 409),
)
def cancel_audit(audit_id: str, session: SessionDep, owner: OwnerDep) -> AuditDetail:
    audit = audits.get_audit(session, audit_id, owner)
    if audit.job_id is None:
        raise NotFound(f"audit {audit_id} has no job to cancel")
    jobs.request_cancel(session, audit.job_id, owner)
    return _detail(session, audits.refresh(session, audit))


@router.get(
    "/{audit_id}/report",
    summary="Get an audit's report (JSON, Markdown or JUnit XML)",
    responses={
        200: {
            "description": "JSON: the evaluation report with an ``audit`` section; "
            "?format=md: a pull-request summary; ?format=junit: one test case per rule",
            "content": {"application/json": {}, "text/markdown": {}, "application/xml": {}},
        },
        **error_responses(404, 409),
    },
)
def get_report(
    audit_id: str,
    session: SessionDep,
    owner: OwnerDep,
    format: Annotated[Literal["json", "md", "junit"], Query()] = "json",
) -> Response:
    """409 while the audit has not finished, or when its evaluation job failed."""
    audit = audits.get_audit(session, audit_id, owner)
    doc = audits.document(session, audit)
    if format == "md":
        plot = f"{API_PREFIX}/audits/{audit.id}/curve.png"
        return PlainTextResponse(render.markdown(doc, plot), media_type="text/markdown")
    if format == "junit":
        return Response(render.junit_xml(doc), media_type="application/xml")
    return JSONResponse(doc)


@router.get(
    "/{audit_id}/curve.png",
    response_class=FileResponse,
    summary="The robustness curve of an audit's evaluation",
    responses={200: {"content": {"image/png": {}}}, **error_responses(404, 409)},
)
def get_curve(audit_id: str, session: SessionDep, store: StoreDep, owner: OwnerDep) -> FileResponse:
    audit = audits.get_audit(session, audit_id, owner)
    audits.document(session, audit)  # 409 unless finished with a report
    evaluation = audits.evaluation_of(session, audit)
    if evaluation is None or evaluation.plot_uri is None:
        raise NotFound("this audit's evaluation has no robustness curve")
    path = store.path(evaluation.plot_uri)
    if not path.is_file():
        raise Unavailable("the robustness curve is missing from the artifact store")
    return FileResponse(str(path), media_type="image/png")
