"""Model requests and responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.schemas.common import Label, Name, ORMModel
from app.schemas.jobs import Architecture, Method

Framework = Literal["dpaat", "torchvision", "timm", "onnx"]
DESCRIPTION_VERSION: Literal[1] = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ARCHITECTURES = get_args(Architecture)


class ModelDescription(BaseModel):
    """``model.json``: what a model is and what it expects, whatever made it (this service,
    torchvision, timm or an ONNX exporter). Versioned; docs/model-description.md documents every
    field. The ML core reads the same fields from a dict (``models.external``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "architecture": "small_cnn",
                    "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                    "image_size": 64,
                    "name": "external-cnn",
                },
                {
                    "description_version": 1,
                    "framework": "timm",
                    "architecture": "resnet10t",
                    "classes": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                    "image_size": 224,
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                    "interpolation": "bicubic",
                    "gradcam_layer": "layer4",
                },
            ]
        },
    )

    description_version: Literal[1] = Field(
        default=DESCRIPTION_VERSION, description="Version of this description format."
    )
    framework: Framework = Field(
        default="dpaat",
        description="dpaat: an architecture of this project; torchvision / timm: any "
        "architecture of that library by name (weights from the uploaded safetensors file, "
        "never a hub); onnx: an ONNX graph, converted to PyTorch for gradient attacks.",
    )
    architecture: str = Field(
        min_length=1,
        max_length=52,  # stored as framework/name in a 64-character column
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="dpaat: small_cnn, resnet18, ...; torchvision: e.g. resnet50; timm: e.g. "
        "efficientnet_b0; onnx: informative (e.g. the exporter's model name).",
    )
    classes: list[Label] = Field(
        min_length=2, max_length=1000, description="Class names in the order of the outputs."
    )
    image_size: int = Field(ge=16, le=1024, description="Input size the model expects (pixels).")
    mean: list[float] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="Per-channel mean subtracted from images in [0, 1] (ImageNet's when null; "
        "a dpaat model keeps its normalization in its weights: leave it out).",
    )
    std: list[float] | None = Field(
        default=None, min_length=3, max_length=3, description="Per-channel std (see mean)."
    )
    resize: Literal["stretch", "center_crop"] = Field(
        default="stretch",
        description="How an image sent for prediction becomes image_size x image_size: "
        "stretched, or the shorter side scaled then the centre cropped.",
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    gradcam_layer: str | None = Field(
        default=None,
        max_length=200,
        description="Module whose feature map Grad-CAM explains (a name in the network, "
        "e.g. layer4); null: found automatically (the last spatial feature map).",
    )
    name: Name | None = None
    training_method: Method | None = Field(
        default=None, description="How it was trained, if known."
    )
    notes: str | None = Field(default=None, max_length=2000)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        cleaned = [c.strip() for c in classes]
        if any(not c or len(c) > 100 for c in cleaned):
            raise ValueError("class names must be 1-100 characters")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("class names must be distinct")
        return cleaned

    @field_validator("std")
    @classmethod
    def _positive(cls, std: list[float] | None) -> list[float] | None:
        if std is not None and not all(v > 0 for v in std):
            raise ValueError("std values must be > 0")
        return std

    @model_validator(mode="after")
    def _framework_fields(self) -> ModelDescription:
        if self.framework == "dpaat":
            if self.architecture not in _ARCHITECTURES:
                raise ValueError(
                    f"architecture: {self.architecture!r} is not a dpaat architecture; choose "
                    f"one of {list(_ARCHITECTURES)}, or set framework to torchvision or timm"
                )
            if self.mean is not None or self.std is not None:
                raise ValueError(
                    "mean/std: a dpaat model normalizes inside its weights; leave them out"
                )
        else:
            self.mean = self.mean or list(IMAGENET_MEAN)
            self.std = self.std or list(IMAGENET_STD)
        return self

    @property
    def arch(self) -> str:
        """The ML core's architecture string: small_cnn, torchvision/resnet18, timm/..., onnx."""
        if self.framework == "dpaat":
            return self.architecture
        if self.framework == "onnx":
            return "onnx"
        return f"{self.framework}/{self.architecture}"


class ModelOut(ORMModel):
    """A registered model."""

    id: str
    name: str
    source: Literal["trained", "uploaded"]
    weights_format: Literal["checkpoint", "safetensors", "onnx"]
    architecture: str
    classes: list[str]
    image_size: int
    training_method: str | None
    checkpoint_sha256: str
    job_id: str | None
    dataset_id: str | None
    info: dict[str, Any]
    created_at: datetime
    has_report: bool = False


class EvaluationOut(ORMModel):
    """A model's latest robustness report (the report contract of docs/dpaat.md)."""

    id: str
    model_id: str
    dataset_id: str | None
    job_id: str | None
    verdict: str = Field(examples=["pass"])
    report: dict[str, Any]
    created_at: datetime
