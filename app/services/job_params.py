"""Turn a job row into the arguments of ``models.api.train`` / ``models.api.evaluate``.

The API stores what the client asked for (``TrainJobRequest`` / ``EvaluateJobRequest`` as JSON in
``job.params``); the server-side paths (dataset folder, split manifest, checkpoints) are resolved
here, when the worker runs the job, so artifact stores mounted at different paths (or object
storage read through each host's cache) still work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db.tables import Dataset, Job, Model
from app.services import datasets, models_registry
from app.services.errors import Invalid
from app.services.storage import Storage


def job_dir(store: Storage, job_id: str) -> Path:
    """The local folder a job works in: ``<artifact_dir>/jobs/<job_id>`` for a directory store,
    local scratch on object storage (``worker.job_files`` keeps it in step with the store)."""
    return store.job_dir(job_id)


def _dataset(session: Session, dataset_id: str) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise Invalid(f"dataset {dataset_id} was deleted")
    return row


def _model(session: Session, model_id: str) -> Model:
    row = session.get(Model, model_id)
    if row is None:
        raise Invalid(f"model {model_id} no longer exists")
    return row


def weights_path(model: Model, store: Storage) -> Path:
    """A local copy of a model's weights (a training checkpoint or an uploaded safetensors),
    checked against the recorded sha256 when it comes from object storage."""
    return store.local_path(model.weights_uri, model.checkpoint_sha256)


def train_config(session: Session, job: Job, store: Storage) -> dict[str, Any]:
    """The ``TrainConfig`` dict of a training job (``TrainConfig.from_dict`` accepts it)."""
    if job.kind != "train":
        raise Invalid(f"job {job.id} is not a training job")
    params = job.params
    config: dict[str, Any] = dict(params.get("config") or {})
    config["device"] = "auto"
    if params.get("dataset_id"):
        ds = _dataset(session, params["dataset_id"])
        config["data_root"] = str(datasets.dataset_root(ds, store))
        config["manifest"] = str(datasets.manifest_path(ds, store))
    else:  # generated data; the split is implied by the seed
        config["data_root"] = None
        config["manifest"] = None
    if params.get("init_model_id"):
        config.update(init_config(_model(session, params["init_model_id"]), store))
        config["replace_head"] = bool(params.get("replace_head"))
    if params.get("pretrained") == "imagenet":
        config["pretrained"] = str(imagenet_weights(config.get("arch", "small_cnn")))
    if params.get("reference_model_id"):
        ref = _model(session, params["reference_model_id"])
        if ref.weights_format != "checkpoint":
            raise Invalid("the reference model must be a model trained by this service")
        config["reference_checkpoint"] = str(weights_path(ref, store))
    return config


def evaluate_args(session: Session, job: Job, store: Storage) -> dict[str, Any]:
    """Keyword arguments of ``models.api.evaluate`` for an evaluation job (``out_dir`` excluded).

    The dataset defaults to the one the model was trained on; with neither, ``evaluate`` falls
    back to the data recorded in the checkpoint (the generated set of a demo run).
    """
    if job.kind != "evaluate":
        raise Invalid(f"job {job.id} is not an evaluation job")
    params = job.params
    model = _model(session, params["model_id"])
    args: dict[str, Any] = {
        "checkpoint": str(weights_path(model, store)),
        "part": params.get("part", "test"),
        "limit": params.get("limit"),
        "eps_list": list(params.get("eps_list") or []),
        "attacks": [
            {k: v for k, v in a.items() if v is not None} for a in params.get("attacks") or []
        ],
        "gradcam": bool(params.get("gradcam", True)),
        "batch_size": int(params.get("batch_size", 128)),
        "data_root": None,
        "manifest": None,
    }
    info = models_registry.load_info(model)  # an uploaded model's description
    if info is not None:
        args["info"] = info
    dataset_id = params.get("dataset_id") or model.dataset_id
    if dataset_id:
        ds = _dataset(session, dataset_id)
        args["data_root"] = str(datasets.dataset_root(ds, store))
        args["manifest"] = str(datasets.manifest_path(ds, store))
    return args


def init_config(model: Model, store: Storage) -> dict[str, Any]:
    """The TrainConfig fields that make a run start from ``model``: its weights, description,
    architecture and input size."""
    check_can_finetune(model)
    return {
        "init_checkpoint": str(weights_path(model, store)),
        "init_model": models_registry.load_info(model),
        "arch": model.architecture,
        "image_size": model.image_size,
    }


def check_can_finetune(model: Model) -> None:
    if model.weights_format == "onnx":
        raise Invalid(
            "init_model_id: an ONNX model cannot be fine-tuned (its graph is converted for "
            "attacks, not rebuilt for training); upload its weights as safetensors with a "
            "torchvision or timm description"
        )


def imagenet_weights(arch: str) -> Path:
    """``<pretrained_dir>/<arch>.safetensors`` (``timm/resnet10t`` -> ``timm/resnet10t...``),
    placed by the administrator; Invalid (a 422 at submission) when it is not there."""
    from app.core.settings import get_settings

    root = get_settings().pretrained_dir
    if root is None:
        raise Invalid(
            "pretrained: this server offers no ImageNet weights (its administrator sets "
            "DPAAT_PRETRAINED_DIR and places <arch>.safetensors there; see "
            "docs/model-description.md)"
        )
    path = (root / f"{arch}.safetensors").resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise Invalid(
            f"pretrained: no ImageNet weights for {arch} on this server "
            f"({arch}.safetensors is not in its pretrained directory)"
        )
    return path
