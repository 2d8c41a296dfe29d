"""/api/v1/models: upload an external model, list, get, download weights, get the report."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse, Response
from pydantic import Json

from app.api import API_PREFIX
from app.api.deps import OwnerDep, SessionDep, SettingsDep, StoreDep
from app.db.tables import Model
from app.schemas.common import MAX_OFFSET, Page, error_responses
from app.schemas.models import EvaluationOut, ModelDescription, ModelOut
from app.services import figures, model_export, models_registry
from app.services.errors import NotFound, Unavailable
from app.services.storage import ArtifactMissing, Storage

router = APIRouter(prefix=f"{API_PREFIX}/models", tags=["models"])


def _out(model: Model, has_report: bool) -> ModelOut:
    out = ModelOut.model_validate(model)
    out.has_report = has_report
    return out


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    summary="Upload an external model (safetensors or ONNX + description)",
    responses=error_responses(413, 415, 422),
)
def upload_model(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    weights: Annotated[
        UploadFile,
        File(description="The weights: safetensors, or an ONNX file (framework onnx)."),
    ],
    description: Annotated[
        Json[ModelDescription],
        Form(
            description='JSON (model.json): {"framework": "dpaat|torchvision|timm|onnx", '
            '"architecture": "small_cnn", "classes": [...], "image_size": 64, "name": "..."}'
        ),
    ],
) -> ModelOut:
    """The description is ``model.json`` (docs/model-description.md). For safetensors the
    header is parsed and every tensor's name and shape is checked against the declared
    architecture (dpaat, torchvision or timm) and class count; an ONNX file is checked (checker,
    no external data, operators, output width) and its PyTorch conversion verified against
    onnxruntime, all before the model is registered."""
    model = models_registry.upload_model(
        session,
        store,
        owner=owner,
        description=description.model_dump(mode="json", exclude_none=True),
        weights=weights.file,
        max_bytes=settings.max_upload_mb << 20,
    )
    return _out(model, has_report=False)


@router.get("", response_model=Page[ModelOut], summary="List models")
def list_models(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[ModelOut]:
    rows, total = models_registry.list_models(session, owner, limit=limit, offset=offset)
    items = [_out(m, models_registry.latest_evaluation(session, m) is not None) for m in rows]
    return Page[ModelOut](items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/{model_id}", response_model=ModelOut, summary="Get a model", responses=error_responses(404)
)
def get_model(model_id: str, session: SessionDep, owner: OwnerDep) -> ModelOut:
    model = models_registry.get_model(session, model_id, owner)
    return _out(model, models_registry.latest_evaluation(session, model) is not None)


def _existing(store: Storage, uri: str, what: str, sha256: str | None = None) -> str:
    try:
        return str(store.local_path(uri, sha256))  # on object storage: via this host's cache
    except ArtifactMissing as e:
        raise Unavailable(f"the {what} is missing from the artifact store") from e


@router.get(
    "/{model_id}/weights",
    response_class=FileResponse,
    summary="Download the weights",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The weights file"},
        **error_responses(404),
    },
)
def download_weights(
    model_id: str, session: SessionDep, store: StoreDep, owner: OwnerDep
) -> FileResponse:
    """A trained model's checkpoint (``.pt``, load with ``torch.load(weights_only=True)``) or an
    uploaded model's ``.safetensors`` or ``.onnx``; the ETag is the file's sha256. For a file
    without pickles or server paths, use ``/export``."""
    model = models_registry.get_model(session, model_id, owner)
    suffix = {"checkpoint": ".pt", "onnx": ".onnx"}.get(model.weights_format, ".safetensors")
    return FileResponse(
        _existing(store, model.weights_uri, "weights file", model.checkpoint_sha256),
        media_type="application/octet-stream",
        filename=f"model-{model.id}{suffix}",
        headers={"ETag": f'"{model.checkpoint_sha256}"'},
    )


@router.get(
    "/{model_id}/report",
    response_model=EvaluationOut,
    summary="Get the model's latest robustness report",
    responses={
        200: {"content": {"text/markdown": {}}, "description": "JSON, or Markdown with ?format=md"},
        **error_responses(404),
    },
)
def get_report(
    model_id: str,
    session: SessionDep,
    store: StoreDep,
    owner: OwnerDep,
    format: Annotated[Literal["json", "md"], Query()] = "json",
) -> Response | EvaluationOut:
    """The report of the latest evaluation (404 while the model has none). The Markdown links
    its figures by their API URLs (``/models/{id}/figures/{name}.png``)."""
    model = models_registry.get_model(session, model_id, owner)
    evaluation = models_registry.latest_evaluation(session, model)
    if evaluation is None:
        raise NotFound(f"model {model_id} has no evaluation report yet")
    if format == "md":
        if evaluation.report_md_uri is None:
            raise NotFound("this report has no Markdown rendering")
        path = _existing(store, evaluation.report_md_uri, "Markdown report")
        with open(path, encoding="utf-8") as f:
            stored = f.read()
        names = figures.available(session, model, evaluation)
        text = figures.model_markdown(stored, f"{API_PREFIX}/models/{model.id}/figures", names)
        return PlainTextResponse(text, media_type="text/markdown")
    return EvaluationOut.model_validate(evaluation)


@router.get(
    "/{model_id}/figures/{name}.png",
    response_class=FileResponse,
    summary="A figure of the model's latest report, or of its DPAAT training run",
    responses={200: {"content": {"image/png": {}}}, **error_responses(404)},
)
def get_figure(
    model_id: str, name: str, session: SessionDep, store: StoreDep, owner: OwnerDep
) -> FileResponse:
    """``robustness_curve``, ``class_recall``, ``gradcam_montage`` (of the latest evaluation),
    ``dpaat_eps_hist`` and ``dpaat_tau`` (of the training run, for a model trained here with
    DPAAT; these need no evaluation). 404 for a figure this model does not have."""
    model = models_registry.get_model(session, model_id, owner)
    evaluation = models_registry.latest_evaluation(session, model)
    path = figures.path_of(session, store, name, model, evaluation)
    return FileResponse(str(path), media_type="image/png")


@router.get(
    "/{model_id}/export",
    response_class=Response,
    summary="Export the model: model.json + safetensors or ONNX, in a zip archive",
    responses={
        200: {"content": {"application/zip": {}}, "description": "The archive"},
        **error_responses(404, 422),
    },
)
def export_model(
    model_id: str,
    session: SessionDep,
    store: StoreDep,
    owner: OwnerDep,
    format: Annotated[Literal["safetensors", "onnx"], Query()] = "safetensors",
) -> Response:
    """A zip of ``model.json`` and ``model.safetensors`` or ``model.onnx``: no pickle, no server
    path. It goes back into ``POST /models`` or ``dpaat audit --weights ... --model-info
    model.json`` as it is. The ONNX export is checked against the PyTorch model (logits within
    1e-4); an ONNX model exports only as ONNX (422 for safetensors)."""
    model = models_registry.get_model(session, model_id, owner)
    data = model_export.export_model(session, store, model, format)
    return Response(
        data,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="model-{model.id}-{format}.zip"'},
    )
