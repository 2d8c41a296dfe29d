"""/api/v1/jobs: submit training and evaluation jobs, list, get, cancel, stream progress."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.api import API_PREFIX
from app.api.deps import DispatcherDep, OwnerDep, ReaderDep, SessionDep, SettingsDep
from app.schemas.common import MAX_OFFSET, Page, error_responses
from app.schemas.jobs import (
    EpochOut,
    EvaluateJobRequest,
    JobDetail,
    JobOut,
    Status,
    TrainJobRequest,
    vital_signs,
)
from app.services import jobs, submissions
from app.services.errors import NotFound

router = APIRouter(prefix=f"{API_PREFIX}/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="Retry-safe submit: the same key (per API key) returns the job it created "
        "(200) instead of a new one (201); the same key with a different body is a 409.",
    ),
]
_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobOut, "description": "An earlier submit with this Idempotency-Key"},
    **error_responses(404, 409, 422, 429),
}


def _submitted(response: Response, job_and_created: tuple[Any, bool]) -> JobOut:
    job, created = job_and_created
    response.status_code = 201 if created else 200
    if created:
        response.headers["Location"] = f"{API_PREFIX}/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.post(
    "/train",
    status_code=201,
    response_model=JobOut,
    summary="Submit a training job",
    responses=_SUBMIT_RESPONSES,
)
def submit_train(
    body: TrainJobRequest,
    response: Response,
    session: SessionDep,
    dispatcher: DispatcherDep,
    owner: OwnerDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Queue a training run of ``config.method`` (DPAAT or a baseline) on a dataset. The finished
    job registers its model (see ``result.model_id``)."""
    return _submitted(
        response,
        submissions.submit_train(
            session,
            dispatcher,
            owner=owner,
            params=body.model_dump(mode="json"),
            idempotency_key=idempotency_key,
            max_active_jobs=settings.max_active_jobs,
        ),
    )


@router.post(
    "/evaluate",
    status_code=201,
    response_model=JobOut,
    summary="Submit an evaluation job",
    responses=_SUBMIT_RESPONSES,
)
def submit_evaluate(
    body: EvaluateJobRequest,
    response: Response,
    session: SessionDep,
    dispatcher: DispatcherDep,
    owner: OwnerDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Queue a robustness evaluation of a model (attacks x eps, metrics, Grad-CAM, checks).
    The report becomes the model's report when the job succeeds."""
    return _submitted(
        response,
        submissions.submit_evaluate(
            session,
            dispatcher,
            owner=owner,
            params=body.model_dump(mode="json"),
            idempotency_key=idempotency_key,
            max_active_jobs=settings.max_active_jobs,
        ),
    )


@router.get("", response_model=Page[JobOut], summary="List jobs")
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: Annotated[Status | None, Query(description="Only jobs in this status.")] = None,
    kind: Annotated[str | None, Query(pattern="^(train|evaluate)$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[JobOut]:
    rows, total = jobs.list_jobs(
        session, owner, status=status, kind=kind, limit=limit, offset=offset
    )
    items = [JobOut.model_validate(r) for r in rows]
    return Page[JobOut](items=items, total=total, limit=limit, offset=offset)


def _detail(session: Session, job_id: str, owner: str) -> JobDetail:
    job = jobs.get_job_with_epochs(session, job_id, owner)
    epochs = [EpochOut.model_validate(e) for e in job.epochs]
    return JobDetail.model_validate(
        {
            **JobOut.model_validate(job).model_dump(),
            "epochs": epochs,
            "vital_signs": vital_signs(epochs),
        }
    )


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    summary="Get a job",
    responses=error_responses(404),
)
def get_job(job_id: str, session: ReaderDep, owner: OwnerDep) -> JobDetail:
    """Status, progress, per-epoch metrics, DPAAT's vital signs (tau, eps histogram), result and
    error of a job."""
    return _detail(session, job_id, owner)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    summary="Cancel a job",
    responses=error_responses(404, 409),
)
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobOut:
    """A queued job is cancelled at once; a running one becomes ``cancel_requested`` and its
    worker stops between steps. 409 for a job that already succeeded or failed."""
    return JobOut.model_validate(jobs.request_cancel(session, job_id, owner))


def _snapshot(factory: sessionmaker[Session], job_id: str, owner: str) -> dict[str, Any]:
    """What the stream reports about a job (one statement: ``get_job_with_epochs``)."""
    with factory() as session:
        job = jobs.get_job_with_epochs(session, job_id, owner)
        epochs = job.epochs
        return {
            "id": job.id,
            "status": job.status,
            "progress": job.progress,
            "retries": job.retries,
            "error": job.error,
            "result": job.result,
            "epochs_done": len(epochs),
            "last_epoch": epochs[-1].metrics if epochs else None,
            "updated_at": job.updated_at.isoformat(),
        }


def _event(seq: int, name: str, data: dict[str, Any]) -> str:
    return f"id: {seq}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get(
    "/{job_id}/events",
    summary="Stream a job's progress (server-sent events)",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "``event: job`` with the job's state at every change; the stream "
            "ends after the event that reports a final state (succeeded, failed, cancelled).",
            "content": {"text/event-stream": {"example": 'id: 1\nevent: job\ndata: {"status":'}},
        },
        **error_responses(404),
    },
)
async def job_events(
    job_id: str, request: Request, owner: OwnerDep, settings: SettingsDep
) -> StreamingResponse:
    """Polls the database at most every ``sse_poll_seconds`` and sends an event per change."""
    factory: sessionmaker[Session] = request.app.state.reader
    first = await run_in_threadpool(_snapshot, factory, job_id, owner)  # 404 before streaming

    async def stream() -> AsyncIterator[str]:
        seq, last, snap = 0, None, first
        started = last_sent = time.monotonic()
        while True:
            if snap != last:
                seq += 1
                yield _event(seq, "job", snap)
                last, last_sent = snap, time.monotonic()
            if jobs.is_final(snap["status"]):
                return
            if time.monotonic() - started > settings.sse_max_seconds:
                yield _event(seq + 1, "timeout", {"id": job_id, "status": snap["status"]})
                return
            if time.monotonic() - last_sent > 15:
                yield ": keep-alive\n\n"  # a comment: keeps proxies from closing an idle stream
                last_sent = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.sse_poll_seconds)
            try:
                snap = await run_in_threadpool(_snapshot, factory, job_id, owner)
            except NotFound:
                yield _event(seq + 1, "gone", {"id": job_id})
                return

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
