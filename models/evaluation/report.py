"""Renderings of an evaluation report: JSON (no NaN: undefined values are null), Markdown with the
robustness curve embedded, and the curve itself as a PNG (drawn by :mod:`models.plots`, which needs
no torch, so the web process draws the same figures)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.evaluation.gradcam import CENTRED_GRID
from models.plots import plot_curve

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


def write_report(
    report: Mapping[str, Any], out_dir: str | Path, figures: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and ``robustness_curve.png`` into ``out_dir``; returns
    their paths by kind (``json``, ``markdown``, ``plot``). ``figures`` (caption -> file name in
    ``out_dir``, e.g. the Grad-CAM montage) are shown at the end of the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / PLOT_NAME}
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False)
    _atomic_write(paths["json"], text.encode())
    tmp_plot = out / f".{PLOT_NAME}.tmp.png"
    plot_curve(report, tmp_plot)
    os.replace(tmp_plot, paths["plot"])
    _atomic_write(paths["markdown"], render_markdown(report, PLOT_NAME, figures).encode())
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- markdown
def _f(v: Any, digits: int = 3) -> str:
    """A number for a table; undefined values show as an en dash."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool | int) or not isinstance(v, float):
        return str(v)
    return f"{v:.{digits}f}"


def _ci(m: Mapping[str, Any], key: str) -> str:
    """``value [low, high]``: the metric with its 95 % interval when the report has one (reports
    written before intervals existed show the value alone)."""
    value = m.get(key)
    iv = (m.get("intervals") or {}).get(key) or {}
    if iv.get("low") is None or value is None:
        return _f(value)
    return f"{_f(value)} [{_f(iv['low'])}, {_f(iv['high'])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(
    report: Mapping[str, Any],
    plot_name: str | None = PLOT_NAME,
    figures: Mapping[str, str] | None = None,
) -> str:
    """The report as Markdown: summary, per-class recall, per-attack accuracy, validity checks,
    lesion focus, threat model, versions and timings; the curve image linked by relative path,
    and ``figures`` (caption -> link) in a last section."""
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
        row = [name, _ci(m, "accuracy"), _ci(m, "balanced_accuracy"), _ci(m, "map"), _f(m["auroc"])]
        mel_iv = {"intervals": (m.get("intervals") or {}).get("recall", {})}
        table_rows.append(row + ([_ci({**m["recall"], **mel_iv}, "mel")] if mel else []))
    lines += _table(header, table_rows)
    lines += [
        "",
        f"In brackets: 95 % intervals over the {data.get('samples')} samples (Wilson for accuracy "
        "and recall, a seeded class-stratified bootstrap for balanced accuracy and mAP).",
    ]
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

    attack_labels = list(tm.get("order") or [a.get("label", a.get("name")) for a in tm["attacks"]])
    lines += ["", "## Accuracy per attack", ""]
    if tm.get("cascade"):
        lines += [
            "Cascaded (AutoAttack's design): each attack ran only on the samples still robust "
            "after the ones to its left, so each column is the robust accuracy so far.",
            "",
        ]
    lines += _table(
        ["eps (1/255)", *attack_labels, "worst case"],
        [
            [f"{r['eps']:g}"]
            + [_f(r["per_attack"][a]["accuracy"]) for a in attack_labels]
            + [_ci(r, "accuracy")]
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
        grid = focus.get("cam_grid")
        lines += _table(
            ["clean", f"adversarial ({eps_txt})", "uniform map", "Grad-CAM map", "samples"],
            [
                [
                    _ci(focus, "clean"),
                    _ci(focus, "adversarial"),
                    _f(focus.get("uniform_map")),
                    f"{grid[0]} x {grid[1]}" if grid else "–",
                    focus.get("samples"),
                ]
            ],
        )
        lines += [
            "",
            f"Maps of the {focus.get('explained_class')} class. A map spread evenly scores the "
            "lesions' mean area (uniform map): a focus near it does not localise the lesion. The "
            "Grad-CAM map is the size of the explained layer's own map, before upsampling; one "
            f"under {CENTRED_GRID} x {CENTRED_GRID} has no cell at the image's centre, where "
            "dermoscopy puts the lesion.",
        ]

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
    if figures:
        lines += ["", "## Figures"]
        for caption, link in figures.items():
            lines += ["", f"![{caption}]({link})"]
    return "\n".join(lines) + "\n"
