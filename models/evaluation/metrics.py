"""Classification metrics computed from class probabilities, in numpy (no scikit-learn at run time).

Conventions follow scikit-learn so the numbers can be compared with it (the tests do, to 1e-9):
balanced accuracy and macro averages run over the classes present in the labels; average precision
is the step-wise sum of (R_n - R_{n-1}) * P_n over distinct score thresholds; AUROC is the
Mann-Whitney statistic with tied scores counted as one half (equal to the trapezoidal ROC area).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


def _np(a: ArrayLike, dtype: type | None = None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def confusion_matrix(y: ArrayLike, pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts (K, K): rows are true classes, columns predicted classes."""
    yt, yp = _np(y, np.int64), _np(pred, np.int64)
    flat = np.bincount(yt * num_classes + yp, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_recall(cm: np.ndarray) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class absent from the labels."""
    support = cm.sum(axis=1)
    return [float(cm[k, k] / support[k]) if support[k] > 0 else None for k in range(len(cm))]


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the labels."""
    recalls = [r for r in per_class_recall(cm) if r is not None]
    return float(np.mean(recalls)) if recalls else float("nan")


def average_precision(scores: ArrayLike, positive: ArrayLike) -> float:
    """Average precision of one binary problem: sum over distinct thresholds of
    (recall_n - recall_{n-1}) * precision_n. NaN when there is no positive."""
    s, p = _np(scores, np.float64), _np(positive, bool)
    n_pos = int(p.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, p = s[order], p[order]
    # the last index of each run of equal scores: a threshold admits all tied samples at once
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(p)[last].astype(np.float64)
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts - 1) / 2.0
    return mean_rank[inverse]


def roc_auc(scores: ArrayLike, positive: ArrayLike) -> float:
    """Area under the ROC curve of one binary problem; NaN unless both classes are present."""
    s, p = _np(scores, np.float64), _np(positive, bool)
    n_pos = int(p.sum())
    n_neg = len(p) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _none_if_nan(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def classification_metrics(
    probs: ArrayLike, y: ArrayLike, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro mAP and AUROC (one-vs-rest), per-class recall and support,
    and the confusion matrix of class probabilities ``probs`` (N, K) against labels ``y`` (N,).

    A class absent from ``y`` has no recall (None) and no average precision; a class whose
    one-vs-rest problem has a single label value has no AUROC. Such classes are left out of the
    macro averages and listed under ``map_excluded`` / ``auroc_excluded``. Undefined values are
    None, never NaN.
    """
    pr, yt = _np(probs, np.float64), _np(y, np.int64)
    k = len(classes)
    if pr.ndim != 2 or pr.shape[1] != k:
        raise ValueError(f"probs must have shape (N, {k}), got {pr.shape}")
    if len(pr) != len(yt) or len(yt) == 0:
        raise ValueError(f"need as many labels as rows (>0): {len(yt)} labels, {len(pr)} rows")
    if yt.min() < 0 or yt.max() >= k:
        raise ValueError(f"labels must be in [0, {k})")
    pred = pr.argmax(axis=1)
    cm = confusion_matrix(yt, pred, k)
    ap = [average_precision(pr[:, c], yt == c) for c in range(k)]
    auc = [roc_auc(pr[:, c], yt == c) for c in range(k)]
    ap_ok = [v for v in ap if np.isfinite(v)]
    auc_ok = [v for v in auc if np.isfinite(v)]
    return {
        "n": len(yt),
        "accuracy": float(np.mean(pred == yt)),
        "balanced_accuracy": _none_if_nan(balanced_accuracy(cm)),
        "map": float(np.mean(ap_ok)) if ap_ok else None,
        "auroc": float(np.mean(auc_ok)) if auc_ok else None,
        "recall": dict(zip(classes, per_class_recall(cm), strict=True)),
        "support": {c: int(n) for c, n in zip(classes, cm.sum(axis=1), strict=True)},
        "average_precision": {c: _none_if_nan(v) for c, v in zip(classes, ap, strict=True)},
        "map_excluded": [c for c, v in zip(classes, ap, strict=True) if not np.isfinite(v)],
        "auroc_excluded": [c for c, v in zip(classes, auc, strict=True) if not np.isfinite(v)],
        "confusion_matrix": cm.tolist(),
    }
