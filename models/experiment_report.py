"""Published results of an experiment: tables (mean and spread over seeds), plots, claim check.

Everything here reads the result files written by :mod:`models.experiment` (and, for the Grad-CAM
montage only, the checkpoints beside them), so every number in the Markdown can be traced to a
result file and to the experiment file that made it. The results directory gets:

- ``README.md``: what ran, the tables, the plots, the claim check, what is missing, the reading
  (the hand-written ``reading.md`` of the same directory, included verbatim when present);
- ``summary.json``: the aggregated numbers of the tables;
- ``units/<unit>-seed<k>.json``: a copy of every result file used (with its self-check);
- ``experiment.toml``: the experiment file;
- ``curves.png``, ``dpaat_eps_hist.png``, ``dpaat_tau.png``, ``gradcam_montage.png``.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.evaluation.gradcam import CENTRED_GRID, cam_grid
from models.experiment import (
    RESULT_FILE,
    Experiment,
    read_result,
    unit_dir,
    unit_hash,
    write_json_atomic,
)

MAIN_EPS = ("1", "2")
# The claim's verdicts (see claim_check): decided by the 95 % intervals where the report has them
HOLDS, FAILS, UNDECIDED, MISSING = "holds", "does not hold", "undecided", "not measured"
NOT_TESTABLE = "not testable"  # the measurement cannot tell the methods apart (lesion focus)

Interval = tuple[float, float]

Log = Callable[[str], None]


# --------------------------------------------------------------------------- extraction
def eps_key(eps: float) -> str:
    """The report's key for an eps (``1.0`` -> ``"1"``, ``0.5`` -> ``"0.5"``)."""
    return f"{eps:g}"


def _robust(report: dict[str, Any], eps: str) -> dict[str, Any]:
    robust = report.get("robust", {})
    if eps in robust:
        return dict(robust[eps])
    for k, v in robust.items():  # tolerate "1.0" / "1" spellings
        if _float(k) == float(eps):
            return dict(v)
    return {}


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _measure(metrics: dict[str, Any], field: str) -> tuple[float, Interval | None]:
    """A figure of a metrics dict and its 95 % interval (None where the report has none):
    ``accuracy``, ``balanced_accuracy``, ``map``, ``auroc``, or ``recall:<class>``."""
    if field.startswith("recall:"):
        cls = field.split(":", 1)[1]
        values, intervals = metrics.get("recall"), (metrics.get("intervals") or {}).get("recall")
        value = _float(values.get(cls)) if isinstance(values, dict) else math.nan
        iv = intervals.get(cls) if isinstance(intervals, dict) else None
    else:
        value, iv = _float(metrics.get(field)), (metrics.get("intervals") or {}).get(field)
    if not isinstance(iv, dict) or math.isnan(_float(iv.get("low")) + _float(iv.get("high"))):
        return value, None
    return value, (float(iv["low"]), float(iv["high"]))


_FIGURES = {
    "acc": "accuracy",
    "bacc": "balanced_accuracy",
    "map": "map",
    "mel_recall": "recall:mel",
}


def measures_of(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, Interval]]:
    """The flat figures of one result (the table columns; NaN where the report lacks one) and
    the 95 % interval of each figure that has one (Wilson for proportions, bootstrap for balanced
    accuracy and mAP). ``aa_acc@<eps>``: robust accuracy under the reference evaluation
    (AutoAttack) on its subset of the test split."""
    rep = result["report"]
    values: dict[str, float] = {}
    intervals: dict[str, Interval] = {}

    def put(key: str, metrics: dict[str, Any], field: str) -> None:
        values[key], iv = _measure(metrics, field)
        if iv is not None:
            intervals[key] = iv

    clean = rep.get("clean", {})
    for name, field in {**_FIGURES, "auroc": "auroc"}.items():
        put(f"clean_{name}", clean, field)
    values["curve_auc"] = _float(rep.get("curve_auc"))
    for e in result["eval"]["eps"]:
        if float(e) == 0.0:
            continue
        k = eps_key(e)
        for name, field in _FIGURES.items():
            put(f"rob_{name}@{k}", _robust(rep, k), field)
    ref = result.get("reference_report") or {}
    for k in ref.get("robust", {}):
        if _float(k) > 0:
            put(f"aa_acc@{eps_key(_float(k))}", _robust(ref, k), "accuracy")
    if ref:
        values["aa_n"] = _float((ref.get("dataset") or {}).get("samples"))
    focus = rep.get("lesion_focus") or {}
    put("focus_clean", focus, "clean")
    put("focus_adv", focus, "adversarial")
    values["focus_uniform"] = _float(focus.get("uniform_map"))
    grid = cam_grid_of(result)
    values["cam_grid"] = float(min(grid)) if grid else math.nan
    t = result["timings"]
    values["epoch_s"] = _float(t.get("epoch_seconds_mean"))
    values["eval_s"] = _float(t.get("eval_seconds"))
    return values, intervals


