"""Evaluation of a classifier under attack: metrics, Grad-CAM, validity checks and the report.

See the "Evaluation protocol" and "Evaluation report" sections of docs/dpaat.md.
"""

from models.evaluation.evaluate import (
    DEFAULT_ATTACKS,
    DEFAULT_EPS,
    build_attack,
    eps_key,
    evaluate_model,
)
from models.evaluation.gradcam import grad_cam, lesion_focus
from models.evaluation.metrics import classification_metrics
from models.evaluation.report import plot_curve, render_markdown, to_jsonable, write_report

__all__ = [
    "DEFAULT_ATTACKS",
    "DEFAULT_EPS",
    "build_attack",
    "classification_metrics",
    "eps_key",
    "evaluate_model",
    "grad_cam",
    "lesion_focus",
    "plot_curve",
    "render_markdown",
    "to_jsonable",
    "write_report",
]
