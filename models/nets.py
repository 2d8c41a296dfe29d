"""Architectures chosen by name. Normalization lives inside the model, so inputs are in [0, 1] and
every epsilon is in pixel units.

Weights are never downloaded: ``pretrained`` is an optional local file (safetensors, or a torch
state dict loaded with ``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """``backbone((x - mean) / std)`` -> logits; ``cam_layer`` is the last convolutional block.

    Networks from torchvision, timm or ONNX by name (``arch`` = ``"timm/resnet10t"``...) have no
    ``cam_layer`` module (it would alias backbone tensors under a second name): their Grad-CAM
    layer is ``gradcam_layer`` (a module name inside the backbone) or found automatically
    (:mod:`models.evaluation.gradcam`)."""

    def __init__(self, backbone: nn.Module, cam_layer: nn.Module | None, arch: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.cam_layer = cam_layer
        self.gradcam_layer: str | None = None
        self.arch = arch
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks and a linear head: trains in minutes on 2 CPU cores at 64 px."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8]
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                    nn.BatchNorm2d(chans[i + 1]),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2) if i < 3 else nn.Identity(),
                )
            )
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _small_cnn(k: int) -> tuple[nn.Module, nn.Module]:
    m = SmallCNN(k)
    return m, m.features[-1]


def _resnet(fn: Callable[..., tvm.ResNet]) -> Callable[[int], tuple[nn.Module, nn.Module]]:
    def build(k: int) -> tuple[nn.Module, nn.Module]:
        m = fn(weights=None, num_classes=k)
        return m, m.layer4

    return build


def _vgg16_bn(k: int) -> tuple[nn.Module, nn.Module]:
    m = tvm.vgg16_bn(weights=None, num_classes=k)
    return m, m.features


def _densenet121(k: int) -> tuple[nn.Module, nn.Module]:
    m = tvm.densenet121(weights=None, num_classes=k)
    return m, m.features


def _mobilenet(fn: Callable[..., nn.Module]) -> Callable[[int], tuple[nn.Module, nn.Module]]:
    def build(k: int) -> tuple[nn.Module, nn.Module]:
        m = fn(weights=None, num_classes=k)
        return m, m.features  # type: ignore[return-value]

    return build


ARCHITECTURES: dict[str, Callable[[int], tuple[nn.Module, nn.Module]]] = {
    "small_cnn": _small_cnn,
    "resnet18": _resnet(tvm.resnet18),
    "resnet50": _resnet(tvm.resnet50),
    "vgg16_bn": _vgg16_bn,
    "densenet121": _densenet121,
    "mobilenet_v3_small": _mobilenet(tvm.mobilenet_v3_small),
    "mobilenet_v3_large": _mobilenet(tvm.mobilenet_v3_large),
    "efficientnet_b0": _mobilenet(tvm.efficientnet_b0),
}


def build_model(arch: str, num_classes: int, pretrained: str | Path | None = None) -> Classifier:
    """A fresh classifier by name; ``pretrained`` loads a local backbone state dict (head excluded
    when its class count differs). ``framework/name`` (``torchvision/resnet18``,
    ``timm/resnet10t``) builds any architecture of those libraries, never with hub weights."""
    cam_layer: nn.Module | None
    if "/" in arch:
        from models.external import build_network

        framework, name = arch.split("/", 1)
        backbone, cam_layer = build_network(framework, name, num_classes), None
    elif arch in ARCHITECTURES:
        backbone, cam_layer = ARCHITECTURES[arch](num_classes)
    else:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}, "
            "or torchvision/NAME or timm/NAME"
        )
    if pretrained is not None:
        load_backbone_weights(backbone, pretrained)
    return Classifier(backbone, cam_layer, arch)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load local weights, keeping only tensors whose names and shapes match (so a new head
    stays new)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor matches the architecture")
    backbone.load_state_dict(usable, strict=False)