def cam_grid_of(result: dict[str, Any]) -> tuple[int, int] | None:
    """The size of the Grad-CAM layer's own map for the result's model: the report's, or for a
    report written before it recorded one, measured on a fresh model of the same architecture at
    the same input size (the size does not depend on the weights). None without lesion focus or
    where the model cannot be built."""
    focus = result["report"].get("lesion_focus")
    if not focus:
        return None
    if focus.get("cam_grid"):
        h, w = focus["cam_grid"]
        return int(h), int(w)
    model = result["report"].get("model") or {}
    try:
        return _probe_cam_grid(
            str(model["architecture"]), len(model["classes"]), int(model["input_size"])
        )
    except (KeyError, TypeError, ValueError, ImportError):
        return None


@functools.cache
def _probe_cam_grid(arch: str, num_classes: int, size: int) -> tuple[int, int]:
    import torch

    from models.nets import build_model

    return cam_grid(build_model(arch, num_classes), torch.zeros(1, 3, size, size))


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per unit name: mean, spread (sample standard deviation over seeds; 0 with one seed), 95 %
    interval (one seed's, or the envelope of the seeds' intervals), n, seeds, verdicts and the
    settings that tell variants apart."""
    by_unit: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_unit[r["unit"]].append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in by_unit.items():
        measured = [measures_of(r) for r in rs]
        flat = [m[0] for m in measured]
        mean, spread, interval = {}, {}, {}
        for k in dict.fromkeys(k for f in flat for k in f):
            vals = [f[k] for f in flat if not math.isnan(f.get(k, math.nan))]
            mean[k] = statistics.fmean(vals) if vals else math.nan
            spread[k] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            # over seeds, the envelope of the seeds' intervals: every seed's interval inside it
            ivs = [m[1][k] for m in measured if k in m[1]]
            if ivs:
                interval[k] = (min(lo for lo, _ in ivs), max(hi for _, hi in ivs))
        out[name] = {
            "method": rs[0]["method"],
            "group": rs[0]["group"],
            "n": len(rs),
            "seeds": [r["seed"] for r in rs],
            "mean": mean,
            "spread": spread,
            "interval": interval,
            "verdicts": [r["report"].get("verdict") for r in rs],
            "codes": sorted({_code(r) for r in rs}),
            "settings": _distinct_settings(rs[0]),
        }
    return out


def _distinct_settings(result: dict[str, Any]) -> dict[str, Any]:
    from models.training.config import TrainConfig

    # a result made before a field existed ran with its default (tau_statistic, tau_update...)
    cfg = {**TrainConfig().to_dict(), **result["train_config"]}
    keys = ("eps_max", "delta", "beta", "z", "pgd_steps", "tau_momentum", "trades_beta")
    extra = {k: v for k, v in cfg.items() if k.startswith(("criterion", "tau_"))}
    return {**{k: cfg.get(k) for k in keys}, **extra}


# --------------------------------------------------------------------------- tables
def _fmt(agg: dict[str, Any], key: str, pct: bool = True) -> str:
    m, s, n = agg["mean"].get(key, math.nan), agg["spread"].get(key, 0.0), agg["n"]
    if math.isnan(m):
        return "n/a"
    scale = 100.0 if pct else 1.0
    text = f"{m * scale:.1f}" if pct else f"{m:.2f}"
    if n > 1:
        text += f" ± {s * scale:.1f}" if pct else f" ± {s:.2f}"
    iv = agg.get("interval", {}).get(key)
    if iv is not None:
        text += (
            f" [{iv[0] * scale:.1f}, {iv[1] * scale:.1f}]"
            if pct
            else f" [{iv[0]:.2f}, {iv[1]:.2f}]"
        )
    return text


def _grid_text(agg: dict[str, Any]) -> str:
    g = agg["mean"].get("cam_grid", math.nan)
    return "n/a" if math.isnan(g) else f"{g:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_tables(aggs: dict[str, dict[str, Any]], names: list[str], eps: list[str]) -> str:
    """The comparison tables of the compared methods (percentages; mean ± sd over seeds)."""
    present = [n for n in names if n in aggs]
    t1 = _table(
        [
            "method",
            "seeds",
            "accuracy",
            "balanced acc.",
            "mAP",
            "AUROC",
            "mel recall",
            "s/epoch (run)",
            "validity checks",
        ],
        [
            [
                f"`{n}`",
                str(aggs[n]["n"]),
                _fmt(aggs[n], "clean_acc"),
                _fmt(aggs[n], "clean_bacc"),
                _fmt(aggs[n], "clean_map"),
                _fmt(aggs[n], "clean_auroc"),
                _fmt(aggs[n], "clean_mel_recall"),
                _fmt(aggs[n], "epoch_s", pct=False),
                ", ".join(sorted({str(v) for v in aggs[n]["verdicts"]})),
            ]
            for n in present
        ],
    )
    # the reference evaluation (AutoAttack) on its subset, beside the protocol's figures
    aa = sorted(
        {k.split("@")[1] for n in present for k in aggs[n]["mean"] if k.startswith("aa_acc@")},
        key=float,
    )
    aa_n = sorted({int(aggs[n]["mean"]["aa_n"]) for n in present if aggs[n]["mean"].get("aa_n")})
    aa_note = f" (n={', '.join(map(str, aa_n))})" if aa_n else ""
    t2 = _table(
        [
            "method",
            *(f"ε={e}" for e in eps),
            "curve area",
            *(f"AutoAttack ε={e}{aa_note}" for e in aa),
        ],
        [
            [
                f"`{n}`",
                *(_fmt(aggs[n], f"rob_acc@{e}") for e in eps),
                _fmt(aggs[n], "curve_auc"),
                *(_fmt(aggs[n], f"aa_acc@{e}") for e in aa),
            ]
            for n in present
        ],
    )
    t3 = _table(
        ["method", "clean", *(f"ε={e}" for e in eps)],
        [
            [f"`{n}`", _fmt(aggs[n], "clean_bacc"), *(_fmt(aggs[n], f"rob_bacc@{e}") for e in eps)]
            for n in present
        ],
    )
    small = [e for e in MAIN_EPS if e in eps]
    t3b = _table(
        ["method", *(f"{m} ε={e}" for e in small for m in ("mAP", "mel recall"))],
        [
            [
                f"`{n}`",
                *(_fmt(aggs[n], f"{m}@{e}") for e in small for m in ("rob_map", "rob_mel_recall")),
            ]
            for n in present
        ],
    )
    t4 = _table(
        [
            "method",
            "lesion focus (clean)",
            "lesion focus (adversarial)",
            "uniform map",
            "Grad-CAM map",
        ],
        [
            [
                f"`{n}`",
                _fmt(aggs[n], "focus_clean"),
                _fmt(aggs[n], "focus_adv"),
                _fmt(aggs[n], "focus_uniform"),
                _grid_text(aggs[n]),
            ]
            for n in present
        ],
    )
    return (
        "**Clean test metrics** (percent; mean ± sample standard deviation over seeds where "
        "there are several, then the 95 % interval in brackets: Wilson for proportions, "
        "bootstrap for balanced accuracy and mAP, the envelope of the seeds' intervals over "
        "several seeds; s/epoch = wall time per training epoch of the real run, validation "
        "included, which moved with the load of the shared machine: compare costs with the "
        "side-by-side table below; validity checks = the worst status of the evaluation's "
        "checks, docs/dpaat.md)\n\n" + t1 + "\n\n"
        "**Robust accuracy** (percent; per sample the worst case over all attacks of the protocol; "
        "AutoAttack: torchattacks' standard version with its full budgets, on a class-stratified "
        "subset of the same test images, a check that the protocol's cut budgets do not "
        "overstate robustness)\n\n" + t2 + "\n\n"
        "**Robust balanced accuracy** (percent; mean recall over the classes, so a model that "
        "answers `nv` for everything scores 1/7, not two thirds)\n\n" + t3 + "\n\n"
        "**Robust mAP and melanoma recall at small ε** (percent)\n\n" + t3b + "\n\n"
        "**Lesion focus** (share of the Grad-CAM mass inside the lesion mask, percent; "
        "adversarial = the CAM of the worst-case example at the report's adversarial ε; uniform "
        "map = the score of a map spread evenly, the lesions' mean area, which a map that "
        "localises nothing gets; Grad-CAM map = the cells a side of the explained layer's map, "
        f"before upsampling: under {CENTRED_GRID} no cell is at the image's centre, where the "
        "lesion is)\n\n" + t4
    )


def variant_table(aggs: dict[str, dict[str, Any]], names: list[str], eps: list[str]) -> str:
    """Variants (sweeps, ablations) next to the settings that make them differ."""
    present = [n for n in names if n in aggs]
    keys = sorted({k for n in present for k in aggs[n]["settings"]})
    varying = [
        k for k in keys if len({json.dumps(aggs[n]["settings"].get(k)) for n in present}) > 1
    ]
    cols = [e for e in eps if e in ("1", "2", "4", "8")]
    return _table(
        [
            "unit",
            "method",
            *varying,
            "seeds",
            "accuracy",
            "balanced acc.",
            "mAP",
            *(f"rob. acc ε={e}" for e in cols),
            "rob. bal. acc ε=2",
            "curve area",
            "focus (clean)",
            "s/epoch",
            "code",
        ],
        [
            [
                f"`{n}`",
                aggs[n]["method"],
                *(str(aggs[n]["settings"].get(k)) for k in varying),
                str(aggs[n]["n"]),
                _fmt(aggs[n], "clean_acc"),
                _fmt(aggs[n], "clean_bacc"),
                _fmt(aggs[n], "clean_map"),
                *(_fmt(aggs[n], f"rob_acc@{e}") for e in cols),
                _fmt(aggs[n], "rob_bacc@2"),
                _fmt(aggs[n], "curve_auc"),
                _fmt(aggs[n], "focus_clean"),
                _fmt(aggs[n], "epoch_s", pct=False),
                ", ".join(f"`{c[:8]}`" for c in aggs[n].get("codes", [])),
            ]
            for n in present
        ],
    )


# --------------------------------------------------------------------------- claim check
def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v * 100:.1f}"


def above(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    """Is ``a`` above ``b`` on ``key``? With intervals on both: it holds when they are separated
    with ``a`` above, fails when separated with ``a`` below, and is undecided when they overlap.
    Without (lesion focus, curve area): decided on the means, a tie not being above."""
    am, bm = _mean(a, key), _mean(b, key)
    if math.isnan(am + bm):
        return MISSING
    ai, bi = _interval(a, key), _interval(b, key)
    if ai is None or bi is None:
        return HOLDS if am > bm else FAILS
    return HOLDS if ai[0] > bi[1] else FAILS if ai[1] < bi[0] else UNDECIDED


def not_below(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    """Is ``a`` not below ``b`` ("close to", "at least as good as")? It fails only when ``a``'s
    interval lies wholly below ``b``'s (without intervals: when ``a``'s mean is below)."""
    am, bm = _mean(a, key), _mean(b, key)
    if math.isnan(am + bm):
        return MISSING
    ai, bi = _interval(a, key), _interval(b, key)
    if ai is None or bi is None:
        return HOLDS if am >= bm else FAILS
    return FAILS if ai[1] < bi[0] else HOLDS


def _mean(agg: dict[str, Any] | None, key: str) -> float:
    return _float(agg["mean"].get(key, math.nan)) if agg else math.nan


def _interval(agg: dict[str, Any] | None, key: str) -> Interval | None:
    iv = agg.get("interval", {}).get(key) if agg else None
    return (float(iv[0]), float(iv[1])) if iv is not None else None


def all_of(*verdicts: str) -> str:
    """A claim made of parts: fails if one part fails, else not measured / undecided if one is."""
    for v in (FAILS, MISSING, UNDECIDED):
        if v in verdicts:
            return v
    return HOLDS


def claim_check(aggs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The claim of docs/dpaat.md, item by item, decided by the 95 % intervals (:func:`above`,
    :func:`not_below`); curve area, and lesion focus in older reports, have no interval and are
    decided on the means. Lesion focus is :data:`NOT_TESTABLE` where a Grad-CAM map has fewer
    than :data:`CENTRED_GRID` cells a side.

    Each item: ``claim``, ``numbers`` (text), ``verdict`` (holds / does not hold / undecided /
    not measured when a method is missing)."""
    d, s, p = aggs.get("dpaat"), aggs.get("standard"), aggs.get("pgd_at")
    items: list[dict[str, Any]] = []

    def numbers(key: str, **named: dict[str, Any] | None) -> str:
        def one(agg: dict[str, Any] | None) -> str:
            iv = _interval(agg, key)
            return _pct(_mean(agg, key)) + (f" [{_pct(iv[0])}, {_pct(iv[1])}]" if iv else "")

        return ", ".join(f"{name} {one(agg)}" for name, agg in named.items())

    def add(claim: str, text: str, verdict: str) -> None:
        items.append({"claim": claim, "numbers": text, "verdict": verdict})

    for key, label in (
        ("clean_acc", "accuracy"),
        ("clean_bacc", "balanced accuracy"),
        ("clean_map", "mAP"),
    ):
        add(
            f"clean {label} close to `standard` (not below it) and above `pgd_at`",
            numbers(key, dpaat=d, standard=s, pgd_at=p),
            all_of(not_below(d, s, key), above(d, p, key)),
        )
    for e in MAIN_EPS:
        key = f"rob_acc@{e}"
        add(
            f"robust accuracy at ε={e}/255 far above `standard` and not below `pgd_at`",
            numbers(key, dpaat=d, standard=s, pgd_at=p),
            all_of(above(d, s, key), not_below(d, p, key)),
        )
    # a Grad-CAM map too coarse to single out the centre scores every model near the lesions' area
    grids = [_mean(agg, "cam_grid") for agg in (d, s, p) if agg]
    coarse = [g for g in grids if g < CENTRED_GRID]
    for key, label in (("focus_clean", "clean"), ("focus_adv", "adversarial")):
        text = numbers(key, dpaat=d, standard=s, pgd_at=p)
        if coarse:
            text += f"; Grad-CAM map {min(coarse):.0f} cells a side"
        add(
            f"higher lesion-focus score ({label}) than `standard` and `pgd_at`",
            text,
            NOT_TESTABLE if coarse else all_of(above(d, s, key), above(d, p, key)),
        )
    a = aggs.get("amat_external")
    for key, label in (
        ("clean_bacc", "clean balanced accuracy"),
        ("rob_acc@2", "robust accuracy ε=2"),
        ("curve_auc", "curve area (means)"),
    ):
        add(
            "self-computed criterion (`dpaat`) at least as good as the external one "
            f"(`amat_external`): {label}",
            numbers(key, dpaat=d, amat_external=a),
            not_below(d, a, key),
        )
    return items


