"""The public API of the ML core: what the CLI, the worker and notebooks call.

Everything here is pure PyTorch (no server): ``train`` a method on a dataset, ``evaluate`` a
checkpoint with the full protocol, ``load_model`` + ``predict`` for robust classification of images.
All epsilons are in 1/255 units.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from models import presets
from models.data import DataError, load_bundle, to_float
from models.training import (
    TrainConfig,
    TrainingHooks,
    TrainResult,
    load_trained_model,
)
from models.training import train as _train

DEFAULT_EPS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
# the attack presets live in models.presets (torch-free: the CI client expands them too)
DEFAULT_ATTACKS = presets.DEFAULT
QUICK_ATTACKS = presets.QUICK


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train(
    config: TrainConfig | dict[str, Any], out_dir: str | Path, hooks: TrainingHooks | None = None
) -> TrainResult:
    """Train ``config.method`` and write ``out_dir/checkpoint.pt`` every epoch.

    A run whose ``out_dir`` already holds a checkpoint resumes from it (bit-exact), which is how a
    re-queued job continues after its worker died.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    return _train(cfg, out_dir, hooks=hooks)


@dataclass
class LoadedModel:
    """A trained classifier ready for inference, with what the report needs to know about it."""

    model: nn.Module
    info: dict[str, Any]  # arch, classes, image_size, method, ...
    sha256: str

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])


def load_model(
    checkpoint: str | Path, device: str | torch.device = "cpu", info: dict[str, Any] | None = None
) -> LoadedModel:
    """Load a checkpoint written by :func:`train` (``torch.load(weights_only=True)``), or an
    external ``.safetensors`` state dict described by ``info`` (arch, classes, image_size)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    framework = str((info or {}).get("framework") or "dpaat")
    model: nn.Module
    if path.suffix == ".onnx" or framework == "onnx":
        from models.onnx_import import load_onnx_model

        _require(path, info or {})
        model = load_onnx_model(path, dict(info or {}))
        info = {"method": "external", **(info or {}), "arch": "onnx"}
    elif framework in ("torchvision", "timm"):
        from models.external import load_library_model

        _require(path, info or {})
        model = load_library_model(path, dict(info or {}))
        info = {"method": "external", **(info or {}), "arch": model.arch}
    elif path.suffix == ".safetensors" or info is not None:
        model, info = _load_safetensors(path, info or {})
    else:
        model, info = load_trained_model(path)
    model.to(device).eval()
    return LoadedModel(model, info, sha256_file(path))


def _require(path: Path, info: dict[str, Any]) -> None:
    missing = {"classes", "image_size"} - set(info)
    if "arch" not in info and "architecture" not in info:
        missing.add("architecture")
    if missing:
        raise ValueError(f"{path.name}: a model needs {sorted(missing)} in its description")


def _load_safetensors(path: Path, info: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.nets import build_model

    _require(path, info)
    info = {"arch": info.get("architecture"), **info}
    model = build_model(info["arch"], len(info["classes"]))
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path.name}: not a safetensors file ({e})") from e
    # strict=False: the normalization constants may be absent and keep their defaults; every
    # learned tensor must be there with the right shape.
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    # A tensor may have several names (``cam_layer`` aliases a backbone block): one is enough.
    names: dict[int, list[str]] = {}
    for k, v in own.items():
        names.setdefault(v.data_ptr(), []).append(k)
    optional = ("mean", "std")  # and BatchNorm's batch counters keep their defaults
    absent = [
        group[0]
        for group in names.values()
        if not any(k in state for k in group)
        and group[0] not in optional
        and not group[0].endswith("num_batches_tracked")
    ]
    if wrong or absent:
        raise ValueError(
            f"{path.name}: weights do not fit {info['arch']} "
            f"(wrong shapes: {wrong[:3]}, missing: {absent[:3]})"
        )
    model.load_state_dict(state, strict=False)
    model.gradcam_layer = info.get("gradcam_layer")
    return model, {"method": "external", **info}


def evaluate(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    manifest: str | Path | None = None,
    part: str = "test",
    limit: int | None = None,
    eps_list: Sequence[float] = DEFAULT_EPS,
    attacks: Sequence[dict[str, Any]] = DEFAULT_ATTACKS,
    gradcam: bool = True,
    batch_size: int = 128,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on one part of a dataset with the protocol of docs/dpaat.md.

    Writes ``report.json``, ``report.md`` and ``robustness_curve.png`` (and, with ``gradcam``,
    ``gradcam_montage.png``) into ``out_dir`` and returns the report. ``data_root`` None
    evaluates on the generated dataset the checkpoint was trained on
    when it was trained without data (the demo); the split manifest defaults to the one recorded in
    the checkpoint's training config so that train and test never overlap. ``info`` describes
    an external safetensors model (see :func:`load_model`).
    """
    from models.evaluation import evaluate_model, write_report

    loaded = load_model(checkpoint, info=info)
    cfg = loaded.info.get("config", {})
    if data_root is None:
        data_root = cfg.get("data_root")
        if data_root is None and limit is None:
            limit = cfg.get("limit")  # the generated set depends on its size: rebuild the same one
    if manifest is None:
        manifest = cfg.get("manifest")
    if part not in ("train", "val", "test"):
        raise ValueError(f"part must be train, val or test, got {part!r}")
    bundle = load_bundle(
        data_root,
        loaded.image_size,
        manifest,
        seed=cfg.get("seed", seed),
        limit=limit,
        parts=(part,),
    )
    if list(bundle.classes) != loaded.classes:
        raise DataError(
            f"dataset classes {list(bundle.classes)} differ from the model's {loaded.classes}"
        )
    dataset = getattr(bundle, part)
    report = evaluate_model(
        loaded.model,
        dataset,
        eps_list=tuple(eps_list),
        attacks=tuple(attacks),
        batch_size=batch_size,
        gradcam=gradcam,
        model_info={**loaded.info, "checkpoint_sha256": loaded.sha256},
        dataset_info={
            "name": bundle.name,
            "split": part,
            "manifest_sha256": bundle.manifest_sha256,
            "manifest": bundle.manifest_path,
            "samples": len(dataset),
            "limit": limit,
        },
        progress=progress,
    )
    figures: dict[str, str] = {}
    if gradcam and report.get("lesion_focus_unavailable") is None:
        from models.evaluation.montage import MONTAGE_NAME, write_montage

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(out_dir) / f".{MONTAGE_NAME}.tmp.png"
        if write_montage(loaded.model, dataset, list(attacks), list(eps_list), tmp, seed=seed):
            tmp.replace(Path(out_dir) / MONTAGE_NAME)  # whole or absent, like the other files
            figures["Grad-CAM, clean vs adversarial"] = MONTAGE_NAME
    write_report(report, out_dir, figures)
    return report


