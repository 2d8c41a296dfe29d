"""Checks of uploaded model weights: safetensors only (never a pickle), the header parsed and
checked against the file, the tensors' names and shapes checked against the declared
architecture (built on torch's meta device: no memory, no weights)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.services.errors import Invalid, Unavailable, UnsupportedMedia

_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_HEADER = 100 << 20
# Tensors a file may leave out: constants or counters the architecture initialises itself.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_OPTIONAL_NAMES = ("mean", "std")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and verify a safetensors header: sizes, dtypes, and offsets that tile the data."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise UnsupportedMedia("not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw_len)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise UnsupportedMedia("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnsupportedMedia("not a safetensors file (header is not JSON)") from e
    if not isinstance(header, dict):
        raise UnsupportedMedia("not a safetensors file (header is not an object)")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise Invalid(f"safetensors entry {name!r} is malformed") from e
        if dtype not in _ITEMSIZE or any(d < 0 for d in shape):
            raise Invalid(f"safetensors entry {name!r} has dtype {dtype!r} / shape {shape}")
        if end > data_size:
            raise Invalid(f"the safetensors file is truncated (entry {name!r} ends past the data)")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise Invalid(f"safetensors entry {name!r} has offsets that do not match its shape")
        tensors[name] = TensorInfo(dtype, shape)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise Invalid(f"safetensors entry {name!r} overlaps another or leaves a gap")
        position = end
    if position != data_size:
        raise Invalid("the safetensors file has trailing or missing data")
    if not tensors:
        raise Invalid("the safetensors file holds no tensors")
    return tensors


def expected_tensors(
    architecture: str, num_classes: int
) -> list[tuple[list[str], tuple[int, ...]]]:
    """For each distinct tensor of the architecture: its names (a module reachable under two
    names has two) and its shape. Builds the model on the meta device (imports torch)."""
    import torch

    from models.nets import build_model

    try:
        with torch.device("meta"):
            if "/" in architecture:  # torchvision/timm: the bare network's state dict
                from models.external import build_network

                framework, name = architecture.split("/", 1)
                model = build_network(framework, name, num_classes)
            else:
                model = build_model(architecture, num_classes)
    except ValueError as e:
        raise Invalid(str(e)) from e
    groups: dict[int, tuple[list[str], tuple[int, ...]]] = {}
    named: list[tuple[str, torch.Tensor]] = [*model.named_parameters(remove_duplicate=False)]
    named += model.named_buffers(remove_duplicate=False)
    for name, tensor in named:
        names, _shape = groups.setdefault(id(tensor), ([], tuple(tensor.shape)))
        names.append(name)
    return list(groups.values())


def check_against_architecture(
    tensors: dict[str, TensorInfo], architecture: str, num_classes: int
) -> dict[str, Any]:
    """Every tensor of the architecture present with its shape, nothing unknown in the file.

    Returns a summary (tensor count, parameter count)."""
    expected = expected_tensors(architecture, num_classes)
    known: dict[str, tuple[int, ...]] = {n: shape for names, shape in expected for n in names}
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise Invalid(
            f"{len(unknown)} tensor(s) are not part of {architecture}, e.g. {unknown[:3]}"
        )
    wrong = [
        f"{n}: {list(t.shape)} != {list(known[n])}"
        for n, t in tensors.items()
        if t.shape != known[n]
    ]
    if wrong:
        hint = (
            " (is the class count right?)" if any("fc" in w or "head" in w for w in wrong) else ""
        )
        raise Invalid(f"tensor shapes do not match {architecture}: {wrong[:3]}{hint}")
    missing = [
        names[0]
        for names, _shape in expected
        if not any(n in tensors for n in names)
        and not names[0].endswith(_OPTIONAL_SUFFIXES)
        and names[0] not in _OPTIONAL_NAMES
    ]
    if missing:
        raise Invalid(f"{len(missing)} tensor(s) of {architecture} are missing, e.g. {missing[:3]}")
    return {
        "tensors": len(tensors),
        "parameters": sum(math.prod(t.shape) for t in tensors.values()),
    }


def check_onnx(path: Path, description: dict[str, Any]) -> dict[str, Any]:
    """Every check of an uploaded ONNX file (``models.onnx_import.check_onnx``): 415 when it is
    not ONNX at all, 422 naming what to change otherwise. Returns a summary."""
    try:
        from models.onnx_import import NotOnnx, OnnxError, check_onnx
    except ImportError as e:  # the server was installed without the ML extra
        raise Unavailable(f"ONNX models are not supported on this server: {e}") from e
    try:
        return check_onnx(path, dict(description))
    except NotOnnx as e:
        raise UnsupportedMedia(str(e)) from e
    except OnnxError as e:
        raise Invalid(str(e)) from e
