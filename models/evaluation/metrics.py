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


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP_RESAMPLES = 1000


def wilson(successes: int, n: int, z: float = Z95) -> dict[str, Any]:
    """The Wilson score interval of a proportion (Wilson 1927): well-behaved at 0 and 1 and for
    small n, unlike the normal approximation. ``low``/``high`` are None when n = 0."""
    if n <= 0:
        return {"n": 0, "low": None, "high": None, "method": "wilson"}
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {
        "n": n,
        "low": float(max(0.0, centre - half)),
        "high": float(min(1.0, centre + half)),
        "method": "wilson",
    }


def mean_interval(values: ArrayLike, z: float = Z95) -> dict[str, Any]:
    """The normal-approximation interval of a mean (mean +- z * sd / sqrt(n)), for per-image
    scores such as lesion focus: with hundreds of images the mean is close to normal whatever the
    scores' own distribution. ``low``/``high`` are None below 2 values."""
    v = _np(values, np.float64)
    n = len(v)
    if n < 2:
        return {"n": n, "low": None, "high": None, "method": "normal"}
    half = z * float(v.std(ddof=1)) / np.sqrt(n)
    return {
        "n": n,
        "low": float(v.mean() - half),
        "high": float(v.mean() + half),
        "method": "normal",
    }


def _stratified_resamples(yt: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap index sets (B, N) that resample within each class, so every class keeps its
    support (balanced accuracy and macro mAP are averages over classes)."""
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(yt)), dtype=np.int64)
    for c in np.unique(yt):
        members = np.flatnonzero(yt == c)
        out[:, members] = members[rng.integers(0, len(members), (resamples, len(members)))]
    return out


def _average_precision_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """:func:`average_precision` of each row of (B, N) arrays at once (ties handled the same way:
    a threshold admits all tied samples); NaN for a row with no positive."""
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    p = np.take_along_axis(positive, order, axis=1)
    tps = np.cumsum(p, axis=1, dtype=np.float64)
    n_pos = tps[:, -1:]
    end = np.ones_like(p, dtype=bool)
    end[:, :-1] = s[:, :-1] != s[:, 1:]
    rank = np.arange(1, s.shape[1] + 1, dtype=np.float64)
    at_end = np.where(end, tps, 0.0)
    prev = np.maximum.accumulate(np.concatenate([np.zeros_like(n_pos), at_end[:, :-1]], 1), 1)
    gain = np.where(end, (tps - prev) * tps / rank, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos[:, 0] > 0, gain / n_pos[:, 0], np.nan)


def bootstrap_intervals(
    pr: np.ndarray, yt: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """95 % percentile intervals of balanced accuracy and macro mAP from a seeded,
    class-stratified bootstrap over the samples (vectorised over the resamples)."""
    k = pr.shape[1]
    idx = _stratified_resamples(yt, resamples, seed)
    y_b = yt[idx]
    hit = pr.argmax(axis=1)[idx] == y_b
    present = [c for c in range(k) if np.any(yt == c)]
    recalls = np.stack([(hit & (y_b == c)).sum(1) / (yt == c).sum() for c in present], 1)
    ap = np.stack([_average_precision_rows(pr[idx, c], y_b == c) for c in present], 1)
    values = {"balanced_accuracy": recalls.mean(1), "map": ap.mean(1)}
    return {
        name: {
            "n": len(yt),
            "low": float(np.quantile(v, 0.025)),
            "high": float(np.quantile(v, 0.975)),
            "method": "bootstrap",
            "resamples": resamples,
            "seed": seed,
        }
        for name, v in values.items()
    }


def _none_if_nan(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def classification_metrics(
    probs: ArrayLike, y: ArrayLike, classes: Sequence[str], intervals_on: bool = True
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro mAP and AUROC (one-vs-rest), per-class recall and support,
    and the confusion matrix of class probabilities ``probs`` (N, K) against labels ``y`` (N,).

    A class absent from ``y`` has no recall (None) and no average precision; a class whose
    one-vs-rest problem has a single label value has no AUROC. Such classes are left out of the
    macro averages and listed under ``map_excluded`` / ``auroc_excluded``. Undefined values are
    None, never NaN. ``intervals`` holds 95 % intervals with their n: Wilson for accuracy and each
    recall, a seeded class-stratified bootstrap for balanced accuracy, mAP and AUROC (skipped with
    ``intervals_on=False``, which leaves the proportions' intervals).
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
    support = cm.sum(axis=1)
    intervals = {
        "accuracy": wilson(int(np.sum(pred == yt)), len(yt)),
        **(bootstrap_intervals(pr, yt) if intervals_on else {}),
        "recall": {c: wilson(int(cm[i, i]), int(support[i])) for i, c in enumerate(classes)},
    }
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
        "intervals": intervals,
    }
