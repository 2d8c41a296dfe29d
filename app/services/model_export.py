"""Export a registered model as a zip archive (``model.json`` + safetensors or ONNX weights), the
files that ``POST /api/v1/models`` and ``dpaat audit --weights/--model-info`` take back. The work
is ``models.export``'s (imports torch, on the first export only)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db.tables import Model
from app.services import models_registry
from app.services.errors import Invalid, Unavailable
from app.services.storage import ArtifactMissing, Storage


def export_model(session: Session, store: Storage, model: Model, fmt: str) -> bytes:
    """The archive's bytes; ``Invalid`` for a format the model cannot take (an ONNX model's
    safetensors), ``Unavailable`` when its file is gone or the server has no ML extra."""
    try:
        path = store.local_path(model.weights_uri, model.checkpoint_sha256)
    except ArtifactMissing as e:
        raise Unavailable("the weights file is missing from the artifact store") from e
    try:
        import models.api as ml
        from models.export import export_archive
    except ImportError as e:
        raise Unavailable(f"export is unavailable on this server: {e}") from e
    info = models_registry.load_info(model)
    try:
        loaded = ml.load_model(path, info=info)
        source = path if model.weights_format == "onnx" else None
        return export_archive(loaded.model, {**loaded.info, "name": model.name}, fmt, source)
    except ValueError as e:
        raise Invalid(str(e)) from e
