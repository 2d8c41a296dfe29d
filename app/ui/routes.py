"""The dashboard's pages. Each route reads or changes state through the service layer with the
session's owner, exactly as the matching API route does; a service error on a form is shown next
to the form, anywhere else as an error page with the API's status code."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api import API_PREFIX
from app.api.deps import DispatcherDep, PredictionsDep, SessionDep, SettingsDep, StoreDep
from app.api.errors import status_of
from app.api.routes import predict as predict_api
from app.api.routes.datasets import _name_from
from app.api.routes.jobs import _detail as job_detail
from app.db.tables import Model
from app.schemas.jobs import EvaluateJobRequest, TrainJobRequest
from app.services import (
    audits,
    compare,
    datasets,
    figures,
    jobs,
    leaderboard,
    models_registry,
    quotas,
    submissions,
    thumbnails,
    ui_sessions,
)
from app.services.errors import ServiceError
from app.services.prediction import WARNINGS
from app.services.ui_sessions import COOKIE, Opened, cookie_value
from app.ui import UI_PREFIX
from app.ui.session import LOGIN_CSRF_COOKIE, UiDep, check_form, set_cookie_header
from app.ui.templating import templates

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)
Csrf = Annotated[str | None, Form()]


def page(
    request: Request, name: str, opened: Opened | None, status: int = 200, **data: Any
) -> Response:
    settings = request.app.state.settings
    context = {
        "opened": opened,
        "owner": opened.principal.owner if opened else None,
        "csrf": opened.csrf_token if opened else "",
        "auth": settings.auth_enabled,
        "api": API_PREFIX,
        **data,
    }
    return templates.TemplateResponse(request, name, context, status_code=status)


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)  # after a post: the browser GETs the page


def _validation_message(error: ValidationError) -> str:
    parts = []
    for e in error.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"] if p != "config")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


# ---------------------------------------------------------------------------- sign-in
@router.get("", response_class=HTMLResponse)
def home(request: Request, opened: UiDep, session: SessionDep) -> Response:
    owner = opened.principal.owner
    job_rows, job_total = jobs.list_jobs(session, owner, limit=5)
    _, ds_total = datasets.list_datasets(session, owner, limit=1)
    model_rows, model_total = models_registry.list_models(session, owner, limit=5)
    _, audit_total = audits.list_audits(session, owner, limit=1)
    return page(
        request,
        "home.html",
        opened,
        jobs=job_rows,
        models=model_rows,
        totals={
            "datasets": ds_total,
            "jobs": job_total,
            "models": model_total,
            "audits": audit_total,
        },
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = UI_PREFIX) -> Response:
    return _login_page(request, next, None, 200)


def _login_page(request: Request, next_path: str, error: str | None, status: int) -> Response:
    token = secrets.token_urlsafe(24)
    response = page(
        request,
        "login.html",
        None,
        status,
        login_csrf=token,
        next=_safe_next(next_path),
        error=error,
    )
    response.headers.append(
        "Set-Cookie",
        set_cookie_header(
            LOGIN_CSRF_COOKIE, token, secure=request.url.scheme == "https", path=UI_PREFIX
        ),
    )
    return response


def _safe_next(path: str) -> str:
    """Only a path of this dashboard (no open redirect to another site)."""
    ok = path.startswith(UI_PREFIX) and not path.startswith("//") and "\\" not in path
    return path if ok else UI_PREFIX


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=400)] = "",
    next: Annotated[str, Form(max_length=400)] = UI_PREFIX,
    csrf_token: Csrf = None,
) -> Response:
    # Login CSRF: the token must match the cookie the form page set (double submit).
    expected = cookie_value(request.scope["headers"], LOGIN_CSRF_COOKIE)
    if not expected or not csrf_token or not secrets.compare_digest(expected, csrf_token):
        return _login_page(request, next, "The form expired: please sign in again.", 403)
    try:
        opened = ui_sessions.sign_in(session, api_key)
    except ServiceError as e:
        return _login_page(request, next, e.message, 403)
    if opened is None:
        return _login_page(request, next, "This API key is not valid (unknown or revoked).", 401)
    token, _ = opened
    response = redirect(_safe_next(next))
    response.headers.append(
        "Set-Cookie",
        set_cookie_header(
            COOKIE,
            token,
            secure=request.url.scheme == "https",
            max_age=int(ui_sessions.LIFETIME.total_seconds()),
        ),
    )
    return response


@router.post("/logout")
def logout(
    request: Request, opened: UiDep, session: SessionDep, csrf_token: Csrf = None
) -> Response:
    check_form(opened, csrf_token, scope="read")
    ui_sessions.close(session, cookie_value(request.scope["headers"], COOKIE))
    response = redirect(f"{UI_PREFIX}/login")
    response.headers.append(
        "Set-Cookie", set_cookie_header(COOKIE, "", secure=request.url.scheme == "https", max_age=0)
    )
    return response


# ---------------------------------------------------------------------------- datasets
def _datasets_page(
    request: Request, opened: Opened, session: Session, error: str | None = None, status: int = 200
) -> Response:
    rows, total = datasets.list_datasets(session, opened.principal.owner, limit=200)
    return page(request, "datasets.html", opened, status, datasets=rows, total=total, error=error)


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, opened: UiDep, session: SessionDep) -> Response:
    return _datasets_page(request, opened, session)


@router.post("/datasets", response_class=HTMLResponse)
def upload_dataset(
    request: Request,
    opened: UiDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: UploadFile,
    name: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Csrf = None,
) -> Response:
    check_form(opened, csrf_token)
    owner = opened.principal.owner
    try:
        # The API's checks: the upload quota (the API's middleware does it there), then the
        # archive checks of the service.
        size = file.size or 0
        quotas.check_upload(
            session,
            owner,
            size,
            limit_mb=settings.upload_quota_mb,
            window_seconds=settings.upload_quota_window_seconds,
        )
        row = datasets.create_from_archive(
            session,
            store,
            settings,
            owner=owner,
            name=name.strip() or _name_from(file.filename),
            upload=file.file,
        )
        if settings.upload_quota_mb > 0:
            quotas.record_upload(
                session, owner, size, window_seconds=settings.upload_quota_window_seconds
            )
    except ServiceError as e:
        return _datasets_page(request, opened, session, e.message, status_of(e))
    return redirect(f"{UI_PREFIX}/datasets/{row.id}")


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_page(
    request: Request, dataset_id: str, opened: UiDep, session: SessionDep, store: StoreDep
) -> Response:
    row = datasets.get_dataset(session, dataset_id, opened.principal.owner)
    return page(
        request,
        "dataset.html",
        opened,
        dataset=row,
        splits=thumbnails.split_sizes(row, store),
        thumbs=range(thumbnails.count(row, store)),
    )


@router.get("/datasets/{dataset_id}/thumbs/{index}.png")
def dataset_thumb(
    dataset_id: str, index: int, opened: UiDep, session: SessionDep, store: StoreDep
) -> Response:
    row = datasets.get_dataset(session, dataset_id, opened.principal.owner)
    png = thumbnails.thumbnail(row, store, index)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})


# ---------------------------------------------------------------------------- jobs
def _jobs_page(
    request: Request,
    opened: Opened,
    session: Session,
    error: str | None = None,
    status: int = 200,
    form: dict[str, Any] | None = None,
) -> Response:
    owner = opened.principal.owner
    rows, total = jobs.list_jobs(session, owner, limit=100)
    ds, _ = datasets.list_datasets(session, owner, limit=200)
    return page(
        request,
        "jobs.html",
        opened,
        status,
        jobs=rows,
        total=total,
        datasets=ds,
        error=error,
        form=form or {},
    )


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, opened: UiDep, session: SessionDep) -> Response:
    return _jobs_page(request, opened, session)


@router.post("/jobs", response_class=HTMLResponse)
def submit_train(
    request: Request,
    opened: UiDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
    settings: SettingsDep,
    dataset_id: Annotated[str, Form()] = "",
    name: Annotated[str, Form(max_length=200)] = "",
    method: Annotated[str, Form()] = "dpaat",
    epochs: Annotated[str, Form()] = "10",
    image_size: Annotated[str, Form()] = "64",
    pgd_steps: Annotated[str, Form()] = "10",
    eps_max: Annotated[str, Form()] = "8",
    limit: Annotated[str, Form()] = "",
    csrf_token: Csrf = None,
) -> Response:
    check_form(opened, csrf_token)
    form = {
        "dataset_id": dataset_id,
        "name": name,
        "method": method,
        "epochs": epochs,
        "image_size": image_size,
        "pgd_steps": pgd_steps,
        "eps_max": eps_max,
        "limit": limit,
    }
    config: dict[str, Any] = {
        "method": method,
        "epochs": epochs,
        "image_size": image_size,
        "pgd_steps": pgd_steps,
        "eps_max": eps_max,
    }
    if limit.strip():
        config["limit"] = limit
    try:
        body = TrainJobRequest.model_validate(
            {"dataset_id": dataset_id or None, "name": name.strip() or None, "config": config}
        )
        job, _ = submissions.submit_train(
            session,
            dispatcher,
            owner=opened.principal.owner,
            params=body.model_dump(mode="json"),
            idempotency_key=None,
            max_active_jobs=settings.max_active_jobs,
        )
    except ValidationError as e:
        return _jobs_page(request, opened, session, _validation_message(e), 422, form)
    except ServiceError as e:
        return _jobs_page(request, opened, session, e.message, status_of(e), form)
    return redirect(f"{UI_PREFIX}/jobs/{job.id}")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, opened: UiDep, session: SessionDep) -> Response:
    detail = job_detail(session, job_id, opened.principal.owner)
    return page(
        request,
        "job.html",
        opened,
        job=detail,
        final=jobs.is_final(detail.status),
        events_url=f"{API_PREFIX}/jobs/{job_id}/events",
    )


@router.post("/jobs/{job_id}/cancel")
def cancel_job(
    job_id: str, opened: UiDep, session: SessionDep, csrf_token: Csrf = None
) -> Response:
    check_form(opened, csrf_token)
    jobs.request_cancel(session, job_id, opened.principal.owner)
    return redirect(f"{UI_PREFIX}/jobs/{job_id}")


# ---------------------------------------------------------------------------- models
@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, opened: UiDep, session: SessionDep) -> Response:
    rows, total = models_registry.list_models(session, opened.principal.owner, limit=200)
    latest = {m.id: models_registry.latest_evaluation(session, m) for m in rows}
    return page(request, "models.html", opened, models=rows, latest=latest, total=total)


def _model_page(
    request: Request,
    opened: Opened,
    session: Session,
    model: Model,
    error: str | None = None,
    status: int = 200,
) -> Response:
    evaluation = models_registry.latest_evaluation(session, model)
    names = figures.available(session, model, evaluation)
    base = f"{API_PREFIX}/models/{model.id}"
    report = evaluation.report if evaluation else None
    rows = sorted((report or {}).get("robust", {}).values(), key=lambda r: r["eps"])
    ds, _ = datasets.list_datasets(session, opened.principal.owner, limit=200)
    model_audits, _ = audits.list_audits(
        session, opened.principal.owner, model_id=model.id, limit=20
    )
    return page(
        request,
        "model.html",
        opened,
        status,
        model=model,
        evaluation=evaluation,
        report=report,
        robust_rows=rows,
        metric_rows=([("clean", report["clean"])] if report else [])
        + [(f"{r['eps']:g}", r) for r in rows if r["eps"] > 0],
        figures=[(n, figures.FIGURES[n], f"{base}/figures/{n}.png") for n in names],
        base=base,
        datasets=[d for d in ds if list(d.classes) == list(model.classes)],
        audits=model_audits,
        error=error,
    )


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(request: Request, model_id: str, opened: UiDep, session: SessionDep) -> Response:
    model = models_registry.get_model(session, model_id, opened.principal.owner)
    return _model_page(request, opened, session, model)


@router.post("/models/{model_id}/evaluate", response_class=HTMLResponse)
def submit_evaluate(
    request: Request,
    model_id: str,
    opened: UiDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
    settings: SettingsDep,
    dataset_id: Annotated[str, Form()] = "",
    eps_list: Annotated[str, Form(max_length=200)] = "0, 0.5, 1, 2, 4, 8",
    pgd_steps: Annotated[str, Form()] = "20",
    limit: Annotated[str, Form()] = "",
    csrf_token: Csrf = None,
) -> Response:
    check_form(opened, csrf_token)
    owner = opened.principal.owner
    model = models_registry.get_model(session, model_id, owner)
    try:
        body = EvaluateJobRequest.model_validate(
            {
                "model_id": model.id,
                "dataset_id": dataset_id or None,
                "eps_list": [e for e in eps_list.replace(",", " ").split() if e],
                "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": pgd_steps}],
                **({"limit": limit} if limit.strip() else {}),
            }
        )
        job, _ = submissions.submit_evaluate(
            session,
            dispatcher,
            owner=owner,
            params=body.model_dump(mode="json"),
            idempotency_key=None,
            max_active_jobs=settings.max_active_jobs,
        )
    except ValidationError as e:
        return _model_page(request, opened, session, model, _validation_message(e), 422)
    except ServiceError as e:
        return _model_page(request, opened, session, model, e.message, status_of(e))
    return redirect(f"{UI_PREFIX}/jobs/{job.id}")


# ---------------------------------------------------------------------------- compare, ranking
@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    opened: UiDep,
    session: SessionDep,
    model: Annotated[list[str], Query(max_length=compare.MAX_ITEMS)] = [],  # noqa: B006
) -> Response:
    owner = opened.principal.owner
    rows, _ = models_registry.list_models(session, owner, limit=200)
    choices = [m for m in rows if models_registry.latest_evaluation(session, m) is not None]
    doc, error, curve = None, None, None
    if model:
        try:
            entries = compare.resolve(session, owner, [], model)
            query = urlencode([("model", m) for m in model])
            curve = f"{API_PREFIX}/compare/curve.png?{query}"
            doc = compare.comparison(entries, curve)
        except ServiceError as e:
            error = e.message
    return page(
        request,
        "compare.html",
        opened,
        choices=choices,
        picked=set(model),
        doc=doc,
        curve=curve,
        error=error,
    )


@router.get("/leaderboard", response_class=HTMLResponse)
def leaderboard_page(
    request: Request,
    opened: UiDep,
    session: SessionDep,
    dataset: str | None = None,
    threat: str | None = None,
    eps: float | None = None,
) -> Response:
    board = leaderboard.board(
        session, opened.principal.owner, dataset_id=dataset or None, threat=threat, eps=eps
    )
    names = {
        d.id: d.name for d in datasets.list_datasets(session, opened.principal.owner, limit=200)[0]
    }
    return page(request, "leaderboard.html", opened, board=board, dataset_names=names)


# ---------------------------------------------------------------------------- audits
@router.get("/audits", response_class=HTMLResponse)
def audits_page(request: Request, opened: UiDep, session: SessionDep) -> Response:
    rows, total = audits.list_audits(session, opened.principal.owner, limit=200)
    return page(request, "audits.html", opened, audits=rows, total=total)


@router.get("/audits/{audit_id}", response_class=HTMLResponse)
def audit_page(request: Request, audit_id: str, opened: UiDep, session: SessionDep) -> Response:
    audit = audits.get_audit(session, audit_id, opened.principal.owner)
    job = audits.job_of(session, audit)
    result = audit.result or {}
    names: list[str] = []
    if audit.outcome in audits.SETTLED:
        model = models_registry.get_model(session, audit.model_id)
        evaluation = audits.evaluation_of(session, audit)
        names = figures.available(session, model, evaluation) if evaluation else []
    base = f"{API_PREFIX}/audits/{audit.id}"
    return page(
        request,
        "audit.html",
        opened,
        audit=audit,
        job=job,
        result=result,
        threshold_name=audits.threshold_name,
        figures=[(n, figures.FIGURES[n], f"{base}/figures/{n}.png") for n in names],
        base=base,
        settled=audit.outcome in audits.SETTLED,
    )


# ---------------------------------------------------------------------------- predict
def _predict_page(
    request: Request, opened: Opened, session: Session, status: int = 200, **data: Any
) -> Response:
    rows, _ = models_registry.list_models(session, opened.principal.owner, limit=200)
    return page(request, "predict.html", opened, status, models=rows, **data)


@router.get("/predict", response_class=HTMLResponse)
def predict_form(
    request: Request, opened: UiDep, session: SessionDep, model: str | None = None
) -> Response:
    return _predict_page(request, opened, session, chosen=model)


@router.post("/predict", response_class=HTMLResponse)
async def predict(
    request: Request,
    opened: UiDep,
    session: SessionDep,
    settings: SettingsDep,
    predictions: PredictionsDep,
    file: UploadFile,
    model_id: Annotated[str, Form()] = "",
    csrf_token: Csrf = None,
) -> Response:
    check_form(opened, csrf_token)
    try:
        # The API's own route function: the same checks, the same prediction path.
        out = await predict_api.predict_one(
            model_id,
            session=session,
            settings=settings,
            service=predictions,
            owner=opened.principal.owner,
            file=file,
            gradcam=True,
        )
        model = await run_in_threadpool(
            models_registry.get_model, session, model_id, opened.principal.owner
        )
    except ServiceError as e:
        return _predict_page(
            request, opened, session, status_of(e), chosen=model_id, error=e.message
        )
    result = out.model_dump(by_alias=True)
    probabilities = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
    return _predict_page(
        request,
        opened,
        session,
        chosen=model_id,
        result=result,
        model=model,
        probabilities=probabilities,
        gradcam=f"data:image/png;base64,{result['gradcam_png']}" if result["gradcam_png"] else None,
        warnings=[WARNINGS.get(w, w) for w in result["warnings"]],
        image_name=Path(file.filename or "image").name,
    )
