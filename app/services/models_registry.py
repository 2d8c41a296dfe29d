"""The model registry: trained models (registered by the worker when a training job finishes),
uploaded models (safetensors + description), and their evaluation reports."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Artifact, Evaluation, Job, Model
from app.services.errors import Invalid, NotFound
from app.services.storage import ArtifactRef, Storage

_REPORT_KINDS = {
    ".json": "report_json",
    ".md": "report_md",
    ".png": "report_plot",
    ".xml": "report_junit",
}
# Report files recognised by name before their suffix (a second PNG is not the curve).
_NAMED_KINDS = {"gradcam_montage.png": "report_gradcam"}


def _default_store() -> Storage:
    from app.core.settings import get_settings
    from app.services.storage import open_store

    return open_store(get_settings())


def _stored(store: Storage, path: str | Path, job_id: str | None) -> ArtifactRef:
    """A job's output file published at ``jobs/<job_id>/<name>`` (no copy when it already is
    that file of a directory store); without a job, copied in under a generated name."""
    if not Path(path).is_file():
        raise Invalid(f"{path} is not a file")
    if job_id is None:
        return store.put_file(path)
    return store.publish(path, f"jobs/{job_id}/{Path(path).name}")


def _add_artifact(
    session: Session,
    ref: ArtifactRef,
    *,
    owner: str,
    kind: str,
    job_id: str | None = None,
    model_id: str | None = None,
) -> Artifact:
    row = Artifact(
        owner=owner,
        uri=ref.uri,
        size=ref.size,
        sha256=ref.sha256,
        kind=kind,
        job_id=job_id,
        model_id=model_id,
    )
    session.add(row)
    return row


def register_trained_model(
    session: Session,
    job: Job,
    checkpoint_path: str | Path,
    model_info: Mapping[str, Any],
    *,
    checkpoint_sha256: str | None = None,
    report: Mapping[str, Any] | None = None,
    report_files: Mapping[str, str | Path] | None = None,
    name: str | None = None,
    store: Storage | None = None,
) -> Model:
    """Record the model a training job produced (idempotent: a job registers one model).

    ``model_info`` is ``TrainResult.model_info`` (arch, classes, image_size, method, ...). The
    checkpoint is published at ``jobs/<job_id>/<name>`` (no copy when the worker wrote it there,
    in a directory store; uploaded on object storage). ``report`` (+ the files ``write_report``
    wrote) records an evaluation of the new model when the job ran one. Commits.
    """
    existing = session.scalars(select(Model).where(Model.job_id == job.id)).one_or_none()
    if existing is not None:
        return existing
    for key in ("arch", "classes", "image_size"):
        if key not in model_info:
            raise Invalid(f"model_info lacks {key!r}")
    store = store or _default_store()
    ref = _stored(store, checkpoint_path, job.id)
    if checkpoint_sha256 is not None and checkpoint_sha256 != ref.sha256:
        raise Invalid("the checkpoint changed while it was being registered (sha256 mismatch)")
    arch = str(model_info["arch"])
    method = model_info.get("method") or job.params.get("config", {}).get("method")
    model = Model(
        owner=job.owner,
        name=name or job.params.get("name") or f"{arch}-{method or 'model'}-{job.id[:8]}",
        source="trained",
        weights_format="checkpoint",
        architecture=arch,
        classes=[str(c) for c in model_info["classes"]],
        image_size=int(model_info["image_size"]),
        training_method=str(method) if method else None,
        checkpoint_sha256=ref.sha256,
        weights_uri=ref.uri,
        info=_jsonable(model_info),
        job_id=job.id,
        dataset_id=job.dataset_id,
    )
    session.add(model)
    session.flush()
    _add_artifact(
        session, ref, owner=job.owner, kind="checkpoint", job_id=job.id, model_id=model.id
    )
    if report is not None:
        _add_evaluation(session, store, model, report, report_files, job=None)
    session.commit()
    return model


def register_evaluation(
    session: Session,
    job: Job,
    model_id: str,
    report: Mapping[str, Any],
    report_files: Mapping[str, str | Path] | None = None,
    *,
    store: Storage | None = None,
) -> Evaluation:
    """Record the report of an evaluation job (idempotent per job). Commits."""
    existing = session.scalars(select(Evaluation).where(Evaluation.job_id == job.id)).one_or_none()
    if existing is not None:
        return existing
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    store = store or _default_store()
    evaluation = _add_evaluation(session, store, model, report, report_files, job)
    session.commit()
    return evaluation


def _add_evaluation(
    session: Session,
    store: Storage,
    model: Model,
    report: Mapping[str, Any],
    report_files: Mapping[str, str | Path] | None,
    job: Job | None,
) -> Evaluation:
    uris: dict[str, str] = {}
    for path in (report_files or {}).values():
        name = Path(path).name
        kind = _NAMED_KINDS.get(name) or _REPORT_KINDS.get(Path(path).suffix.lower(), "other")
        ref = _stored(store, path, job.id if job else model.job_id)
        _add_artifact(
            session,
            ref,
            owner=model.owner,
            kind=kind,
            job_id=job.id if job else model.job_id,
            model_id=model.id,
        )
        uris[kind] = ref.uri
    evaluation = Evaluation(
        owner=model.owner,
        model_id=model.id,
        dataset_id=job.dataset_id if job else model.dataset_id,
        job_id=job.id if job else None,
        report=_jsonable(report),
        verdict=str(report.get("verdict", "unknown"))[:16],
        report_md_uri=uris.get("report_md"),
        plot_uri=uris.get("report_plot"),
    )
    session.add(evaluation)
    session.flush()
    return evaluation


def register_uploaded_model(
    session: Session,
    *,
    owner: str,
    ref: ArtifactRef,
    description: Mapping[str, Any],
) -> Model:
    """Record an uploaded model (safetensors or ONNX) whose file and description were already
    validated."""
    model = Model(
        owner=owner,
        name=str(description.get("name") or f"{description['architecture']}-upload"),
        source="uploaded",
        weights_format="onnx" if description.get("framework") == "onnx" else "safetensors",
        architecture=qualified_arch(description),
        classes=list(description["classes"]),
        image_size=int(description["image_size"]),
        training_method=description.get("training_method"),
        checkpoint_sha256=ref.sha256,
        weights_uri=ref.uri,
        info=_jsonable(description),
    )
    session.add(model)
    session.flush()
    _add_artifact(session, ref, owner=owner, kind="weights", model_id=model.id)
    session.commit()
    return model


def get_model(session: Session, model_id: str, owner: str | None = None) -> Model:
    """The model with this id (of this owner when given); ``NotFound`` otherwise."""
    model = session.get(Model, model_id)
    if model is None or (owner is not None and model.owner != owner):
        raise NotFound(f"model {model_id} not found")
    return model


def list_models(
    session: Session, owner: str, *, limit: int = 50, offset: int = 0
) -> tuple[list[Model], int]:
    """A page of the owner's models, newest first, and their total."""
    total = session.scalar(select(func.count()).select_from(Model).where(Model.owner == owner))
    rows = session.scalars(
        select(Model)
        .where(Model.owner == owner)
        .order_by(Model.created_at.desc(), Model.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), int(total or 0)


def latest_evaluation(session: Session, model: Model) -> Evaluation | None:
    """The newest evaluation of a model, if any."""
    return session.scalars(
        select(Evaluation)
        .where(Evaluation.model_id == model.id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id)
        .limit(1)
    ).first()


def _jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy (tuples -> lists, paths -> strings, numpy/torch scalars -> floats)."""
    import json

    return json.loads(json.dumps(dict(value), default=_default))


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def upload_model(
    session: Session,
    store: Storage,
    *,
    owner: str,
    description: Mapping[str, Any],
    weights: BinaryIO,
    max_bytes: int,
) -> Model:
    """Store an uploaded safetensors or ONNX file, check it against its description (see
    :func:`check_weights`) and register it. Nothing is kept when a check fails."""
    ref = store.put_stream(weights, weights_suffix(description), max_bytes=max_bytes)
    try:
        summary = check_weights(store, ref, description)
        return register_uploaded_model(
            session, owner=owner, ref=ref, description={**description, **summary}
        )
    except BaseException:
        session.rollback()
        store.delete(ref.uri)
        raise


def qualified_arch(description: Mapping[str, Any]) -> str:
    """The architecture as the ML core names it: small_cnn, torchvision/resnet18, timm/..., onnx
    (the same rule as ``ModelDescription.arch``, for descriptions stored as dicts)."""
    framework = str(description.get("framework") or "dpaat")
    name = str(description["architecture"])
    if framework == "dpaat":
        return name
    return "onnx" if framework == "onnx" else f"{framework}/{name}"


def weights_suffix(description: Mapping[str, Any]) -> str:
    return ".onnx" if description.get("framework") == "onnx" else ".safetensors"


def check_weights(
    store: Storage, ref: ArtifactRef, description: Mapping[str, Any]
) -> dict[str, Any]:
    """Check a stored upload against its description before anything is registered:
    safetensors (header, every tensor's name and shape against the architecture) or ONNX
    (checker, operators, output width, numerical agreement with onnxruntime). Returns a summary
    that is kept in the model's info."""
    from app.services import model_files

    path = store.local_path(ref.uri, ref.sha256)
    if description.get("framework") == "onnx":
        return model_files.check_onnx(path, dict(description))
    tensors = model_files.read_safetensors_header(path)
    return model_files.check_against_architecture(
        tensors, qualified_arch(description), len(description["classes"])
    )


def load_info(model: Model) -> dict[str, Any] | None:
    """What ``models.api.load_model`` needs besides the file: None for a checkpoint (it describes
    itself), the description for an uploaded model."""
    if model.weights_format == "checkpoint":
        return None
    return {
        **(model.info or {}),
        "arch": model.architecture,
        "classes": list(model.classes),
        "image_size": model.image_size,
    }
