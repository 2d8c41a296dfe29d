"""Our numpy metrics against scikit-learn (the oracle; models/ must not need it at run time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from models.evaluation.metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    mean_interval,
    roc_auc,
    wilson,
)

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
TOL = 1e-9


def _random_problem(seed: int, n: int = 300, k: int = 7, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if ties:  # coarse scores: many ties, the case where AP/AUROC conventions differ
        probs = np.round(probs, 1)
    return probs, y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_classification_metrics_match_sklearn(seed: int, ties: bool) -> None:
    probs, y = _random_problem(seed, ties=ties)
    m = classification_metrics(torch.from_numpy(probs), torch.from_numpy(y), CLASSES)
    pred = probs.argmax(1)
    onehot = np.eye(len(CLASSES))[y]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=TOL)
    assert m["map"] == pytest.approx(
        skm.average_precision_score(onehot, probs, average="macro"), abs=TOL
    )
    # sklearn's multiclass "ovr" refuses rounded (not summing to 1) scores: same macro by hand
    ovr = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in range(len(CLASSES))])
    assert m["auroc"] == pytest.approx(ovr, abs=TOL)
    if not ties:
        assert m["auroc"] == pytest.approx(
            skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=TOL
        )
    recall = skm.recall_score(y, pred, average=None, labels=range(len(CLASSES)))
    for c, r in zip(CLASSES, recall, strict=True):
        assert m["recall"][c] == pytest.approx(r, abs=TOL)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(7)).tolist()
    assert m["map_excluded"] == [] and m["auroc_excluded"] == []


@pytest.mark.parametrize("seed", range(5))
def test_binary_ap_and_auroc_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = rng.random(200) < 0.2
    scores = np.round(rng.random(200) + 0.3 * pos, 2)  # ties included
    assert average_precision(scores, pos) == pytest.approx(
        skm.average_precision_score(pos, scores), abs=TOL
    )
    assert roc_auc(scores, pos) == pytest.approx(skm.roc_auc_score(pos, scores), abs=TOL)


def test_known_values() -> None:
    # perfect ranking -> 1; reversed -> AUROC 0; all tied -> AUROC 0.5, AP = prevalence
    pos = np.array([1, 1, 0, 0, 0], bool)
    assert roc_auc([0.9, 0.8, 0.3, 0.2, 0.1], pos) == 1.0
    assert average_precision([0.9, 0.8, 0.3, 0.2, 0.1], pos) == 1.0
    assert roc_auc([0.1, 0.2, 0.3, 0.8, 0.9], pos) == 0.0
    assert roc_auc([0.5] * 5, pos) == 0.5
    assert average_precision([0.5] * 5, pos) == pytest.approx(0.4)
    assert np.isnan(roc_auc([0.1, 0.2], np.array([True, True])))
    assert np.isnan(average_precision([0.1, 0.2], np.array([False, False])))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_is_excluded_and_named() -> None:
    probs, y = _random_problem(3, k=7)
    y = np.where(y == 3, 0, y)  # no 'df' sample left
    m = classification_metrics(probs, y, CLASSES)
    present = [c for c in range(7) if c != 3]
    onehot = np.eye(7)[y][:, present]
    assert m["recall"]["df"] is None
    assert m["support"]["df"] == 0
    assert m["map_excluded"] == ["df"] and m["auroc_excluded"] == ["df"]
    assert m["average_precision"]["df"] is None
    assert m["map"] == pytest.approx(
        skm.average_precision_score(onehot, probs[:, present], average="macro"), abs=TOL
    )
    auc = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in present])
    assert m["auroc"] == pytest.approx(auc, abs=TOL)
    assert m["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, probs.argmax(1)), abs=TOL
    )


def test_confusion_matrix_and_bad_input() -> None:
    cm = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.ones((4, 3)) / 3, [0, 1, 2, 0], CLASSES)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.ones((4, 3)) / 3, [0, 1, 2], ("a", "b", "c"))
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.ones((2, 3)) / 3, [0, 3], ("a", "b", "c"))


def test_wilson_interval_reference_values() -> None:
    # reference values of the Wilson score interval (e.g. statsmodels' proportion_confint)
    iv = wilson(43, 100)
    assert (iv["low"], iv["high"]) == pytest.approx((0.33733, 0.52785), abs=1e-5)
    assert wilson(0, 10)["low"] == 0.0 and wilson(0, 10)["high"] == pytest.approx(0.27753, abs=1e-5)
    assert wilson(10, 10)["high"] == pytest.approx(1.0) and wilson(0, 0)["low"] is None


def test_mean_interval_matches_scipy() -> None:
    from scipy import stats

    v = np.random.default_rng(5).beta(2, 5, 400)  # per-image scores in [0, 1], skewed
    iv = mean_interval(v)
    low, high = stats.norm.interval(0.95, loc=v.mean(), scale=stats.sem(v))
    assert (iv["low"], iv["high"]) == pytest.approx((low, high), abs=1e-4)
    assert iv["n"] == 400 and mean_interval(torch.tensor(v))["low"] == pytest.approx(iv["low"])
    assert mean_interval([0.3])["low"] is None and mean_interval([])["high"] is None


def test_metrics_carry_intervals_that_contain_the_estimate_and_shrink_with_n() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (120, 1200):
        y = rng.integers(0, 4, n)
        logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[y]  # informative, not perfect
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = classification_metrics(probs, y, ["a", "b", "c", "d"])
        iv = m["intervals"]
        for key in ("accuracy", "balanced_accuracy", "map"):
            assert iv[key]["n"] == n and iv[key]["low"] <= m[key] <= iv[key]["high"], key
        assert iv["balanced_accuracy"]["method"] == "bootstrap"
        assert iv["recall"]["a"]["n"] == m["support"]["a"]
        widths.append(iv["balanced_accuracy"]["high"] - iv["balanced_accuracy"]["low"])
        # seeded: the same numbers again
        assert classification_metrics(probs, y, ["a", "b", "c", "d"])["intervals"] == iv
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(10) as wide with 10 times the samples
