"""Liveness, readiness and Prometheus metrics (outside /api/v1: infrastructure, not product)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.services import jobs

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
def live() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(request: Request) -> str:
    try:
        with request.app.state.sessionmaker() as session:
            session.execute(text("SELECT 1"))
        return "ok"
    except Exception as e:
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _check_broker(url: str | None) -> str:
    if not url:
        return "embedded (no broker configured)"
    try:
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_max=0, timeout=3)
        return "ok"
    except Exception as e:
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


@router.get(
    "/health/ready",
    summary="The service can take requests",
    responses={503: {"description": "A dependency failed; the body says which"}},
)
async def ready(request: Request) -> JSONResponse:
    """200 when the database (and the broker, when one is configured) answer; 503 otherwise,
    with the failing part named."""
    checks: dict[str, Any] = {
        "database": await run_in_threadpool(_check_database, request),
        "broker": await run_in_threadpool(_check_broker, request.app.state.settings.broker_url),
    }
    ok = all(not str(v).startswith("error") for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )


def _refresh_job_gauge(request: Request) -> None:
    request.app.state.predictions.refresh_metrics()  # queue depth, batch sizes
    metrics = request.app.state.metrics
    try:
        with request.app.state.sessionmaker() as session:
            counts = jobs.counts_by_status(session)
    except Exception:  # metrics must answer even when the database does not
        return
    for status, n in counts.items():
        metrics.jobs.labels(status).set(n)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    await run_in_threadpool(_refresh_job_gauge, request)
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
