"""/api/v1/audits: CI audits (an evaluation job + thresholds + an optional baseline audit)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from app.api import API_PREFIX
from app.api.deps import DispatcherDep, OwnerDep, SessionDep, SettingsDep, StoreDep
from app.client import render
from app.db.tables import Audit, Evaluation, Model
from app.schemas.audits import AuditDetail, AuditOut, AuditRequest, AuditSpec
from app.schemas.common import MAX_OFFSET, Page, error_responses
from app.schemas.models import ModelDescription
from app.services import audits, figures, jobs, models_registry
from app.services.errors import NotFound, UnsupportedMedia

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


def _figures(session: Session, audit: Audit) -> tuple[Model, Evaluation | None, list[str]]:
    model = models_registry.get_model(session, audit.model_id)
    evaluation = audits.evaluation_of(session, audit)
    names = figures.available(session, model, evaluation) if evaluation is not None else []
    return model, evaluation, names


def _figure_links(session: Session, audit: Audit) -> dict[str, str]:
    if audit.outcome not in audits.SETTLED:
        return {}
    return figures.links(f"{API_PREFIX}/audits/{audit.id}/figures", _figures(session, audit)[2])


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
            "figures": _figure_links(session, audit),
        }
    )


# ---------------------------------------------------------------------------- submitting
_MAX_DESCRIPTION = 64 << 10


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined: the request body below is declared by
    hand (it has two content types), so its nested models are not in the OpenAPI components."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _inline_schema(AuditRequest)},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["weights", "description", "audit"],
                "properties": {
                    "weights": {
                        "type": "string",
                        "format": "binary",
                        "description": "The model's weights, safetensors only.",
                    },
                    "description": {
                        "type": "string",
                        "description": "JSON, as for POST /api/v1/models: "
                        '{"architecture": "small_cnn", "classes": [...], "image_size": 64}',
                    },
                    "audit": {
                        "type": "string",
                        "description": "JSON: the audit without model_id (dataset_id, eps_list, "
                        "attacks, thresholds, baseline, ...).",
                    },
                },
            }
        },
    },
}


@dataclass
class Submission:
    """A parsed ``POST /audits``: a registered model's audit, or an upload and its audit."""

    spec: AuditSpec
    description: ModelDescription | None = None
    weights: UploadFile | None = None


def _invalid(field: str, error: ValidationError | ValueError) -> RequestValidationError:
    """A 422 in FastAPI's format, located in the body (and the form field, for multipart)."""
    where = ("body", field) if field else ("body",)
    if isinstance(error, ValidationError):
        return RequestValidationError(
            [{**e, "loc": (*where, *e["loc"])} for e in error.errors(include_url=False)]
        )
    return RequestValidationError(
        [{"type": "value_error", "loc": where, "msg": str(error), "input": None}]
    )


async def _text_field(value: str | UploadFile | None, field: str) -> str:
    if value is None:
        raise _invalid(field, ValueError(f"the form field {field!r} is required"))
    if isinstance(value, str):
        return value
    data = await value.read(_MAX_DESCRIPTION + 1)  # `-F field=@file.json` sends it as a file
    if len(data) > _MAX_DESCRIPTION:
        raise _invalid(field, ValueError(f"{field} is longer than {_MAX_DESCRIPTION} bytes"))
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise _invalid(field, ValueError(f"{field} is not UTF-8 text")) from None


def _parse(model: type[BaseModel], text: str | bytes, field: str) -> Any:
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        raise _invalid(field, e) from None


async def _submission(request: Request) -> AsyncIterator[Submission]:
    """JSON (a registered model) or multipart (weights + description + audit)."""
    content_type = request.headers.get("content-type", "application/json").lower()
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8)
        try:
            weights = form.get("weights")
            if not isinstance(weights, UploadFile):
                raise _invalid("weights", ValueError("the form needs a file field 'weights'"))
            description = _parse(
                ModelDescription, await _text_field(form.get("description"), "description"),
                "description",
            )  # fmt: skip
            spec = _parse(AuditSpec, await _text_field(form.get("audit"), "audit"), "audit")
            yield Submission(spec, description, weights)
        finally:
            await form.close()
        return
    if not (content_type.startswith("application/json") or "+json" in content_type):
        raise UnsupportedMedia(
            "send the audit as application/json (a registered model_id) or as "
            "multipart/form-data (weights, description, audit)"
        )
    body = await request.body()
    yield Submission(_parse(AuditRequest, body or b"{}", ""))


