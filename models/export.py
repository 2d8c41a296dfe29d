"""Export a loaded model as a zip archive: ``model.json`` (the description) plus
``model.safetensors`` or ``model.onnx``. Nothing in it is a pickle or names a server path, and
the archive goes straight into ``dpaat audit --weights ... --model-info model.json`` or
``POST /api/v1/models``.

* safetensors: one name per tensor. A native model's ``cam_layer.*`` names alias
  ``backbone.*`` tensors (``safetensors`` refuses shared memory), so only the first name of each
  storage is written; loading fills the aliases back. torchvision/timm networks are written as
  their bare state dict (the keys of ``net.state_dict()``), normalization in the description.
* onnx: the network without its normalization (the description carries mean/std), a dynamic
  batch axis, checked against the PyTorch model with onnxruntime (max abs logit difference
  <= ``TOLERANCE``). An uploaded ONNX model exports its own file.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.external import framework_of
from models.nets import Classifier
from models.onnx_import import TOLERANCE, _inline_aliases

DESCRIPTION_VERSION = 1
FORMATS = ("safetensors", "onnx")
OPSET = 17
# Description fields copied from a model's info when present (never paths, configs, hashes).
_OPTIONAL = ("interpolation", "resize", "gradcam_layer", "name", "training_method", "notes")
_DATE = (2020, 1, 1, 0, 0, 0)  # fixed zip timestamps: one model, one archive, byte for byte


def description_of(model: Classifier, info: dict[str, Any]) -> dict[str, Any]:
    """The ``model.json`` of a loaded model (app.schemas.models.ModelDescription's fields)."""
    framework, name = framework_of(str(getattr(model, "arch", info.get("arch"))))
    if framework == "onnx":
        name = str(info.get("architecture") or "onnx")
    out: dict[str, Any] = {
        "description_version": DESCRIPTION_VERSION,
        "framework": framework,
        "architecture": name,
        "classes": [str(c) for c in info["classes"]],
        "image_size": int(info["image_size"]),
    }
    if framework != "dpaat":  # a native model keeps its normalization in its weights
        out["mean"] = [round(float(v), 6) for v in model.mean.flatten()]
        out["std"] = [round(float(v), 6) for v in model.std.flatten()]
    method = info.get("training_method") or info.get("method")
    if method and method != "external":
        out["training_method"] = str(method)
    out.update({k: info[k] for k in _OPTIONAL if info.get(k) is not None and k not in out})
    if model.gradcam_layer and "gradcam_layer" not in out:
        out["gradcam_layer"] = model.gradcam_layer
    return out


def unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with one name per tensor storage (the first registered), contiguous."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = value.detach().cpu().contiguous().clone()
    return out


def safetensors_bytes(model: Classifier) -> bytes:
    from safetensors.torch import save

    framework, _ = framework_of(model.arch)
    if framework == "onnx":
        raise ValueError("format: an ONNX model exports as ONNX only (format=onnx)")
    state = unique_state(model if framework == "dpaat" else model.backbone)
    return save(state, metadata={"format": "pt"})


def onnx_bytes(model: Classifier, image_size: int, tol: float = TOLERANCE) -> bytes:
    """The backbone (normalized input -> logits) as ONNX, verified against PyTorch."""
    import onnx
    import onnxruntime as ort

    net = model.backbone.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, image_size, image_size, generator=g)
    x = (x - model.mean.cpu()) / model.std.cpu()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net,
            (x,),
            Path(tmp) / "model.onnx",
            dynamo=False,  # the torch.export-based one needs onnxscript, not a dependency
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        graph = onnx.load(Path(tmp) / "model.onnx")
    _inline_aliases(graph)  # weights as initializers: readable by onnx2torch and the like
    onnx.checker.check_model(graph)
    data: bytes = graph.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        expected = net(x).float()
    diff = float((got - expected).abs().max())
    if not diff <= tol:
        raise ValueError(f"the ONNX export differs from PyTorch by {diff:.3g} (limit {tol:g})")
    return data


def export_archive(
    model: nn.Module, info: dict[str, Any], fmt: str, source: str | Path | None = None
) -> bytes:
    """The zip archive (``model.json`` + weights) of a loaded model. ``source``: the file the
    model was loaded from (an uploaded ONNX model exports that file as it is)."""
    if not isinstance(model, Classifier):
        raise ValueError("only models loaded by models.api.load_model can be exported")
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {list(FORMATS)}")
    description = description_of(model, info)
    if fmt == "safetensors":
        name, data = "model.safetensors", safetensors_bytes(model)
    elif description["framework"] == "onnx" and source is not None:
        name, data = "model.onnx", Path(source).read_bytes()
    else:
        name, data = "model.onnx", onnx_bytes(model, description["image_size"])
        description.update(
            framework="onnx",
            mean=[round(float(v), 6) for v in model.mean.flatten()],
            std=[round(float(v), 6) for v in model.std.flatten()],
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for entry, blob in (
            ("model.json", json.dumps(description, indent=2).encode() + b"\n"),
            (name, data),
        ):
            z.writestr(zipfile.ZipInfo(entry, _DATE), blob, zipfile.ZIP_DEFLATED)
    return buf.getvalue()
