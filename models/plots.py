"""The report's figures, drawn from numbers and arrays only (numpy + matplotlib, no torch), so the
web process can draw them from a stored report without importing torch: the robustness curve (one
or several models), per-class robust recall (classes x eps), DPAAT's eps histogram and tau history
from a training run's epoch records, and the Grad-CAM montage (from maps computed elsewhere).

Each function draws on matplotlib's Agg canvas (``Figure``, never pyplot: no global backend state,
safe in worker and request threads), writes a PNG and returns what it drew, read back from the
artists, so callers and tests see what is on the picture rather than what was meant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float, dpi: int = 110) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> None:
    fig.savefig(str(path), format="png")


def _eps_rows(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return sorted(report["robust"].values(), key=lambda r: float(r["eps"]))


# --------------------------------------------------------------------------- robustness curve
def model_label(report: Mapping[str, Any], index: int = 0) -> str:
    model = report.get("model") or {}
    parts = [str(v) for v in (model.get("architecture"), model.get("method")) if v]
    return " ".join(parts) or f"model {index + 1}"


def plot_curve(
    reports: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | Path,
    labels: Sequence[str] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Robust accuracy (solid) and balanced accuracy (dashed) vs eps of one or several reports on
    one PNG, each point labelled with its value. Returns what was drawn, read back from the plotted
    lines: ``{label: {"eps", "accuracy", "balanced_accuracy"}}``."""
    items = [reports] if isinstance(reports, Mapping) else list(reports)
    if not items:
        raise ValueError("no report to plot")
    if labels is None:
        labels = [model_label(r, i) for i, r in enumerate(items)]
    if len(labels) != len(items):
        raise ValueError(f"{len(labels)} labels for {len(items)} reports")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {list(labels)}")
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    drawn: dict[str, dict[str, list[float]]] = {}
    for i, (report, label) in enumerate(zip(items, labels, strict=True)):
        colour = f"C{i % 10}"
        rows = _eps_rows(report)
        eps = [float(r["eps"]) for r in rows]
        acc = [float(r["accuracy"]) for r in rows]
        keep = [
            (e, float(r["balanced_accuracy"]))
            for e, r in zip(eps, rows, strict=True)
            if r.get("balanced_accuracy") is not None
        ]
        (acc_line,) = ax.plot(eps, acc, "o-", color=colour, label=f"{label}: accuracy")
        (bacc_line,) = ax.plot(
            [e for e, _ in keep], [b for _, b in keep], "s--", color=colour,
            alpha=0.8, label=f"{label}: balanced accuracy",
        )  # fmt: skip
        for line, dy in ((acc_line, 6), (bacc_line, -12)):
            xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
            for xv, yv in zip(xs, ys, strict=True):
                ax.annotate(
                    f"{yv:.2f}", (xv, yv), textcoords="offset points", xytext=(0, dy),
                    ha="center", fontsize=7, color=colour,
                )  # fmt: skip
        drawn[label] = {
            "eps": np.asarray(acc_line.get_xdata(), float).tolist(),
            "accuracy": np.asarray(acc_line.get_ydata(), float).tolist(),
            "balanced_accuracy": np.asarray(bacc_line.get_ydata(), float).tolist(),
        }
    ax.set_xlabel("L-inf epsilon (1/255)")
    ax.set_ylabel("worst-case robust accuracy")
    ax.set_ylim(-0.05, 1.08)
    ax.grid(alpha=0.3)
    ax.set_title("Robustness curve")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _save(fig, path)
    return drawn