@router.post(
    "",
    status_code=201,
    response_model=AuditDetail,
    summary="Start an audit (of a registered model, or of one uploaded in the same request)",
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={
        200: {"model": AuditDetail, "description": "An earlier submit with this Idempotency-Key"},
        **error_responses(404, 409, 413, 415, 422, 429),
    },
)
def create_audit(
    submission: Annotated[Submission, Depends(_submission)],
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    owner: OwnerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="Retry-safe submit: the same key (per API key) returns the audit it "
            "created (200); the same key with another body (or another file) is a 409.",
        ),
    ] = None,
) -> AuditDetail:
    """Queue the evaluation of a model and check ``thresholds`` on its report when it finishes;
    with ``baseline``, also fail when a threshold metric dropped by more than ``max_drop`` below
    the baseline audit's (pinned now to one finished audit).

    JSON: a registered model (``model_id``). Multipart: ``weights`` (safetensors), ``description``
    (JSON, as for ``POST /api/v1/models``) and ``audit`` (this JSON without ``model_id``); the
    file is checked against the described architecture, registered as the caller's model and
    audited. A bad file or request stores nothing."""
    spec = submission.spec
    if submission.weights is None:
        audit, created = audits.create_audit(
            session,
            dispatcher,
            owner=owner,
            request=spec.model_dump(mode="json"),
            evaluation_params=spec.evaluation_params(),
            idempotency_key=idempotency_key,
            max_active_jobs=settings.max_active_jobs,
        )
    else:
        assert submission.description is not None
        audit, created = audits.create_audit_with_upload(
            session,
            store,
            dispatcher,
            owner=owner,
            request=spec.model_dump(mode="json"),
            evaluation_params=spec.evaluation_params(),
            description=submission.description.model_dump(mode="json", exclude_none=True),
            weights=submission.weights.file,
            max_bytes=settings.max_upload_mb << 20,
            idempotency_key=idempotency_key,
            max_active_jobs=settings.max_active_jobs,
        )
    response.status_code = 201 if created else 200
    if created:
        response.headers["Location"] = f"{API_PREFIX}/audits/{audit.id}"
    return _detail(session, audits.refresh(session, audit))


# ---------------------------------------------------------------------------- reading
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
        links = _figure_links(session, audit)
        plot = links.get("robustness_curve")
        return PlainTextResponse(render.markdown(doc, plot, links), media_type="text/markdown")
    if format == "junit":
        return Response(render.junit_xml(doc), media_type="application/xml")
    return JSONResponse(doc)


_PNG = {200: {"content": {"image/png": {}}}, **error_responses(404, 409)}


@router.get(
    "/{audit_id}/figures/{name}.png",
    response_class=FileResponse,
    summary="A figure of an audit's report",
    responses=_PNG,
)
def get_figure(
    audit_id: str, name: str, session: SessionDep, store: StoreDep, owner: OwnerDep
) -> FileResponse:
    """``robustness_curve``, ``class_recall`` (recall per class and eps), ``gradcam_montage``
    (clean vs adversarial, lesion outline when the dataset has masks), ``dpaat_eps_hist`` and
    ``dpaat_tau`` (the training run's, for a model trained here with DPAAT); the audit's
    ``figures`` lists those that exist. 409 until the audit has finished."""
    audit = audits.get_audit(session, audit_id, owner)
    audits.document(session, audit)  # 409 unless finished with a report
    model, evaluation, _names = _figures(session, audit)
    path = figures.path_of(session, store, name, model, evaluation)
    return FileResponse(str(path), media_type="image/png")


@router.get(
    "/{audit_id}/curve.png",
    response_class=FileResponse,
    summary="The robustness curve of an audit's evaluation",
    responses=_PNG,
)
def get_curve(audit_id: str, session: SessionDep, store: StoreDep, owner: OwnerDep) -> FileResponse:
    """The same as ``figures/robustness_curve.png``."""
    return get_figure(audit_id, "robustness_curve", session, store, owner)
