"""Audit requests and responses: an evaluation job plus thresholds, optionally compared with a
baseline audit. All eps are in 1/255 units; metric values are fractions in [0, 1]."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from app.schemas.common import Identifier, Name, ORMModel
from app.schemas.jobs import EPS_LIMIT, AttackSpec, Status, _default_attacks

# Metrics of the report's clean / robust[eps] sections a threshold can name (recall.<class> too),
# plus "curve_auc" (whole report, no eps) and "verdict" (the validity checks: pass < warn < fail).
NUMERIC_METRICS = ("accuracy", "balanced_accuracy", "map", "auroc")
METRIC_PATTERN = r"^(accuracy|balanced_accuracy|map|auroc|curve_auc|verdict|recall\.[^\s@]{1,100})$"
VERDICTS = ("pass", "warn", "fail")
Outcome = Literal["pending", "passed", "failed", "error"]


NO_INTERVAL = frozenset({"verdict", "curve_auc", "auroc"})


class Threshold(BaseModel):
    """One requirement, e.g. ``{"metric": "accuracy", "eps": 2, "op": ">=", "value": 0.4}``
    (robust accuracy at 2/255 at least 0.40) or ``{"metric": "verdict", "op": "!=",
    "value": "fail"}``. ``eps`` null means the clean metric."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(
        pattern=METRIC_PATTERN,
        description="accuracy | balanced_accuracy | map | auroc | recall.<class> | curve_auc | "
        "verdict",
        examples=["recall.mel"],
    )
    eps: float | None = Field(
        default=None, ge=0, le=EPS_LIMIT, description="1/255 units; null = clean."
    )
    op: Literal[">=", "<=", "==", "!="] = ">="
    value: float | Literal["pass", "warn", "fail"]
    use_interval: bool = Field(
        default=False,
        description="Check the report's 95 % interval instead of its point estimate: the lower "
        "bound for >=, the upper bound for <= (accuracy, balanced_accuracy, map, recall.<class>).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Threshold:
        if self.use_interval and (self.metric in NO_INTERVAL):
            raise ValueError(f"{self.metric} has no interval: drop use_interval")
        if self.metric == "verdict":
            if self.op not in ("==", "!=") or not isinstance(self.value, str):
                raise ValueError("verdict thresholds are 'verdict != fail' or 'verdict == pass'")
            if self.eps is not None:
                raise ValueError("the verdict has no eps")
            return self
        if self.op not in (">=", "<="):
            raise ValueError(f"{self.metric} thresholds use >= or <=")
        if isinstance(self.value, str) or not 0 <= self.value <= 1:
            raise ValueError(f"{self.metric} is a fraction: the value must be in [0, 1]")
        if self.metric == "curve_auc" and self.eps is not None:
            raise ValueError("curve_auc summarises every eps: give no eps")
        return self

    @property
    def name(self) -> str:
        """How the threshold reads: ``accuracy@2 >= 0.4``, ``verdict != fail``."""
        where = "" if self.eps is None else f"@{self.eps:g}"
        value = self.value if isinstance(self.value, str) else f"{self.value:g}"
        return f"{self.metric}{where} {self.op} {value}" + (
            " (95% bound)" if self.use_interval else ""
        )


class Baseline(BaseModel):
    """Compare with an earlier audit: this one fails when any threshold metric drops by more than
    ``max_drop`` (0.02 = 2 points) below the baseline's value at the same eps."""

    model_config = ConfigDict(extra="forbid")

    audit_id: Identifier | None = Field(default=None, description="A finished audit of yours.")
    model_name: Name | None = Field(
        default=None,
        description="The latest passing audit of a model with this name (your production model).",
    )
    max_drop: float = Field(default=0.02, ge=0, le=1)

    @model_validator(mode="after")
    def _one_reference(self) -> Baseline:
        if (self.audit_id is None) == (self.model_name is None):
            raise ValueError("give exactly one of audit_id and model_name")
        return self


_EXAMPLE_THRESHOLDS: list[JsonValue] = [
    {"metric": "balanced_accuracy", "op": ">=", "value": 0.6},
    {"metric": "accuracy", "eps": 2, "op": ">=", "value": 0.4},
    {"metric": "recall.mel", "eps": 1, "op": ">=", "value": 0.5},
    {"metric": "verdict", "op": "!=", "value": "fail"},
]


class AuditSpec(BaseModel):
    """What to audit a model on: the dataset, the threat model and the thresholds. With an
    uploaded model (multipart ``POST /api/v1/audits``) this is the ``audit`` form field."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": "8c0f6f0e2b5c4f0e9d7a1b2c3d4e5f60",
                    "eps_list": [0, 1, 2],
                    "thresholds": _EXAMPLE_THRESHOLDS,
                }
            ]
        },
    )

    dataset_id: Identifier | None = Field(
        default=None,
        description="null: the dataset the model was trained on (required for an uploaded model).",
    )
    part: Literal["train", "val", "test"] = "test"
    limit: int | None = Field(default=None, ge=1, description="Cap on images, class-stratified.")
    eps_list: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0], min_length=1, max_length=16
    )
    attacks: list[AttackSpec] = Field(default_factory=_default_attacks, min_length=1, max_length=8)
    gradcam: bool = True
    batch_size: int = Field(default=128, ge=1, le=4096)
    thresholds: list[Threshold] = Field(min_length=1, max_length=100)
    baseline: Baseline | None = None

    @model_validator(mode="after")
    def _thresholds_within_threat_model(self) -> AuditSpec:
        bad = [e for e in self.eps_list if not 0 <= e <= EPS_LIMIT]
        if bad:
            raise ValueError(f"eps must be in [0, {EPS_LIMIT:g}] (1/255 units), got {bad}")
        self.eps_list = sorted(set(self.eps_list))
        for t in self.thresholds:
            if t.eps is not None and t.eps not in self.eps_list:
                raise ValueError(
                    f"threshold {t.name!r}: eps {t.eps:g} is not in eps_list {self.eps_list}"
                )
        return self

    def evaluation_params(self, model_id: str | None = None) -> dict[str, Any]:
        """The ``EvaluateJobRequest`` JSON of the audit's evaluation job."""
        params = self.model_dump(mode="json", exclude={"thresholds", "baseline"})
        if model_id is not None:
            params["model_id"] = model_id
        return params


class AuditRequest(AuditSpec):
    """Audit a registered model: evaluate it (attacks x eps) and check thresholds."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "0d6c2b0e5a9f4c1e8b7a6d5c4b3a2910",
                    "dataset_id": "8c0f6f0e2b5c4f0e9d7a1b2c3d4e5f60",
                    "eps_list": [0, 1, 2],
                    "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 20}],
                    "thresholds": _EXAMPLE_THRESHOLDS,
                    "baseline": {"model_name": "production", "max_drop": 0.02},
                }
            ]
        },
    )

    model_id: Identifier


class ThresholdResult(BaseModel):
    name: str = Field(examples=["accuracy@2 >= 0.4"])
    metric: str
    eps: float | None
    op: str
    required: float | str
    observed: float | str | None = Field(
        description="null: the report has no value for it. With use_interval: the bound checked."
    )
    passed: bool
    detail: str = ""
    interval: dict[str, Any] | None = Field(
        default=None, description="The report's 95 % interval of the metric: n, low, high, method."
    )


class RegressionResult(BaseModel):
    name: str = Field(examples=["accuracy@2 no worse than baseline - 0.02"])
    metric: str
    eps: float | None
    baseline: float | None
    observed: float | None
    required: float | None = Field(description="baseline - max_drop")
    passed: bool
    detail: str = ""


class AuditOut(ORMModel):
    """An audit. ``status`` is its evaluation job's; ``passed`` is null until the job succeeded,
    then every threshold (and every regression rule) must hold."""

    id: str
    model_id: str
    dataset_id: str | None
    job_id: str | None
    status: Status
    outcome: Outcome
    passed: bool | None
    thresholds: list[dict[str, Any]]
    baseline: dict[str, Any] | None
    progress: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None


class AuditDetail(AuditOut):
    """An audit with its results (once finished)."""

    evaluation_id: str | None = None
    threshold_results: list[ThresholdResult] = Field(default_factory=list)
    regression_results: list[RegressionResult] = Field(default_factory=list)
    verdict: str | None = Field(default=None, description="The report's validity-check verdict.")
    report_url: str | None = Field(
        default=None, description="Where the full report is (JSON, ?format=md or ?format=junit)."
    )
    figures: dict[str, str] = Field(
        default_factory=dict,
        description="Once finished: figure name -> PNG URL (robustness_curve, class_recall, "
        "gradcam_montage, dpaat_eps_hist, dpaat_tau; those that exist for this model).",
    )


class CompareItem(BaseModel):
    """One column of a comparison: an audit's (or a model's latest) report in numbers."""

    label: str
    audit_id: str | None
    model_id: str
    model_name: str
    evaluation_id: str
    passed: bool | None = Field(description="The audit's outcome; null for a model's report.")
    verdict: str | None
    curve_auc: float | None
    clean: dict[str, Any]
    robust: dict[str, dict[str, Any]] = Field(description="eps -> worst-case metrics")


class Comparison(BaseModel):
    """Two or more reports side by side (same eps columns where they overlap)."""

    items: list[CompareItem]
    eps: list[float] = Field(description="Every eps of any report, sorted.")
    comparable: bool = Field(description="Same split and the same attacks in every report.")
    notes: list[str] = Field(default_factory=list)
    curve_url: str
