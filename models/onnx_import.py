"""ONNX classifiers as PyTorch modules, so that white-box (gradient) attacks work on them.

A file is read as protobuf (no pickle), refused when it keeps tensors in external files, checked
by the ONNX checker, converted with ``onnx2torch`` and verified against ``onnxruntime`` on probe
inputs: the converted module must give the same logits within ``TOLERANCE``. Every refusal is an
:class:`OnnxError` (a ``ValueError``) whose message says what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.nets import Classifier

TOLERANCE = 1e-4  # max abs difference of logits, converted module vs onnxruntime
PROBE_BATCH = 4


class OnnxError(ValueError):
    """An ONNX file that cannot be used; the message names the reason."""


class NotOnnx(OnnxError):
    """The bytes are not an ONNX model at all (a pickle renamed .onnx, garbage)."""


def read_onnx(path: str | Path) -> Any:
    """Parse and check an ONNX file without following any external-data reference."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise NotOnnx(f"not an ONNX model file ({type(e).__name__})") from e
    if not model.HasField("graph") or not model.graph.node:
        raise NotOnnx("not an ONNX model file (no graph)")
    external = [t.name for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise OnnxError(
            f"the ONNX file keeps {len(external)} tensor(s) in external data files (e.g. "
            f"{external[0]!r}); save it as one file (onnx.save(model, path, "
            "save_as_external_data=False), under 2 GB)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxError(f"the ONNX checker refused the file: {first}") from e
    return model


def _tensors(model: Any) -> list[Any]:
    import onnx

    out = list(model.graph.initializer)
    for node in model.graph.node:
        out += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return out


def unsupported_operators(model: Any) -> list[str]:
    """Operators of the graph that onnx2torch cannot convert (``domain:Op (opset N)``)."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
    missing: list[str] = []
    for node in model.graph.node:
        try:
            get_converter(node.op_type, opsets.get(node.domain, 1), node.domain)
        except NotImplementedError:
            name = f"{node.domain + ':' if node.domain else ''}{node.op_type}"
            missing.append(f"{name} (opset {opsets.get(node.domain, 1)})")
    return sorted(set(missing))


def _inline_aliases(model: Any) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer: torch's exporter
    writes them for tensors it deduplicated, and onnx2torch expects weights as initializers."""
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _input_shape(model: Any) -> list[int | str]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise OnnxError(
            f"a classifier has one input (images) and one output (logits); this graph has "
            f"{len(inputs)} input(s) and {len(model.graph.output)} output(s)"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_param or "?" if not d.HasField("dim_value") else int(d.dim_value) for d in dims]


def check_input(model: Any, image_size: int) -> None:
    """One (N, 3, H, W) input with a free batch dimension and H = W = image_size when fixed."""
    shape = _input_shape(model)
    if len(shape) != 4:
        raise OnnxError(f"the input must be a (batch, 3, height, width) tensor, got {shape}")
    if isinstance(shape[0], int):
        raise OnnxError(
            f"the input's batch dimension is fixed to {shape[0]}: export with a dynamic batch "
            "axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"
        )
    if isinstance(shape[1], int) and shape[1] != 3:
        raise OnnxError(f"the input has {shape[1]} channels; RGB images need 3")
    fixed = [d for d in shape[2:] if isinstance(d, int)]
    if any(d != image_size for d in fixed):
        raise OnnxError(
            f"image_size: the description says {image_size} but the graph's input is {shape[2:]}"
        )


def convert(model: Any) -> nn.Module:
    """The graph as a torch module (``onnx2torch``); unsupported operators are named."""
    from onnx2torch import convert as o2t

    _inline_aliases(model)
    missing = unsupported_operators(model)
    if missing:
        raise OnnxError(
            f"unsupported ONNX operator(s): {', '.join(missing)}; re-export the model without "
            "them (or upload its weights as safetensors with a torchvision/timm description)"
        )
    try:
        module = o2t(model)
    except (NotImplementedError, KeyError, ValueError, RuntimeError) as e:
        raise OnnxError(f"the ONNX graph cannot be converted to PyTorch: {e}") from e
    return module.eval()


def _normalized_probe(info: dict[str, Any], seed: int = 0) -> torch.Tensor:
    size = int(info["image_size"])
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(PROBE_BATCH, 3, size, size, generator=g)
    mean = torch.tensor(info.get("mean") or (0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor(info.get("std") or (0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return (x - mean) / std


def verify(graph: bytes, module: nn.Module, info: dict[str, Any], tol: float = TOLERANCE) -> float:
    """Run probe images through onnxruntime (on the serialized ``graph``) and the converted
    module: the output must be (N, number of classes) and the logits agree within ``tol``.
    Returns the max abs difference."""
    import onnxruntime as ort

    x = _normalized_probe(info)
    try:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        expected = torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise OnnxError(f"onnxruntime cannot run the model on a probe batch: {e}") from e
    k = len(info["classes"])
    if expected.shape != (PROBE_BATCH, k):
        raise OnnxError(
            f"classes: the description lists {k} classes but the model outputs shape "
            f"{list(expected.shape)} for a batch of {PROBE_BATCH} (expected [{PROBE_BATCH}, {k}])"
        )
    with torch.no_grad():
        try:
            got = module(x).float()
        except Exception as e:  # the converted graph failing is the converter's limit
            raise OnnxError(f"the converted model fails on a probe batch: {e}") from e
    diff = float((got - expected).abs().max())
    if not diff <= tol:
        raise OnnxError(
            f"the PyTorch conversion differs from onnxruntime by {diff:.3g} on the logits "
            f"(the limit is {tol:g}); the model cannot be attacked faithfully"
        )
    return diff


def check_onnx(path: str | Path, info: dict[str, Any], tol: float = TOLERANCE) -> dict[str, Any]:
    """Every upload check (file, checker, input, operators, output width, numerical agreement
    with onnxruntime); returns a summary for the registry."""
    model = read_onnx(path)
    check_input(model, int(info["image_size"]))
    original = model.SerializeToString()
    module = convert(model)
    diff = verify(original, module, info, tol)
    return {
        "onnx_opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "onnx_nodes": len(model.graph.node),
        "onnx_max_abs_diff": diff,
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def load_onnx_model(path: str | Path, info: dict[str, Any]) -> Classifier:
    """A :class:`Classifier` around the converted graph, normalization from the description
    (the graph takes normalized images)."""
    from models.external import set_normalization

    model = read_onnx(path)
    check_input(model, int(info["image_size"]))
    module = convert(model)
    classifier = Classifier(module, None, "onnx")
    set_normalization(classifier, info)
    classifier.gradcam_layer = info.get("gradcam_layer")
    return classifier.eval()