def _claim_markdown(items: list[dict[str, Any]]) -> str:
    shown = {FAILS: f"**{FAILS}**", UNDECIDED: f"{UNDECIDED} (the intervals overlap)"}
    return _table(
        ["claim", "numbers (percent, 95 % interval)", "on our data"],
        [[i["claim"], i["numbers"], shown.get(i["verdict"], i["verdict"])] for i in items],
    )


# --------------------------------------------------------------------------- plots
def plot_curves(
    aggs: dict[str, dict[str, Any]], results: list[dict[str, Any]], names: list[str], path: Path
) -> None:
    """Robust accuracy vs eps of every method on one plot (mean over seeds, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        rs = [r for r in results if r["unit"] == n]
        if not rs:
            continue
        eps = [float(e) for e in rs[0]["eval"]["eps"]]
        curves = [[_acc_at(r, e) for e in eps] for r in rs]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(eps))]
        ax.plot(
            eps, mean, marker="o", label=f"{n} (n={len(rs)})", linewidth=2 if n == "dpaat" else 1.3
        )
        if len(rs) > 1:
            lo = [min(c[i] for c in curves) for i in range(len(eps))]
            hi = [max(c[i] for c in curves) for i in range(len(eps))]
            ax.fill_between(eps, lo, hi, alpha=0.15)
    ax.set_xlabel("ε (1/255, L∞)")
    ax.set_ylabel("robust accuracy (worst case over attacks)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Robustness curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _acc_at(result: dict[str, Any], eps: float) -> float:
    rep = result["report"]
    if eps == 0:
        return _float(rep["clean"].get("accuracy"))
    return _float(_robust(rep, eps_key(eps)).get("accuracy"))


def plot_training_dynamics(results: list[dict[str, Any]], hist_path: Path, tau_path: Path) -> bool:
    """DPAAT's vital signs from its training history: the eps histogram over epochs, and tau,
    broken fraction and mean eps per epoch (with amat_external and iaat_flip for comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def first(unit: str) -> dict[str, Any] | None:
        rs = sorted((r for r in results if r["unit"] == unit), key=lambda r: r["seed"])
        return rs[0] if rs else None

    dpaat = first("dpaat")
    if dpaat is None or not any("eps_hist" in h for h in dpaat["history"]):
        return False
    hist = [h for h in dpaat["history"] if "eps_hist" in h]
    picks = sorted({0, len(hist) // 2, len(hist) - 1})
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in picks:
        h = hist[i]["eps_hist"]
        edges, counts = h["edges"], h["counts"]
        total = max(1, sum(counts))
        ax.stairs(
            [c / total for c in counts], edges, label=f"epoch {hist[i]['epoch']}", linewidth=1.6
        )
    for other in ("amat_external", "iaat_flip"):
        r = first(other)
        if r is not None and r["history"] and "eps_hist" in r["history"][-1]:
            h = r["history"][-1]["eps_hist"]
            total = max(1, sum(h["counts"]))
            ax.stairs(
                [c / total for c in h["counts"]],
                h["edges"],
                linestyle="--",
                label=f"{other}, last epoch",
            )
    ax.set_xlabel("per-sample training ε (1/255)")
    ax.set_ylabel("share of training samples")
    ax.set_title(f"DPAAT ε distribution (seed {dpaat['seed']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for unit in ("dpaat", "amat_external", "iaat_flip"):
        r = first(unit)
        if r is None:
            continue
        epochs = [h["epoch"] for h in r["history"]]
        for ax, key in zip(axes, ("tau", "broken_frac", "eps_mean"), strict=True):
            vals = [_float(h.get(key)) for h in r["history"]]
            if not all(math.isnan(v) for v in vals):
                ax.plot(epochs, vals, marker=".", label=unit)
    for ax, title in zip(
        axes, ("τ (loss criterion)", "broken fraction", "mean ε (1/255)"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(tau_path, dpi=110)
    plt.close(fig)
    return True


def plot_gradcam_montage(
    exp: Experiment,
    names: list[str],
    path: Path,
    eps: float = 2.0,
    n_images: int = 6,
    log: Log = print,
) -> bool:
    """Grad-CAM of each method (seed of its first result) on the same test images, clean and under
    PGD-20 at ``eps``/255, with the lesion outline from the masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from models.attacks import PGD
    from models.data import load_bundle
    from models.evaluation import grad_cam
    from models.training import load_trained_model

    checkpoints: dict[str, Path] = {}
    for unit in exp.units():
        ckpt = unit_dir(exp, unit) / "checkpoint.pt"
        body = read_result(unit_dir(exp, unit) / RESULT_FILE, unit_hash(exp, unit))[0]
        if (
            unit.name in names
            and unit.name not in checkpoints
            and body is not None
            and ckpt.is_file()
        ):
            checkpoints[unit.name] = ckpt
    if not checkpoints:
        return False
    root = exp.data_root()
    manifest = str(exp.run_dir / "split.json") if root is not None else None
    size = int(exp.train.get("image_size", 64))
    limit = exp.eval.limit if root is not None else exp.train.get("limit")
    test = load_bundle(root, size, manifest, seed=0, limit=limit, parts=("test",)).test
    # one image per class first (melanoma first: it matters most), then fill in test order
    order: list[int] = []
    classes = list(test.classes)
    wanted = ["mel", *[c for c in classes if c != "mel"]] if "mel" in classes else classes
    for c in wanted:
        hits = (test.labels == classes.index(c)).nonzero().flatten().tolist()
        if hits and len(order) < n_images:
            order.append(hits[0])
    order += [i for i in range(len(test)) if i not in order][: n_images - len(order)]
    x = test.images_at(order).float() / 255
    y = test.labels[order]
    masks = test.masks_at(order)

    rows = [n for n in names if n in checkpoints]
    fig, axes = plt.subplots(
        1 + 2 * len(rows),
        len(order),
        figsize=(1.6 * len(order), 1.6 * (1 + 2 * len(rows))),
        squeeze=False,
    )
    for j in range(len(order)):
        _show(axes[0][j], x[j], None, masks[j] if masks is not None else None)
        axes[0][j].set_title(classes[int(y[j])], fontsize=8)
    axes[0][0].set_ylabel("image", fontsize=8)
    for i, name in enumerate(rows):
        model, _ = load_trained_model(checkpoints[name])
        model.eval()
        x_adv = PGD(model, steps=20)(x, y, eps / 255)
        for k, (xs, tag) in enumerate(((x, "clean"), (x_adv, f"PGD ε={eps:g}"))):
            cam = grad_cam(model, xs).detach().cpu()
            with torch.no_grad():
                pred = model(xs).argmax(1)
            for j in range(len(order)):
                ax = axes[1 + 2 * i + k][j]
                _show(ax, xs[j], cam[j], masks[j] if masks is not None else None)
                ok = "✓" if int(pred[j]) == int(y[j]) else "✗"
                ax.set_title(f"{classes[int(pred[j])]} {ok}", fontsize=7)
            axes[1 + 2 * i + k][0].set_ylabel(f"{name}\n{tag}", fontsize=7)
        log(f"grad-cam montage: {name}")
    fig.suptitle("Grad-CAM (predicted class), lesion outline in white", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _show(ax: Any, img: Any, cam: Any, mask: Any) -> None:
    # the same tile as the evaluation's montage (models.plots), from tensors
    from models.plots import show_cam

    show_cam(
        ax,
        img.permute(1, 2, 0).numpy(),
        None if cam is None else cam.numpy(),
        None if mask is None else mask.float().numpy(),
    )


# --------------------------------------------------------------------------- cost
def measure_step_cost(
    exp: Experiment, images: int = 256, rounds: int = 3, log: Log = print
) -> dict[str, float]:
    """Training seconds per image of every compared method, measured side by side: one epoch on
    the same ``images`` training images per method, methods interleaved round by round, the
    minimum over ``rounds`` kept. Wall time per epoch of the real run depends on what else ran on
    the machine at the time; this does not (much)."""
    import tempfile

    from models.data import load_bundle
    from models.training import TrainConfig
    from models.training import train as train_model

    root = exp.data_root()
    manifest = str(exp.run_dir / "split.json") if root is not None else None
    size = int(exp.train.get("image_size", 64))
    bundle = load_bundle(root, size, manifest, seed=0, limit=images, parts=("train", "val"))
    bundle.val = bundle.train  # validation is not what is being timed; keep it small
    best: dict[str, float] = {}
    order = sorted(exp.methods, key=lambda m: m != "standard")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for m in order:
                unit = next(u for u in exp.units() if u.name == m)
                fields = {**unit.settings, "epochs": 1, "data_root": root, "manifest": manifest}
                if m == "amat_external":
                    fields["reference_checkpoint"] = str(
                        Path(tmp) / f"standard-{r}" / "checkpoint.pt"
                    )
                cfg = TrainConfig.from_dict(fields)
                res = train_model(cfg, Path(tmp) / f"{m}-{r}", data=bundle)
                per_image = float(res.history[-1]["train_seconds"]) / len(bundle.train)
                best[m] = min(best.get(m, math.inf), per_image)
            log(
                f"step cost round {r + 1}/{rounds}: "
                + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items())
            )
    return best


def cost_table(cost: dict[str, float], order: list[str]) -> str:
    std = cost.get("standard")
    cost = {m: cost[m] for m in order if m in cost}
    return _table(
        ["method", "training ms per image", "× standard"],
        [[f"`{m}`", f"{v * 1e3:.1f}", f"{v / std:.2f}" if std else "n/a"] for m, v in cost.items()],
    )


# --------------------------------------------------------------------------- README
def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gather_results(
    exp: Experiment, published: Path
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The current result of every unit, in unit order, and the file it came from: the run
    directory's ``result.json``, else the copy published earlier in ``published`` (checked the same
    way: self-check and config hash). Run directories hold checkpoints and are not in git, so a
    summary made on another machine, or after they were cleaned, keeps the published results."""
    results: list[dict[str, Any]] = []
    sources: dict[str, Path] = {}
    for unit in exp.units():
        digest = unit_hash(exp, unit)
        for path in (unit_dir(exp, unit) / RESULT_FILE, published / f"{unit.key}.json"):
            body = read_result(path, digest)[0]
            if body is not None:
                results.append(body)
                sources[unit.key] = path
                break
    return results, sources


def _code(result: dict[str, Any]) -> str:
    return str(result.get("code_sha256", "?"))[:12]


def code_versions(results: list[dict[str, Any]]) -> str:
    """Which code made which result: one line per ML-core fingerprint, oldest first, with the
    units it made; the fingerprint of the code present now is marked."""
    from models.experiment import code_fingerprint

    now = code_fingerprint()[:12]
    by_code: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_code[_code(r)].append(r)
    ordered = sorted(by_code.items(), key=lambda kv: min(str(r.get("finished_at")) for r in kv[1]))
    head = (
        "Code of the ML core (sha256 of the data, nets, attacks, training and evaluation sources, "
        "recorded in each result file as `code_sha256`): "
    )
    if len(ordered) == 1:
        return (
            head
            + f"`{ordered[0][0]}` for every result"
            + (" (the code present now)." if ordered[0][0] == now else ".")
        )
    rows = [
        [
            f"`{code}`" + (" (now)" if code == now else ""),
            f"{min(str(r.get('finished_at')) for r in rs)[:16]} to "
            f"{max(str(r.get('finished_at')) for r in rs)[:16]}",
            ", ".join(f"`{r['unit']}`/{r['seed']}" for r in rs),
        ]
        for code, rs in ordered
    ]
    return (
        head
        + f"**{len(ordered)} versions**: results were made while the code changed.\n\n"
        + _table(["code", "finished (UTC)", "results (unit/seed)"], rows)
    )


def summarize(
    exp: Experiment,
    results_dir: str | Path,
    *,
    gradcam: bool = True,
    cost: bool = False,
    log: Log = print,
) -> Path:
    """Write the published results of ``exp`` into ``results_dir``; return the README path.

    ``cost`` measures the training step cost of each method side by side
    (:func:`measure_step_cost`) into ``step_cost.json``; without it a file from an earlier
    summary is reused."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, sources = gather_results(exp, out / "units")
    planned = exp.units()
    done_keys = {f"{r['unit']}-seed{r['seed']}" for r in results}
    missing = [u.key for u in planned if u.key not in done_keys]

    # only copies of current results: stale ones must not linger (built beside, then swapped in)
    units_dir, fresh = out / "units", out / ".units.new"
    if fresh.exists():
        shutil.rmtree(fresh)
    fresh.mkdir()
    for key, source in sources.items():
        shutil.copyfile(source, fresh / f"{key}.json")
    if units_dir.exists():
        shutil.rmtree(units_dir)
    fresh.rename(units_dir)
    if exp.source is not None:
        shutil.copyfile(exp.source, out / "experiment.toml")
    published = sum(1 for p in sources.values() if p.parent == units_dir)
    if published:
        log(f"results: {published} result(s) kept from {units_dir} (no run directory here)")

    aggs = aggregate(results)
    main = [m for m in exp.methods]
    eps = [eps_key(e) for e in exp.eval.eps if e > 0]
    claims = claim_check(aggs)
    summary = {
        "experiment": exp.name,
        "experiment_sha256": exp.source_sha256,
        "units_done": sorted(done_keys),
        "units_missing": missing,
        "aggregates": aggs,
        "claims": claims,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))

    plots: list[tuple[str, str]] = []
    if results:
        from models.evaluation import plot_curve

        firsts = [
            min((r for r in results if r["unit"] == n), key=lambda r: r["seed"])
            for n in main
            if n in aggs
        ]
        plot_curve(
            [r["report"] for r in firsts],
            out / "curves.png",
            labels=[f"{r['unit']} (seed {r['seed']})" for r in firsts],
        )
        plots.append(
            (
                "Robustness curves of all methods (accuracy solid, balanced accuracy dashed)",
                "curves.png",
            )
        )
        if any(a["n"] > 1 for a in aggs.values()):
            plot_curves(aggs, results, main, out / "curves_seeds.png")
            plots.append(
                ("Robust accuracy, mean over seeds (band: min to max)", "curves_seeds.png")
            )
        if plot_training_dynamics(results, out / "dpaat_eps_hist.png", out / "dpaat_tau.png"):
            plots.append(("DPAAT per-sample ε distribution over training", "dpaat_eps_hist.png"))
            plots.append(("τ, broken fraction and mean ε per epoch", "dpaat_tau.png"))
        montage = out / "gradcam_montage.png"
        if gradcam and plot_gradcam_montage(exp, main, montage, log=log):
            plots.append(("Grad-CAM, clean and adversarial, same test images", montage.name))
        elif montage.is_file():  # the checkpoints are gone (not in git): keep the earlier one
            plots.append(
                (
                    "Grad-CAM, clean and adversarial, same test images (drawn by an earlier "
                    "summary from the main methods' checkpoints)",
                    montage.name,
                )
            )

    first = results[0] if results else None
    lines = [
        f"# Results: experiment `{exp.name}`",
        "",
        "Generated by `dpaat experiment "
        + _shown_path(exp.source)
        + f" --summarize-only --results {_shown_path(out)}` from the result files in `units/` "
        "(copies of "
        f"`{exp.run_dir.name}/<unit>-seed<k>/result.json`, each with a sha256 self-check). "
        "Experiment file: [`experiment.toml`](experiment.toml) "
        f"(sha256 `{exp.source_sha256[:16]}`), "
        f"code at commit `{_git_commit()}` plus the working tree.",
        "",
    ]
    if exp.description:
        lines += ["## What ran", "", exp.description.strip(), ""]
    if first is not None:
        ds = first["report"].get("dataset", {})
        cfg = first["train_config"]
        lines += [
            f"Data: {ds.get('name')} test split, {ds.get('samples')} images (split manifest sha256 "
            f"`{str(ds.get('manifest_sha256'))[:16]}`); {cfg.get('arch')} at "
            f"{cfg.get('image_size')} px, {cfg.get('epochs')} epochs, {cfg.get('optimizer')} "
            f"lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, training PGD-"
            f"{cfg.get('pgd_steps')}, ε_max {cfg.get('eps_max')}/255. "
            f"Machine: {first['machine']['platform']}, {first['machine']['cpus']} CPUs.",
            "",
            "Attacks: " + ", ".join(_attack_text(a) for a in exp.eval.attacks) + ".",
            "",
        ]
        lines += [code_versions(results), ""]
    if missing:
        lines += [
            "## Partial",
            "",
            "Planned but without a valid result when this page was generated: "
            + ", ".join(f"`{k}`" for k in missing)
            + ".",
            "",
        ]
    lines += ["## Comparison", "", main_tables(aggs, main, eps), ""]
    cost_file = out / "step_cost.json"
    if cost:
        write_json_atomic(cost_file, measure_step_cost(exp, log=log))
    if cost_file.is_file():
        lines += [
            "**Training cost measured side by side** (one epoch of 256 training images per "
            "method, methods interleaved, best of 3 rounds, one process; "
            "[`step_cost.json`](step_cost.json)). "
            "The wall times per epoch above come from the real run and move with the load of the "
            "shared machine; these ratios do not.",
            "",
            cost_table(json.loads(cost_file.read_text()), main),
            "",
        ]
    lines += ["## The paper's claim on our data", "", _claim_markdown(claims), ""]
    lines += [
        "Decided by the 95 % intervals, not by tolerances on the means: 'above' (and 'far "
        "above') holds when DPAAT's interval lies wholly above the other's, fails when it lies "
        "wholly below, and is undecided when they overlap; 'close to' / 'not below' fails only "
        "when DPAAT's interval lies wholly below. Over two seeds the interval is the envelope of "
        "the seeds' intervals. Curve area carries no interval and is decided on the means, as "
        "is lesion focus from reports written before it had one. Lesion focus is not testable "
        f"where the Grad-CAM layer's map has fewer than {CENTRED_GRID} cells a side: no cell "
        "is at the image's centre, where dermoscopy puts the lesion, so every model scores about "
        "the lesions' mean area.",
        "",
    ]
    groups = list(dict.fromkeys(v["group"] for v in exp.variants))
    for group in groups:
        members = [v for v in exp.variants if v["group"] == group]
        names = [v["name"] for v in members]
        if not any(n in aggs for n in names):
            continue
        # like with like: the reference methods on the variants' seeds only
        seeds = {s for v in members for s in v["seeds"]}
        ref_aggs = aggregate([r for r in results if r["seed"] in seeds])
        methods = list(dict.fromkeys(v["method"] for v in members))
        rows = [n for m in methods for n in [m, *(v["name"] for v in members if v["method"] == m)]]
        table_aggs = {**{m: ref_aggs[m] for m in methods if m in ref_aggs}, **aggs}
        table_aggs.update({m: ref_aggs[m] for m in methods if m in ref_aggs})
        lines += [
            f"## Variants: {group}",
            "",
            f"Each `{'`/`'.join(methods)}` row is the default run of the comparison on the same "
            f"seed(s) ({', '.join(map(str, sorted(seeds)))}); the other rows change only the "
            "settings shown. The `code` column is the code version that made each row (see the "
            "list of versions above): compare rows of the same version.",
            "",
            variant_table(table_aggs, rows, eps),
            "",
        ]
    for title, name in plots:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    reading = out / "reading.md"
    if reading.is_file():
        lines += ["## Reading", "", reading.read_text().strip(), ""]
    lines += [
        "## Result files",
        "",
        _table(
            ["unit", "result file", "config hash", "code", "finished", "checkpoint sha256"],
            [
                [
                    f"`{r['unit']}` seed {r['seed']}",
                    f"[units/{r['unit']}-seed{r['seed']}.json](units/{r['unit']}-seed{r['seed']}.json)",
                    f"`{r['config_hash'][:12]}`",
                    f"`{_code(r)}`",
                    str(r.get("finished_at", "?")),
                    f"`{r['checkpoint_sha256'][:12]}`",
                ]
                for r in results
            ],
        ),
        "",
    ]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    log(f"results: {readme} ({len(results)} results, {len(missing)} missing)")
    return readme


def _shown_path(path: Path | None) -> str:
    """A path relative to the working directory when it lies below it (no home paths in docs)."""
    if path is None:
        return "<config>"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _attack_text(a: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in a.items() if k != "name")
    return f"{a['name']}" + (f" ({params})" if params else "")