_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def decode_image(
    data: bytes | Image.Image, size: int, interpolation: str = "bilinear", resize: str = "stretch"
) -> torch.Tensor:
    """Bytes of a JPEG/PNG (or a PIL image) as a float tensor (3, size, size) in [0, 1].

    ``resize``: ``stretch`` to size x size, or ``center_crop`` (shorter side to ``size``, then
    the central square), with the description's ``interpolation``."""
    try:
        im = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        im = im.convert("RGB")
        if resize == "center_crop":
            scale = size / min(im.size)
            w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
            im = im.resize((w, h), _RESAMPLING[interpolation])
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        else:
            im = im.resize((size, size), _RESAMPLING[interpolation])
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode image: {e}") from e
    arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return to_float(arr.permute(2, 0, 1).contiguous())


def predict(
    loaded: LoadedModel,
    images: Sequence[bytes | Image.Image],
    *,
    cap: float = 16.0,
    eps_list: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    steps: int = 10,
    gradcam: bool = False,
) -> list[dict[str, Any]]:
    """Classify images and score their robustness (see ``robustness_score`` in docs/dpaat.md).

    Each result: ``class``, ``probabilities`` (class -> p), ``robustness`` (eps_star in 1/255 units
    or None when no attack below ``cap`` flips the prediction, stable_at, score in [0, 1], cap) and
    ``gradcam_png`` (PNG bytes of the heat map over the image, or None).
    """
    from models.attacks import robustness_score

    if not images:
        return []
    device = next(loaded.model.parameters()).device
    how = {k: str(loaded.info[k]) for k in ("interpolation", "resize") if loaded.info.get(k)}
    x = torch.stack([decode_image(im, loaded.image_size, **how) for im in images]).to(device)
    with torch.no_grad():
        probs = torch.softmax(loaded.model(x).float(), dim=1).cpu()
    scores = robustness_score(loaded.model, x, cap=cap, eps_list=tuple(eps_list), steps=steps)
    heat = _gradcam_pngs(loaded.model, x) if gradcam else [None] * len(images)
    classes = loaded.classes
    return [
        {
            "class": classes[int(p.argmax())],
            "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p, strict=True)},
            "robustness": s,
            "gradcam_png": h,
        }
        for p, s, h in zip(probs, scores, heat, strict=True)
    ]


def _gradcam_pngs(model: nn.Module, x: torch.Tensor) -> list[bytes | None]:
    """The Grad-CAM of the predicted class blended over each image, as PNG bytes."""
    import matplotlib

    from models.evaluation import grad_cam
    from models.evaluation.gradcam import cam_unavailable

    if cam_unavailable(model, x[:1]) is not None:  # e.g. a transformer: no spatial feature map
        return [None] * len(x)
    cams = grad_cam(model, x).cpu()
    cmap = matplotlib.colormaps["jet"]
    out: list[bytes | None] = []
    for img, cam in zip(x.cpu(), cams, strict=True):
        heat = torch.from_numpy(cmap(cam.numpy())[..., :3]).permute(2, 0, 1).float()
        blend = (0.55 * img + 0.45 * heat).clamp(0, 1)
        arr = (blend * 255).round().byte().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def report_summary(report: dict[str, Any]) -> str:
    """A one-screen JSON summary of a report (clean and per-eps accuracy, verdict)."""
    return json.dumps(
        {
            "clean_accuracy": report["clean"]["accuracy"],
            "clean_balanced_accuracy": report["clean"]["balanced_accuracy"],
            "robust_accuracy": {k: v["accuracy"] for k, v in report["robust"].items()},
            "curve_auc": report["curve_auc"],
            "verdict": report["verdict"],
        },
        indent=2,
    )
