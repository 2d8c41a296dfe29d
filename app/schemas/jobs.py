"""Job requests and responses. ``TrainHyperParams`` mirrors ``models.training.TrainConfig`` (minus
the fields the server fills in: data_root, manifest, pretrained, reference_checkpoint, device);
``tests/test_api_schemas.py`` fails when the two drift apart. All eps are in 1/255 units."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.common import Identifier, Name, ORMModel

Method = Literal["standard", "pgd_at", "trades", "dpaat", "amat_external", "iaat_flip"]
Architecture = Literal[
    "small_cnn",
    "resnet18",
    "resnet50",
    "vgg16_bn",
    "densenet121",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
]
AttackName = Literal["fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack"]
Status = Literal["queued", "running", "succeeded", "failed", "cancel_requested", "cancelled"]
# Fields of TrainConfig the server sets itself (paths on the server, hardware).
SERVER_FIELDS = frozenset(
    {"data_root", "manifest", "pretrained", "reference_checkpoint", "device"}
    | {"init_checkpoint", "init_model", "replace_head"}  # from init_model_id / replace_head
)
# Fine-tuning a model (init_model_id) changes these defaults, unless the request sets them: a
# lower peak learning rate and a warm-up (onecycle), so the pretrained features are not wiped.
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 0.01, "scheduler": "onecycle"}
PER_SAMPLE_EPS_METHODS = ("dpaat", "amat_external", "iaat_flip")
EPS_LIMIT = 64.0  # 64/255: past this an L-inf attack can erase any image


class TrainHyperParams(BaseModel):
    """Hyper-parameters of a training run (docs/dpaat.md); defaults are the spec's."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(default=64, ge=16, le=512, description="Working size in pixels.")
    limit: int | None = Field(
        default=None, ge=2, description="Cap per split part, class-stratified (quick runs)."
    )
    arch: Architecture = "small_cnn"
    method: Method = "dpaat"
    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=2, le=4096, description=">= 2 (BatchNorm).")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.05, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0, le=1)
    scheduler: Literal["cosine", "onecycle", "none"] = "cosine"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    eps_max: float = Field(
        default=8.0, ge=0, le=EPS_LIMIT, description="Largest radius, 1/255 units (8 = 8/255)."
    )
    eps_min: float = Field(default=0.0, ge=0, le=EPS_LIMIT, description="1/255 units.")
    delta: float | None = Field(
        default=None, gt=0, le=EPS_LIMIT, description="Radius step; null = eps_max / 8."
    )
    pgd_steps: int = Field(default=10, ge=1, le=200)
    bisection_steps: int = Field(default=5, ge=1, le=30, description="Boundary search probes.")
    boundary_search: Literal["bisection", "secant"] = Field(
        default="bisection",
        description="DPAAT's boundary estimate: the spec's bisection, or regula falsi from the "
        "known end losses (fewer probes; dpaat and amat_external only).",
    )
    beta: float = Field(default=0.5, ge=0, le=1, description="Weight of the adversarial loss.")
    z: float = Field(default=2.0, ge=0, le=10, description="Robust z-score of the criterion tau.")
    tau_momentum: float = Field(default=0.0, ge=0, lt=1)
    tau_statistic: Literal["median_mad", "mean_std", "quantile"] = Field(
        default="median_mad", description="Statistic of the criterion tau (the spec: median_mad)."
    )
    tau_quantile: float = Field(default=0.9, gt=0, lt=1, description="For tau_statistic=quantile.")
    tau_update: Literal["epoch", "batch"] = Field(
        default="epoch", description="Recompute tau once per epoch (the spec) or every batch."
    )
    trades_beta: float = Field(default=6.0, ge=0, le=100)
    class_weights: bool = False
    class_weight_power: float = Field(
        default=1.0, gt=0, le=2, description="Exponent of the class weights: 1 = inverse frequency."
    )
    balanced_sampler: bool = False
    augment: bool = True
    bf16: bool = False
    channels_last: bool = False
    pgd_at_beta: float = Field(
        default=1.0, ge=0, le=1, description="pgd_at only: adversarial share (1 = Madry et al.)."
    )
    robust_val_eps: float = Field(
        default=2.0,
        ge=0,
        le=EPS_LIMIT,
        description="Radius (1/255) of the per-epoch robust validation (PGD); 0 turns it off.",
    )
    robust_val_samples: int = Field(default=256, ge=1, le=100_000)
    robust_val_steps: int = Field(default=10, ge=1, le=200)
    best_by: Literal["auto", "last", "val_acc", "val_bacc", "robust_val_acc", "robust_val_bacc"] = (
        Field(
            default="auto",
            description="The epoch whose weights become the model: auto = val_bacc for standard, "
            "robust_val_bacc for the adversarial methods (robust overfitting, Rice et al. 2020).",
        )
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainHyperParams:
        if self.boundary_search == "secant" and self.method not in ("dpaat", "amat_external"):
            raise ValueError(
                "boundary_search 'secant' needs a loss criterion (method dpaat or amat_external)"
            )
        if self.best_by.startswith("robust") and self.robust_val_eps == 0:
            raise ValueError(f"best_by {self.best_by!r} needs robust_val_eps > 0")
        if self.eps_min > self.eps_max:
            raise ValueError(
                f"eps_min ({self.eps_min}) must not exceed eps_max ({self.eps_max}) (1/255 units)"
            )
        if self.delta is not None and self.delta > self.eps_max:
            raise ValueError(f"delta ({self.delta}) must not exceed eps_max ({self.eps_max})")
        step = self.eps_max / 8 if self.delta is None else self.delta
        if self.method in PER_SAMPLE_EPS_METHODS and step <= 0:
            raise ValueError(f"method {self.method} needs eps_max > 0 (1/255 units)")
        if self.class_weights and self.balanced_sampler:
            raise ValueError(
                "class_weights and balanced_sampler both correct the class imbalance; choose one"
            )
        return self


class TrainJobRequest(BaseModel):
    """Train a classifier; the finished job registers its model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": "8c0f6f0e2b5c4f0e9d7a1b2c3d4e5f60",
                    "name": "dpaat-small",
                    "config": {"method": "dpaat", "arch": "small_cnn", "epochs": 10, "eps_max": 8},
                }
            ]
        },
    )

    dataset_id: Identifier | None = Field(
        default=None, description="A dataset id; null trains on a generated dataset (demo)."
    )
    name: Name | None = Field(default=None, description="Name of the model.")
    config: TrainHyperParams = Field(default_factory=TrainHyperParams)
    reference_model_id: Identifier | None = Field(
        default=None,
        description="amat_external only: the standard model whose losses fix tau "
        "(null: the job trains one first).",
    )

    init_model_id: str | None = Field(
        default=None,
        description="Fine-tune this registered model (trained here or uploaded: dpaat, "
        "torchvision or timm) instead of starting from random weights. Its architecture and "
        "image size are used; lr and scheduler default to 0.01 and onecycle (warm-up).",
    )
    replace_head: bool = Field(
        default=False,
        description="With init_model_id: a fresh final layer for the dataset's classes (needed "
        "when they differ from the model's).",
    )
    pretrained: Literal["imagenet"] | None = Field(
        default=None,
        description="Start from ImageNet weights the administrator placed on the server "
        "(DPAAT_PRETRAINED_DIR); nothing is downloaded.",
    )

    @model_validator(mode="after")
    def _reference_only_for_amat(self) -> TrainJobRequest:
        if self.reference_model_id is not None and self.config.method != "amat_external":
            raise ValueError("reference_model_id is only used by method 'amat_external'")
        if self.replace_head and self.init_model_id is None:
            raise ValueError("replace_head: only used with init_model_id")
        if self.init_model_id is not None:
            if self.pretrained is not None:
                raise ValueError("pretrained: init_model_id already gives the initial weights")
            for key, value in FINETUNE_DEFAULTS.items():
                if key not in self.config.model_fields_set:
                    setattr(self.config, key, value)
        return self


class AttackSpec(BaseModel):
    """One attack of the threat model and its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: AttackName
    steps: int | None = Field(default=None, ge=1, le=1000)
    restarts: int | None = Field(default=None, ge=1, le=100)
    n_queries: int | None = Field(default=None, ge=1, le=100_000)
    n_target_classes: int | None = Field(default=None, ge=1, le=100)


def _default_attacks() -> list[AttackSpec]:
    return [AttackSpec(name="fgsm"), AttackSpec(name="pgd", steps=20)]


class EvaluateJobRequest(BaseModel):
    """Evaluate a model's robustness with the protocol of docs/dpaat.md."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "0d6c2b0e5a9f4c1e8b7a6d5c4b3a2910",
                    "dataset_id": "8c0f6f0e2b5c4f0e9d7a1b2c3d4e5f60",
                    "eps_list": [0, 0.5, 1, 2, 4, 8],
                    "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 20}],
                }
            ]
        },
    )

    model_id: Identifier
    dataset_id: Identifier | None = Field(
        default=None, description="null: the dataset the model was trained on."
    )
    part: Literal["train", "val", "test"] = "test"
    limit: int | None = Field(default=None, ge=1, description="Cap on images, class-stratified.")
    eps_list: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
        min_length=1,
        max_length=16,
        description="Radii in 1/255 units, each in [0, 64].",
    )
    attacks: list[AttackSpec] = Field(default_factory=_default_attacks, min_length=1, max_length=8)
    gradcam: bool = True
    batch_size: int = Field(default=128, ge=1, le=4096)

    @model_validator(mode="after")
    def _eps_range(self) -> EvaluateJobRequest:
        bad = [e for e in self.eps_list if not 0 <= e <= EPS_LIMIT]
        if bad:
            raise ValueError(f"eps must be in [0, {EPS_LIMIT:g}] (1/255 units), got {bad}")
        self.eps_list = sorted(set(self.eps_list))
        return self


class EpochOut(ORMModel):
    epoch: int
    metrics: dict[str, Any]


class VitalSigns(BaseModel):
    """DPAAT's per-epoch health (from the epoch rows): the criterion tau, the share of broken
    samples, the mean radius and the latest radius histogram (1/255 units)."""

    tau: list[float | None]
    broken_frac: list[float | None]
    eps_mean: list[float | None]
    eps_hist: dict[str, Any] | None = Field(
        default=None, examples=[{"edges": [0, 2, 4, 6, 8], "counts": [10, 40, 30, 20]}]
    )


class JobOut(ORMModel):
    """A job as listed."""

    id: str
    kind: Literal["train", "evaluate"]
    status: Status
    params: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    retries: int
    dataset_id: str | None
    model_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobDetail(JobOut):
    """A job with its epochs and, for per-sample-eps methods, DPAAT's vital signs."""

    epochs: list[EpochOut] = Field(default_factory=list)
    vital_signs: VitalSigns | None = None


def vital_signs(epochs: list[EpochOut]) -> VitalSigns | None:
    """Collect tau / broken_frac / eps_mean per epoch and the latest eps histogram."""
    if not any("tau" in e.metrics for e in epochs):
        return None
    hist = next((e.metrics["eps_hist"] for e in reversed(epochs) if "eps_hist" in e.metrics), None)
    return VitalSigns(
        tau=[e.metrics.get("tau") for e in epochs],
        broken_frac=[e.metrics.get("broken_frac") for e in epochs],
        eps_mean=[e.metrics.get("eps_mean") for e in epochs],
        eps_hist=hist,
    )
