"""Renderings of an evaluation report: JSON (no NaN: undefined values are null), Markdown with the
robustness curve embedded, and the curve itself as a PNG (matplotlib's Agg canvas, no pyplot, so no
global backend state and safe in worker threads)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PLOT_NAME = "robustness_curve.png"


def to_jsonable(obj: Any) -> Any:
    """A copy made of dicts (string keys), lists, str, int, float, bool and None only; NaN and
    infinity become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and ``robustness_curve.png`` into ``out_dir``; returns
    their paths by kind (``json``, ``markdown``, ``plot``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / PLOT_NAME}
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False)
    _atomic_write(paths["json"], text.encode())
    tmp_plot = out / f".{PLOT_NAME}.tmp.png"
    plot_curve(report, tmp_plot)
    os.replace(tmp_plot, paths["plot"])
    _atomic_write(paths["markdown"], render_markdown(report, PLOT_NAME).encode())
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- plot
def _curve_points(report: Mapping[str, Any]) -> tuple[list[float], list[float], list[float | None]]:
    rows = sorted(report["robust"].values(), key=lambda r: r["eps"])
    return (
        [float(r["eps"]) for r in rows],
        [float(r["accuracy"]) for r in rows],
        [r.get("balanced_accuracy") for r in rows],
    )


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
        labels = [
            " ".join(
                str(v) for v in (r["model"].get("architecture"), r["model"].get("method")) if v
            )
            or f"model {i + 1}"
            for i, r in enumerate(items)
        ]
    if len(labels) != len(items):
        raise ValueError(f"{len(labels)} labels for {len(items)} reports")
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn: dict[str, dict[str, list[float]]] = {}
    colours = [f"C{i % 10}" for i in range(len(items))]
    for report, label, colour in zip(items, labels, colours, strict=True):
        eps, acc, bacc = _curve_points(report)
        (acc_line,) = ax.plot(eps, acc, "o-", color=colour, label=f"{label}: accuracy")
        keep = [(e, b) for e, b in zip(eps, bacc, strict=True) if b is not None]
        (bacc_line,) = ax.plot(
            [e for e, _ in keep], [float(b) for _, b in keep], "s--", color=colour,
            alpha=0.8, label=f"{label}: balanced accuracy",
        )  # fmt: skip
        for line, dy in ((acc_line, 6), (bacc_line, -12)):
            xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
            for xv, yv in zip(xs, ys, strict=True):
                ax.annotate(
                    f"{yv:.2f}", (xv, yv), textcoords="offset points", xytext=(0, dy),
                    ha="center", fontsize=7, color=colour,
                )  # fmt: skip
        # read back from the lines, so callers (and tests) see what was drawn, not what was meant
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
    fig.savefig(str(path), format="png")
    return drawn