# --------------------------------------------------------------------------- per-class recall
def plot_class_recall(report: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """Heat map of each class's recall (rows) clean and at every eps (columns), worst case over
    the attacks, each cell labelled with its value; an undefined recall is a grey cell. Returns
    ``{"classes", "columns", "recall"}`` with the matrix read back from the image (None = grey)."""
    classes = [str(c) for c in (report.get("model") or {}).get("classes") or []]
    if not classes:
        raise ValueError("the report names no classes")
    rows = [r for r in _eps_rows(report) if float(r["eps"]) > 0]
    columns = ["clean", *[f"{float(r['eps']):g}" for r in rows]]
    sections = [report["clean"], *rows]
    values = np.array(
        [[_finite((s.get("recall") or {}).get(c)) for s in sections] for c in classes],
        dtype=float,
    )
    fig = _figure(max(4.5, 1.0 + 0.75 * len(columns)), max(2.6, 1.2 + 0.42 * len(classes)))
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn"].with_extremes(bad="#cccccc")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(classes)):
        for j in range(len(columns)):
            v = values[i, j]
            text = "–" if math.isnan(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(columns)), [c if c == "clean" else f"{c}/255" for c in columns])
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("L-inf epsilon (worst case over the attacks)")
    ax.set_title("Recall per class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    _save(fig, path)
    shown = np.ma.filled(np.ma.masked_invalid(np.asarray(image.get_array(), float)), np.nan)
    return {
        "classes": classes,
        "columns": columns,
        "recall": [[None if math.isnan(v) else float(v) for v in row] for row in shown],
    }


def _finite(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return math.nan
    return float(v)


# --------------------------------------------------------------------------- DPAAT training
def dpaat_history(epochs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The epoch records of a training run that carry DPAAT's state (an eps histogram)."""
    return [e for e in epochs if isinstance(e.get("eps_hist"), Mapping)]


def plot_eps_histogram(epochs: Sequence[Mapping[str, Any]], path: str | Path) -> dict[str, Any]:
    """The distribution of the per-sample training radii at the first, middle and last epoch
    (share of the training samples per bin). Returns ``{"epochs", "edges", "shares"}`` as drawn."""
    history = dpaat_history(epochs)
    if not history:
        raise ValueError("no epoch record has an eps histogram (not a DPAAT run)")
    picks = sorted({0, len(history) // 2, len(history) - 1})
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    drawn: dict[str, Any] = {"epochs": [], "edges": [], "shares": []}
    for i in picks:
        h = history[i]["eps_hist"]
        counts = [float(c) for c in h["counts"]]
        total = max(1.0, sum(counts))
        art = ax.stairs(
            [c / total for c in counts],
            [float(e) for e in h["edges"]],
            label=f"epoch {history[i].get('epoch', i + 1)}",
            linewidth=1.6,
        )
        values, edges, _baseline = art.get_data()
        drawn["epochs"].append(int(history[i].get("epoch", i + 1)))
        drawn["edges"].append(np.asarray(edges, float).tolist())
        drawn["shares"].append(np.asarray(values, float).tolist())
    ax.set_xlabel("per-sample training epsilon (1/255)")
    ax.set_ylabel("share of training samples")
    ax.set_title("DPAAT epsilon distribution")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return drawn


def plot_tau_history(epochs: Sequence[Mapping[str, Any]], path: str | Path) -> dict[str, Any]:
    """DPAAT's vital signs per epoch: tau (the loss criterion), the broken fraction and the mean
    radius. Returns ``{"epoch", "tau", "broken_frac", "eps_mean"}`` read back from the lines
    (NaN where an epoch had no value, e.g. tau before the first estimate)."""
    history = dpaat_history(epochs)
    if not history:
        raise ValueError("no epoch record has an eps histogram (not a DPAAT run)")
    fig = _figure(11, 3.4)
    axes = fig.subplots(1, 3)
    drawn: dict[str, Any] = {}
    xs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    titles = {"tau": "tau (loss criterion)", "broken_frac": "broken fraction",
              "eps_mean": "mean epsilon (1/255)"}  # fmt: skip
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        (line,) = ax.plot(xs, [_finite(h.get(key)) for h in history], "o-", markersize=3)
        drawn["epoch"] = np.asarray(line.get_xdata(), float).tolist()
        drawn[key] = np.asarray(line.get_ydata(), float).tolist()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle("DPAAT training history", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return drawn


# --------------------------------------------------------------------------- Grad-CAM montage
def show_cam(ax: Axes, image: np.ndarray, cam: np.ndarray | None, mask: np.ndarray | None) -> None:
    """One tile: the image (H, W, 3 in [0, 1]), its Grad-CAM map over it, the lesion outline."""
    ax.imshow(np.clip(image, 0.0, 1.0))
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if mask is not None and bool(np.asarray(mask).any()):
        ax.contour(np.asarray(mask, float), levels=[0.5], colors="white", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_montage(
    images: np.ndarray,
    titles: Sequence[str],
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[str]]],
    path: str | Path,
    masks: np.ndarray | None = None,
    title: str = "Grad-CAM (predicted class)",
    dpi: int = 100,
) -> dict[str, Any]:
    """A grid: the images on top (``titles``: their true classes), then one row per entry of
    ``rows`` = ``(row label, inputs (N, H, W, 3), cams (N, H, W), tile titles)`` with the map over
    the input and the lesion outline when ``masks`` (N, H, W) are given. Returns the grid size and
    whether outlines were drawn."""
    n = len(images)
    if n == 0:
        raise ValueError("no image for the montage")
    fig = _figure(1.6 * n + 0.4, 1.6 * (1 + len(rows)) + 0.3, dpi=dpi)
    axes = fig.subplots(1 + len(rows), n, squeeze=False)
    for j in range(n):
        show_cam(axes[0][j], images[j], None, masks[j] if masks is not None else None)
        axes[0][j].set_title(titles[j], fontsize=8)
    axes[0][0].set_ylabel("image", fontsize=8)
    for i, (label, inputs, cams, tile_titles) in enumerate(rows):
        for j in range(n):
            ax = axes[1 + i][j]
            show_cam(ax, inputs[j], cams[j], masks[j] if masks is not None else None)
            ax.set_title(tile_titles[j], fontsize=7)
        axes[1 + i][0].set_ylabel(label, fontsize=7)
    outline = ", lesion outline in white" if masks is not None else ""
    fig.suptitle(f"{title}{outline}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, path)
    return {"rows": 1 + len(rows), "columns": n, "outlines": masks is not None}
