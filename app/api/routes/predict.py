"""/api/v1/models/{id}/predict: classify uploaded images and score their robustness.

The torch work runs in a thread pool (the event loop keeps serving other requests); images are
size-checked, decoded and re-encoded before the model sees them.
"""

from __future__ import annotations

import base64
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api import API_PREFIX
from app.api.deps import OwnerDep, PredictorDep, SessionDep, SettingsDep, StoreDep
from app.core.settings import Settings
from app.schemas.common import error_responses
from app.schemas.predict import BatchPredictionOut, Prediction, PredictionOut
from app.services import images, models_registry
from app.services.errors import Invalid, TooLarge
from app.services.predictor import ModelSpec
from app.services.storage import ArtifactStore

router = APIRouter(prefix=f"{API_PREFIX}/models", tags=["predict"])

_RESPONSES = error_responses(404, 413, 415, 422, 503)
GradcamQ = Annotated[bool, Query(description="Add a Grad-CAM heat map (base64 PNG).")]
CapQ = Annotated[
    float | None,
    Query(gt=0, le=64, description="eps_star search cap, 1/255 units (default: server's)."),
]
StepsQ = Annotated[int | None, Query(ge=1, le=50, description="PGD steps per radius.")]
EpsQ = Annotated[
    list[float] | None,
    Query(description="Radii for stable_at, 1/255 units (default 0.5, 1, 2, 4, 8)."),
]


async def _read_image(upload: UploadFile, settings: Settings) -> bytes:
    """The sanitized PNG bytes of one uploaded image (read at most limit + 1 bytes)."""
    images.check_content_type(upload.content_type)
    limit = settings.max_image_mb << 20
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"image exceeds the limit of {settings.max_image_mb} MB")
    return await run_in_threadpool(
        images.sanitize_image, data, max_bytes=limit, max_pixels=settings.max_image_pixels
    )


def _spec(session: Any, store: ArtifactStore, model_id: str, owner: str) -> ModelSpec:
    model = models_registry.get_model(session, model_id, owner)
    return ModelSpec(
        id=model.id,
        sha256=model.checkpoint_sha256,
        weights_path=store.path(model.weights_uri),
        weights_format=model.weights_format,
        architecture=model.architecture,
        classes=tuple(model.classes),
        image_size=model.image_size,
        info=dict(model.info),
    )


async def _predict(
    spec: ModelSpec,
    data: list[bytes],
    predictor: Any,
    settings: Settings,
    cap: float | None,
    steps: int | None,
    eps: list[float] | None,
    gradcam: bool,
) -> list[Prediction]:
    cap = cap or settings.predict_cap
    eps_list = tuple(sorted(set(eps))) if eps else (0.5, 1.0, 2.0, 4.0, 8.0)
    if any(not 0 < e <= 64 for e in eps_list):
        raise Invalid("eps values must be in (0, 64] (1/255 units)")
    work = partial(
        predictor.predict,
        spec,
        data,
        cap=cap,
        eps_list=eps_list,
        steps=steps or settings.predict_steps,
        gradcam=gradcam,
    )
    # Waiting predictions wait here, on the event loop, not in threads of the shared pool: a
    # burst of them would otherwise hold every thread and starve cheap requests (job status).
    results = await anyio.to_thread.run_sync(work, limiter=predictor.limiter)
    return [
        Prediction.model_validate(
            {
                "index": i,
                "class": r["class"],
                "probabilities": r["probabilities"],
                "robustness": r["robustness"],
                "gradcam_png": base64.b64encode(r["gradcam_png"]).decode()
                if r.get("gradcam_png")
                else None,
            }
        )
        for i, r in enumerate(results)
    ]


@router.post(
    "/{model_id}/predict",
    response_model=PredictionOut,
    summary="Classify one image with a robustness score",
    responses=_RESPONSES,
)
async def predict_one(
    model_id: str,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    owner: OwnerDep,
    file: Annotated[UploadFile, File(description="A JPEG or PNG image.")],
    gradcam: GradcamQ = False,
    cap: CapQ = None,
    steps: StepsQ = None,
    eps: EpsQ = None,
) -> PredictionOut:
    """Predicted class and probabilities, plus eps_star (the smallest L-inf radius that flips
    the prediction, searched up to ``cap``), stability at each radius and score in [0, 1]."""
    spec = await run_in_threadpool(_spec, session, store, model_id, owner)
    data = [await _read_image(file, settings)]
    (prediction,) = await _predict(spec, data, predictor, settings, cap, steps, eps, gradcam)
    return PredictionOut.model_validate(
        {**prediction.model_dump(by_alias=True), "model_id": spec.id}
    )


@router.post(
    "/{model_id}/predict/batch",
    response_model=BatchPredictionOut,
    summary="Classify several images",
    responses=_RESPONSES,
)
async def predict_batch(
    model_id: str,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    predictor: PredictorDep,
    owner: OwnerDep,
    files: Annotated[list[UploadFile], File(description="JPEG or PNG images.")],
    gradcam: GradcamQ = False,
    cap: CapQ = None,
    steps: StepsQ = None,
    eps: EpsQ = None,
) -> BatchPredictionOut:
    """The single-image answer for each image, in request order (``index``)."""
    if len(files) > settings.max_batch_images:
        raise TooLarge(f"at most {settings.max_batch_images} images per request")
    spec = await run_in_threadpool(_spec, session, store, model_id, owner)
    data = [await _read_image(f, settings) for f in files]
    predictions = await _predict(spec, data, predictor, settings, cap, steps, eps, gradcam)
    return BatchPredictionOut(model_id=spec.id, predictions=predictions)
