"""Liveness, readiness and Prometheus metrics (outside /api/v1: infrastructure, not product)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.services import jobs, workers

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
def live() -> dict[str, str]:
    return {"status": "ok"}


def _error(e: Exception) -> str:
    """A failed check, as the readiness body shows it: the exception's type and first line."""
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _check_database(request: Request) -> str:
    try:
        with request.app.state.sessionmaker() as session:
            session.execute(text("SELECT 1"))
        return "ok"
    except Exception as e:
        return _error(e)


def _check_storage(request: Request) -> str:
    try:
        request.app.state.store.check()
        return "ok"
    except Exception as e:
        return _error(e)


def _check_broker(url: str | None) -> str:
    if not url:
        return "embedded (no broker configured)"
    try:
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_max=0, timeout=3)
        return "ok"
    except Exception as e:
        return _error(e)


def _check_workers(settings: Any) -> tuple[dict[str, Any], bool]:
    """Live workers per queue (full stack), and whether every required queue has one."""
    required = [q.strip() for q in settings.required_queues.split(",") if q.strip()]
    try:
        counts = workers.live_workers_per_queue()
    except Exception as e:
        return {"error": _error(e)}, not required
    report: dict[str, Any] = {q: counts.get(q, 0) for q in sorted({*counts, *required})}
    missing = [q for q in required if not counts.get(q)]
    if missing:
        report["error"] = f"error: no live worker for required queue(s) {', '.join(missing)}"
    return report, not missing


@router.get(
    "/health/ready",
    summary="The service can take requests",
    responses={503: {"description": "A dependency failed; the body says which"}},
)
async def ready(request: Request) -> JSONResponse:
    """200 when the database, the artifact store (a probe file in the directory, or a HEAD of the
    bucket) and the broker (when one is configured) answer; 503 otherwise,
    with the failing part named. With a broker, ``workers`` gives the live workers per queue;
    a queue named in ``DPAAT_REQUIRED_QUEUES`` without one makes it 503."""
    checks: dict[str, Any] = {
        "database": await run_in_threadpool(_check_database, request),
        "broker": await run_in_threadpool(_check_broker, request.app.state.settings.broker_url),
        "storage": await run_in_threadpool(_check_storage, request),
    }
    ok = all(not str(v).startswith("error") for v in checks.values())
    settings = request.app.state.settings
    body: dict[str, Any] = {"status": "", "checks": checks}
    if settings.broker_url and checks["broker"] == "ok":
        body["workers"], workers_ok = await run_in_threadpool(_check_workers, settings)
        ok = ok and workers_ok
    body["status"] = "ready" if ok else "unavailable"
    return JSONResponse(
        body,
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