# --------------------------------------------------------------------------- markdown
def _f(v: Any, digits: int = 3) -> str:
    """A number for a table; undefined values show as an en dash."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool | int) or not isinstance(v, float):
        return str(v)
    return f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: Mapping[str, Any], plot_name: str | None = PLOT_NAME) -> str:
    """The report as Markdown: summary, per-class recall, per-attack accuracy, validity checks,
    lesion focus, threat model, versions and timings; the curve image linked by relative path."""
    model, data, tm = report["model"], report["dataset"], report["threat_model"]
    classes: list[str] = list(model["classes"])
    rows = sorted(report["robust"].values(), key=lambda r: r["eps"])
    mel = "mel" in classes
    lines = [
        f"# Robustness evaluation: {model.get('architecture')} on {data.get('name')} "
        f"({data.get('split')})",
        "",
        f"**Verdict: {report['verdict'].upper()}**  ·  normalised curve area "
        f"{_f(report.get('curve_auc'))}  ·  {data.get('samples')} samples",
        "",
        f"- Model: {_f(model.get('architecture'))}, method {_f(model.get('method'))}, input "
        f"{_f(model.get('input_size'))} px, checkpoint sha256 {_f(model.get('checkpoint_sha256'))}",
        f"- Dataset: {_f(data.get('name'))}, split {_f(data.get('split'))}, manifest sha256 "
        f"{_f(data.get('manifest_sha256'))}",
        "",
        "## Summary",
        "",
    ]
    header = ["eps (1/255)", "accuracy", "balanced accuracy", "mAP", "AUROC"]
    header += ["melanoma recall"] if mel else []
    table_rows = []
    for name, m in [("clean", report["clean"])] + [
        (f"{r['eps']:g}", r) for r in rows if r["eps"] > 0
    ]:
        row = [name, _f(m["accuracy"]), _f(m["balanced_accuracy"]), _f(m["map"]), _f(m["auroc"])]
        table_rows.append(row + ([_f(m["recall"].get("mel"))] if mel else []))
    lines += _table(header, table_rows)
    excluded = report["clean"].get("auroc_excluded") or []
    if excluded:
        lines += ["", f"AUROC leaves out classes with a single label value: {', '.join(excluded)}."]
    if plot_name:
        lines += ["", f"![Robustness curve]({plot_name})"]

    lines += ["", "## Per-class recall", ""]
    header = ["class", "support", "clean"] + [f"{r['eps']:g}/255" for r in rows if r["eps"] > 0]
    support = report["clean"].get("support", {})
    lines += _table(
        header,
        [
            [c, support.get(c, "–"), _f(report["clean"]["recall"].get(c))]
            + [_f(r["recall"].get(c)) for r in rows if r["eps"] > 0]
            for c in classes
        ],
    )

    attack_labels = [a.get("label", a.get("name")) for a in tm["attacks"]]
    lines += ["", "## Accuracy per attack", ""]
    lines += _table(
        ["eps (1/255)", *attack_labels, "worst case"],
        [
            [f"{r['eps']:g}"]
            + [_f(r["per_attack"][a]["accuracy"]) for a in attack_labels]
            + [_f(r["accuracy"])]
            for r in rows
        ],
    )

    lines += ["", f"## Validity checks: {report['verdict']}", ""]
    lines += _table(
        ["check", "status", "detail"],
        [[c["name"], c["status"].upper(), c["detail"]] for c in report["checks"]],
    )

    lines += ["", "## Lesion focus (Grad-CAM mass inside the lesion mask)", ""]
    focus = report.get("lesion_focus")
    if focus is None:
        lines.append("Not computed: the dataset has no lesion masks, or Grad-CAM was off.")
    else:
        eps_txt = f"{focus['eps']:g}/255" if focus.get("eps") is not None else "–"
        lines += _table(
            ["clean", f"adversarial ({eps_txt})", "explained class", "samples"],
            [
                [
                    _f(focus["clean"]),
                    _f(focus["adversarial"]),
                    focus.get("explained_class"),
                    focus.get("samples"),
                ]
            ],
        )

    lines += ["", "## Threat model", ""]
    lines.append(
        f"Norm {tm['norm']}, eps {', '.join(f'{e:g}' for e in tm['eps'])} "
        f"(units {tm['eps_unit']}); robust metric: {tm.get('robust_metric', 'worst case')}."
    )
    lines += [
        "",
        *_table(
            ["attack", "parameters"],
            [
                [
                    a.get("label", a.get("name")),
                    ", ".join(f"{k}={v}" for k, v in a.items() if k != "label") or "–",
                ]
                for a in tm["attacks"]
            ],
        ),
    ]

    lines += ["", "## Versions and timings", ""]
    lines += _table(["component", "version"], [[k, v] for k, v in report["versions"].items()])
    t = report["timings"]
    lines += [
        "",
        *_table(
            ["stage", "seconds"],
            [
                ["total", _f(t["total_s"], 1)],
                ["clean", _f(t["clean_s"], 1)],
                ["Grad-CAM", _f(t["gradcam_s"], 1)],
            ]
            + [[f"attack {a}", _f(s, 1)] for a, s in t["attacks_s"].items()]
            + [["checks", _f(t["checks_s"], 1)]],
        ),
    ]
    return "\n".join(lines) + "\n"
