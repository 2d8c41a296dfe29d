"""The settings of one training run, as a JSON-able dataclass.

Every epsilon here is in 1/255 units (the trainer divides by 255 before attacking images in
[0, 1]). The DPAAT constants are the project's reconstruction of Li et al. 2024 (see
docs/dpaat.md): each one is a hyper-parameter with the spec's default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from models.nets import ARCHITECTURES
from models.training.validation import BEST_BY

METHODS: tuple[str, ...] = ("standard", "pgd_at", "trades", "dpaat", "amat_external", "iaat_flip")
# methods that keep one radius per training sample (and log tau / eps histograms)
PER_SAMPLE_EPS_METHODS: tuple[str, ...] = ("dpaat", "amat_external", "iaat_flip")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
# cosine: per epoch; onecycle: per batch, warm-up over the first 30 % (Smith & Topor 2019), peak lr
SCHEDULERS: tuple[str, ...] = ("cosine", "onecycle", "none")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
# DPAAT's criterion tau from the collected losses L (docs/decisions/training.md):
# median + z * 1.4826 * MAD (the spec), mean + z * std, or the tau_quantile-th quantile (z unused)
TAU_STATISTICS: tuple[str, ...] = ("median_mad", "mean_std", "quantile")
# when tau is recomputed: at the end of each epoch (the spec), or after every batch from the
# losses collected so far in the epoch
TAU_UPDATES: tuple[str, ...] = ("epoch", "batch")
BOUNDARY_SEARCHES: tuple[str, ...] = ("bisection", "secant")


@dataclass
class TrainConfig:
    """What to train, on what, and how. ``validate()`` says what is wrong in plain words."""

    data_root: str | None = None  # None -> generated synthetic data
    manifest: str | None = None  # split manifest path: reused when it exists, written when not
    image_size: int = 64
    limit: int | None = None  # cap per split part, class-stratified (quick CPU runs)
    arch: str = "small_cnn"
    pretrained: str | None = None  # optional local weights file
    method: str = "dpaat"  # standard | pgd_at | trades | dpaat | amat_external | iaat_flip
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | onecycle | none
    seed: int = 0
    eps_max: float = 8.0  # ALL eps in config are in 1/255 units
    eps_min: float = 0.0
    delta: float | None = None  # None -> eps_max / 8
    pgd_steps: int = 10
    bisection_steps: int = 5  # forward probes of the boundary search
    # How DPAAT finds s[i] on x -> x + p[i]: "bisection" (the spec) or "secant" (regula falsi from
    # the losses already known at both ends: fewer probes for the same accuracy, dpaat and
    # amat_external only; docs/decisions/training.md)
    boundary_search: str = "bisection"
    beta: float = 0.5  # adversarial share of the loss (dpaat, amat_external, iaat_flip)
    z: float = 2.0
    tau_momentum: float = 0.0
    tau_statistic: str = "median_mad"  # median_mad | mean_std | quantile
    tau_quantile: float = 0.9  # only for tau_statistic = "quantile"
    tau_update: str = "epoch"  # epoch | batch
    trades_beta: float = 6.0
    reference_checkpoint: str | None = None  # amat_external: tau from this standard model
    class_weights: bool = False  # inverse-frequency CE weights (nv is 2/3 of HAM10000)
    class_weight_power: float = 1.0  # the weights' exponent: 1 = inverse frequency, 0.5 = sqrt
    balanced_sampler: bool = False
    augment: bool = True  # flips and 90-degree rotations (dermoscopy has no orientation)
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = False  # autocast (meant for CUDA)
    channels_last: bool = False
    # pgd_at only: adversarial share of its loss. 1 = Madry et al.'s adversarial-only training;
    # below 1 gives the mixed loss (1 - b) CE(clean) + b CE(adv). Kept apart from ``beta`` so that
    # one config can hold DPAAT's beta = 0.5 and still train the textbook pgd_at baseline.
    pgd_at_beta: float = 1.0
    # After every epoch: PGD-robust_val_steps at robust_val_eps (1/255; 0 turns it off) on a fixed
    # class-stratified subset of robust_val_samples validation images, and the checkpoint of the
    # best epoch by best_by is kept as best.pt (robust overfitting, Rice et al. 2020).
    robust_val_eps: float = 2.0
    robust_val_samples: int = 256
    robust_val_steps: int = 10
    best_by: str = "auto"  # auto | last | val_acc | val_bacc | robust_val_acc | robust_val_bacc
    # Fine-tuning: start from these weights (a checkpoint of this project, or safetensors/ONNX
    # described by ``init_model``, a model.json dict); ``replace_head`` gives the network a fresh
    # final layer of the dataset's width instead of requiring the same classes.
    init_checkpoint: str | None = None
    init_model: dict[str, Any] | None = None
    replace_head: bool = False

    @property
    def step_delta(self) -> float:
        """The per-sample radius increment (and initial radius), 1/255 units."""
        return self.eps_max / 8 if self.delta is None else self.delta

    def validate(self) -> None:
        """Raise ValueError naming every field that is out of range."""
        errors: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        need(
            self.method in METHODS,
            f"method {self.method!r} is unknown; choose one of {list(METHODS)}",
        )
        need(
            self.arch in ARCHITECTURES
            or (isinstance(self.arch, str) and self.arch.split("/")[0] in ("torchvision", "timm")),
            f"arch {self.arch!r} is unknown; choose one of {sorted(ARCHITECTURES)}, "
            "or torchvision/NAME or timm/NAME",
        )
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {list(OPTIMIZERS)}")
        need(self.scheduler in SCHEDULERS, f"scheduler must be one of {list(SCHEDULERS)}")
        need(self.device in DEVICES, f"device must be one of {list(DEVICES)}")
        need(
            self.tau_statistic in TAU_STATISTICS,
            f"tau_statistic {self.tau_statistic!r} is unknown; "
            f"choose one of {list(TAU_STATISTICS)}",
        )
        need(
            self.tau_update in TAU_UPDATES,
            f"tau_update {self.tau_update!r} is unknown; choose one of {list(TAU_UPDATES)}",
        )
        q = self.tau_quantile
        need(
            isinstance(q, int | float) and not isinstance(q, bool) and 0 < q < 1,
            f"tau_quantile must be in (0, 1), got {q!r}",
        )
        need(
            self.boundary_search in BOUNDARY_SEARCHES,
            f"boundary_search must be one of {list(BOUNDARY_SEARCHES)}",
        )
        need(
            self.boundary_search == "bisection" or self.method in ("dpaat", "amat_external"),
            "boundary_search 'secant' needs a loss criterion (method dpaat or amat_external)",
        )
        need(self.best_by in BEST_BY, f"best_by must be one of {list(BEST_BY)}")
        need(
            not (self.best_by.startswith("robust") and self.robust_val_eps == 0),
            f"best_by {self.best_by!r} needs robust_val_eps > 0",
        )
        ints = ("image_size", "epochs", "batch_size", "pgd_steps", "bisection_steps", "seed")
        for name in (*ints, "robust_val_samples", "robust_val_steps"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool),
                f"{name} must be an integer, got {value!r}",
            )
        if not errors:
            need(self.image_size >= 16, "image_size must be >= 16")
            need(self.epochs >= 1, "epochs must be >= 1")
            need(self.batch_size >= 2, "batch_size must be >= 2 (BatchNorm needs two samples)")
            need(self.pgd_steps >= 1, "pgd_steps must be >= 1")
            need(self.bisection_steps >= 1, "bisection_steps must be >= 1")
            need(self.seed >= 0, "seed must be >= 0")
            need(self.robust_val_samples >= 1, "robust_val_samples must be >= 1")
            need(self.robust_val_steps >= 1, "robust_val_steps must be >= 1")
        need(
            self.limit is None or (isinstance(self.limit, int) and self.limit >= 2),
            "limit must be None or >= 2",
        )
        reals = ("lr", "momentum", "weight_decay", "eps_max", "eps_min", "z", "trades_beta")
        for name in (*reals, "robust_val_eps", "class_weight_power"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            need(ok and math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0")
        if not errors:
            need(self.lr > 0, "lr must be > 0")
            need(0 < self.class_weight_power <= 2, "class_weight_power must be in (0, 2]")
            need(
                self.eps_min <= self.eps_max,
                f"eps_min ({self.eps_min}) must be <= eps_max ({self.eps_max})",
            )
            need(self.momentum < 1, "momentum must be < 1")
            need(self.eps_max <= 255, "eps_max is in 1/255 units and must be <= 255")
            need(
                self.delta is None
                or (
                    isinstance(self.delta, int | float)
                    and not isinstance(self.delta, bool)
                    and math.isfinite(self.delta)
                    and 0 < self.delta <= self.eps_max
                ),
                f"delta must be None (eps_max / 8) or in (0, eps_max = {self.eps_max}]",
            )
            # with delta None the radius step is eps_max / 8 (an explicit delta is checked above)
            need(
                self.method not in PER_SAMPLE_EPS_METHODS
                or self.delta is not None
                or self.eps_max > 0,
                f"{self.method} needs eps_max > 0 (or an explicit delta > 0)",
            )
        for name in ("beta", "tau_momentum", "pgd_at_beta"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            need(ok and 0 <= value <= 1, f"{name} must be in [0, 1], got {value!r}")
        if isinstance(self.tau_momentum, int | float):
            need(self.tau_momentum < 1, "tau_momentum must be < 1 (1 would never update tau)")
        need(
            not (self.class_weights and self.balanced_sampler),
            "class_weights and balanced_sampler both correct the class imbalance; choose one",
        )
        need(
            self.reference_checkpoint is None or self.method == "amat_external",
            "reference_checkpoint is only used by method amat_external",
        )
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing keys that are not fields (a typo must not pass silently)."""
        if not isinstance(data, dict):
            raise ValueError(f"training config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
