"""Models this project did not create: torchvision and timm architectures by name, their weights
from a safetensors file, and the model description (``model.json``) as the ML core reads it.

Weights never come from a hub: every network is built with ``weights=None`` /
``pretrained=False`` and filled from a local file. The description's schema (pydantic, with every
field documented) is ``app.schemas.models.ModelDescription`` (docs/model-description.md); here it
is a validated dict, so this package stays importable without the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.nets import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model

FRAMEWORKS = ("dpaat", "torchvision", "timm", "onnx")
LIBRARIES = ("torchvision", "timm")  # architectures built by name from a library


def build_network(framework: str, name: str, num_classes: int) -> nn.Module:
    """A bare torchvision or timm classifier with random weights and ``num_classes`` outputs."""
    if framework == "torchvision":
        from torchvision import models as tvm

        known = tvm.list_models(module=tvm)
        if name not in known:
            raise ValueError(
                f"architecture: {name!r} is not a torchvision classification model "
                f"(e.g. {', '.join(known[:6])}...)"
            )
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    if framework == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(
                f"architecture: {name!r} is not a timm model (see timm.list_models('{name[:4]}*'))"
            )
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ValueError(f"framework: {framework!r} builds no architecture by name; use {LIBRARIES}")


def qualified_arch(info: dict[str, Any]) -> str:
    """The ``arch`` that :func:`models.nets.build_model` takes for a description:
    ``small_cnn`` (dpaat), ``torchvision/resnet18``, ``timm/resnet10t`` or ``onnx``."""
    framework = str(info.get("framework") or "dpaat")
    name = str(info.get("architecture") or info.get("arch") or "")
    if framework == "dpaat" or "/" in name:
        return name
    if framework == "onnx":
        return "onnx"
    return f"{framework}/{name}"


def framework_of(arch: str) -> tuple[str, str]:
    """``(framework, name)`` of an ``arch`` string (the inverse of :func:`qualified_arch`)."""
    if arch == "onnx":
        return "onnx", "onnx"
    if "/" in arch:
        framework, name = arch.split("/", 1)
        return framework, name
    return "dpaat", arch


def set_normalization(model: Classifier, info: dict[str, Any]) -> None:
    """The description's mean/std (ImageNet's when absent) into the model's buffers."""
    mean = info.get("mean") or IMAGENET_MEAN
    std = info.get("std") or IMAGENET_STD
    model.mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))


def load_library_model(path: Path, info: dict[str, Any]) -> Classifier:
    """A torchvision/timm network from a safetensors state dict of the bare network (the keys of
    ``net.state_dict()``), every tensor checked by name and shape before loading."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    arch = qualified_arch(info)
    model = build_model(arch, len(info["classes"]))
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path.name}: not a safetensors file ({e})") from e
    check_state(model.backbone, state, arch)
    model.backbone.load_state_dict(state, strict=False)
    set_normalization(model, info)
    model.gradcam_layer = info.get("gradcam_layer")
    return model


def check_state(net: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Every learned tensor of ``net`` present with its shape, nothing unknown."""
    own = net.state_dict()
    unknown = sorted(set(state) - set(own))
    wrong = [
        f"{k}: {list(v.shape)} != {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if unknown or wrong or missing:
        raise ValueError(
            f"weights do not fit {arch}: unknown {unknown[:3]}, wrong shapes {wrong[:3]}, "
            f"missing {missing[:3]}"
        )
