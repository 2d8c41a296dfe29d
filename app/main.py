"""The FastAPI application: ``create_app(settings)`` for tests and embedding, ``app`` for uvicorn
(``uvicorn app.main:app``). Importing this module never imports torch."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import API_PREFIX, errors
from app.api.auth import AuthMiddleware
from app.api.input_policy import InputPolicyMiddleware
from app.api.limits import BodyLimitMiddleware
from app.api.metrics import Metrics, MetricsMiddleware
from app.api.routes import audits, compare, datasets, health, jobs, keys, models, predict
from app.core.settings import Settings, get_settings
from app.db.session import make_engine, make_sessionmaker
from app.schemas.common import ErrorOut
from app.services import images
from app.services.prediction import PredictionService
from app.services.storage import open_store
from app.services.submissions import Dispatcher
from app.ui import UI_PREFIX
from app.ui import install as ui

log = logging.getLogger(__name__)

JSON_BODY_LIMIT = 1 << 20
DESCRIPTION = """
Robustness evaluation service for medical image classifiers.

Upload or register a **dataset**, submit **training jobs** (DPAAT, dynamic perturbation-adaptive
adversarial training, or a baseline: standard, pgd_at, trades, amat_external, iaat_flip) and
**evaluation jobs** (FGSM, PGD, APGD, Square over an eps list, with Grad-CAM and validity checks),
follow them live (server-sent events), then **predict** with a robustness score per image.

All perturbation radii (eps) are in 1/255 units of [0, 1] pixels. Requests carry an API key
(`X-API-Key: dpk_...` or `Authorization: Bearer dpk_...`; 401 without a valid one) whose scopes
allow them: `read` for GET, `submit` for everything that creates, cancels, deletes or predicts,
`admin` for /api/v1/keys (403 without the scope). Every object belongs to the owner of the key
that created it; another owner gets 404. Per-owner quotas on active jobs and upload volume answer
429 with Retry-After. (The embedded default may run with authentication off: then the owner is a
hash of `X-API-Key`, or "local" without one.) Errors are JSON `{"detail": ...}`.
"""


def _default_dispatcher(job_id: str, kind: str) -> None:
    """Send the job's task (imported on first use: Celery is not needed to serve reads)."""
    from app.services.dispatch import dispatch

    dispatch(job_id, kind)


def _body_limits(settings: Settings) -> Callable[[str], int]:
    uploads = settings.max_upload_mb << 20
    images = (settings.max_image_mb << 20) * settings.max_batch_images + (1 << 20)

    def limit_for(path: str) -> int:
        if path.endswith("/predict") or path.endswith("/predict/batch"):  # API and dashboard
            return images
        if path.rstrip("/") in (f"{API_PREFIX}/{p}" for p in ("datasets", "models", "audits")):
            return uploads
        if path == f"{UI_PREFIX}/datasets":  # the dashboard's upload form
            return uploads
        return JSON_BODY_LIMIT

    return limit_for


def _log_auth(settings: Settings) -> None:
    if settings.auth_enabled:
        log.info("authentication on: API keys required (DPAAT_AUTH=%s)", settings.auth)
    else:
        log.warning(
            "AUTHENTICATION IS OFF (DPAAT_AUTH=%s, %s): no API key is checked; rows are separated "
            "by a hash of X-API-Key only. Never expose this service to a network.",
            settings.auth,
            "the embedded default" if not settings.full_stack else "full stack",
        )


def create_app(
    settings: Settings | None = None, *, dispatcher: Dispatcher | None = None
) -> FastAPI:
    """An application bound to ``settings`` (default: the environment's).

    ``dispatcher(job_id, kind)`` sends a job's task (default: ``app.services.dispatch``).
    """
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    _log_auth(settings)
    images.enforce_pixel_limit(settings.max_image_pixels)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            from app.db.migrate import upgrade

            upgrade(settings.database_url)
        yield
        await _app.state.predictions.aclose()
        engine.dispose()

    app = FastAPI(
        title="DPAAT robustness service",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc are served from local assets by app.ui.install
        redoc_url=None,
        responses={
            400: {"model": ErrorOut, "description": "Malformed request (unparsable body)"},
            413: {"model": ErrorOut, "description": "Request body over the size limit"},
        },
        openapi_tags=[
            {"name": "datasets", "description": "Labelled image collections."},
            {"name": "jobs", "description": "Training and evaluation jobs."},
            {"name": "models", "description": "Trained and uploaded classifiers, reports."},
            {"name": "predict", "description": "Robust classification of images."},
            {"name": "audits", "description": "CI gates: thresholds and regression checks."},
            {"name": "keys", "description": "API keys (admin scope)."},
            {"name": "health", "description": "Liveness, readiness, metrics."},
        ],
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.reader = make_sessionmaker(engine, reads_only=True)  # key checks, job status
    app.state.store = open_store(settings)  # a directory, or S3 (issue 15)
    app.state.dispatcher = dispatcher or _default_dispatcher
    app.state.metrics = Metrics()
    # Predictions: on the workers, or in this process without a broker (issue 12).
    app.state.predictions = PredictionService(settings, app.state.metrics.registry)

    errors.install(app)
    ui.install(app, settings)  # the dashboard (/ui) and offline /docs, /redoc
    # Issue 14: one text policy (no control/bidi characters, bounded lengths) for every path,
    # query and body field of every route; inside the body limit and the key check.
    app.add_middleware(InputPolicyMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit_for=_body_limits(settings))
    # Outside the body limit: a request without a valid key is refused before anything else.
    app.add_middleware(
        AuthMiddleware,
        settings=settings,
        factory=app.state.sessionmaker,
        reader=app.state.reader,
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(errors.DatabaseDownMiddleware)  # outermost: covers the layers above

    # Each router carries its full prefix, so metrics see the full route template.
    for module in (datasets, jobs, models, predict, audits, compare, keys, health):
        app.include_router(module.router)
    return app


def __getattr__(name: str) -> FastAPI:
    # ``app`` is built on first access, so importing this module reads no environment and opens
    # no database (tests import create_app without side effects); uvicorn's "app.main:app" works.
    if name == "app":
        instance = globals()["app"] = create_app()
        return instance
    raise AttributeError(name)
