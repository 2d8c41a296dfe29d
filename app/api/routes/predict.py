"""/api/v1/models/{id}/predict: classify uploaded images and score their robustness.

Images are size-checked, decoded and re-encoded here; the torch work is the workers'
(``app.services.prediction``, the entry point the web pages use too).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api import API_PREFIX
from app.api.deps import OwnerDep, PredictionsDep, SessionDep, SettingsDep
from app.core.settings import Settings
from app.schemas.common import error_responses
from app.schemas.predict import BatchPredictionOut, Prediction, PredictionOut
from app.services import images, prediction
from app.services.errors import ServiceError, TooLarge

router = APIRouter(prefix=f"{API_PREFIX}/models", tags=["predict"])

_RESPONSES = error_responses(404, 413, 415, 422, 503)
GradcamQ = Annotated[bool, Query(description="Add a Grad-CAM heat map (base64 PNG).")]
CapQ = Annotated[
    float | None,
    Query(
        ge=prediction.MIN_CAP,
        le=prediction.MAX_CAP,
        description=(
            f"Largest radius the eps_star search tries, in 1/255 units, between "
            f"{prediction.MIN_CAP:g} and {prediction.MAX_CAP:g} (default: the server's, 16). "
            "score = min(eps_star / cap, 1), so the score depends on it."
        ),
    ),
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


async def _named_image(index: int, upload: UploadFile, settings: Settings) -> bytes:
    """``_read_image`` whose error names the image of a batch: its index and file name."""
    try:
        return await _read_image(upload, settings)
    except ServiceError as e:
        name = PurePath((upload.filename or "").replace("\\", "/")).name[:100]
        raise type(e)(f"image {index} ({name or 'no file name'}): {e.message}") from e


async def _predict(
    service: prediction.PredictionService,
    spec: prediction.ModelSpec,
    data: list[bytes],
    params: prediction.PredictParams,
) -> list[Prediction]:
    results = await service.predict(spec, data, params)
    return [Prediction.model_validate({"index": i, **r}) for i, r in enumerate(results)]


@router.post(
    "/{model_id}/predict",
    response_model=PredictionOut,
    summary="Classify one image with a robustness score",
    responses=_RESPONSES,
)
async def predict_one(
    model_id: str,
    session: SessionDep,
    settings: SettingsDep,
    service: PredictionsDep,
    owner: OwnerDep,
    file: Annotated[UploadFile, File(description="A JPEG or PNG image.")],
    gradcam: GradcamQ = False,
    cap: CapQ = None,
    steps: StepsQ = None,
    eps: EpsQ = None,
) -> PredictionOut:
    """Predicted class, probabilities and top probability, ``warnings``, and how far the
    prediction survives attacks: eps_star (the smallest L-inf radius found to flip the
    prediction, searched up to ``cap``), stability at each radius and score in [0, 1]. The score
    measures the model's stability around this image, not whether the diagnosis is right: read
    ``warnings`` first (docs/prediction.md). 503 + Retry-After when no worker answers in time."""
    params = prediction.predict_params(settings, cap=cap, steps=steps, eps=eps, gradcam=gradcam)
    spec = await run_in_threadpool(prediction.model_spec, session, model_id, owner)
    data = [await _read_image(file, settings)]
    (result,) = await _predict(service, spec, data, params)
    return PredictionOut.model_validate({**result.model_dump(by_alias=True), "model_id": spec.id})


@router.post(
    "/{model_id}/predict/batch",
    response_model=BatchPredictionOut,
    summary="Classify several images",
    responses=_RESPONSES,
)
async def predict_batch(
    model_id: str,
    session: SessionDep,
    settings: SettingsDep,
    service: PredictionsDep,
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
    params = prediction.predict_params(settings, cap=cap, steps=steps, eps=eps, gradcam=gradcam)
    spec = await run_in_threadpool(prediction.model_spec, session, model_id, owner)
    data = [await _named_image(i, f, settings) for i, f in enumerate(files)]
    predictions = await _predict(service, spec, data, params)
    return BatchPredictionOut(model_id=spec.id, predictions=predictions)
