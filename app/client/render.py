"""Renderings of an audit document (``audit.json``: the evaluation report plus its ``audit``
section) for CI: JUnit XML (one test case per threshold and per regression rule) and a Markdown
summary fit for a pull-request comment. Standard library only: the server and the torch-free
client render with the same code."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

SUITE = "dpaat-audit"
# The figures of a report (PNG name without ".png" -> caption), in the order reports show them.
FIGURES: dict[str, str] = {
    "robustness_curve": "Robustness curve",
    "class_recall": "Recall per class and eps",
    "gradcam_montage": "Grad-CAM, clean vs adversarial",
    "dpaat_eps_hist": "DPAAT per-sample eps during training",
    "dpaat_tau": "DPAAT tau history during training",
}


def _num(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "–"
    return str(v)


def _ci(section: Mapping[str, Any], key: str) -> str:
    """``value [low, high]`` when the report has the metric's 95 % interval, else the value; a
    ``recall.<class>`` key reads the class's recall."""
    if key.startswith("recall."):
        cls = key.removeprefix("recall.")
        value = (section.get("recall") or {}).get(cls)
        iv = ((section.get("intervals") or {}).get("recall") or {}).get(cls) or {}
    else:
        value = section.get(key)
        iv = (section.get("intervals") or {}).get(key) or {}
    if value is None or iv.get("low") is None:
        return _num(value)
    return f"{_num(value)} [{_num(iv['low'])}, {_num(iv['high'])}]"


def cases(doc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(kind, result)`` of every rule: the thresholds, then the regression rules."""
    audit = doc.get("audit") or {}
    return [("thresholds", r) for r in audit.get("thresholds", [])] + [
        ("regression", r) for r in audit.get("regression", [])
    ]


def failure_message(kind: str, r: Mapping[str, Any]) -> str:
    """``observed 0.312 < required 0.400`` style message of a failed case."""
    if kind == "regression":
        head = (
            f"observed {_num(r.get('observed'), 4)}, baseline {_num(r.get('baseline'), 4)}, "
            f"required >= {_num(r.get('required'), 4)}"
        )
    else:
        op = {">=": "<", "<=": ">", "==": "!=", "!=": "=="}.get(str(r.get("op")), "vs")
        head = f"observed {_num(r.get('observed'), 4)} {op} required {_num(r.get('required'), 4)}"
    detail = str(r.get("detail") or "")
    # the detail only adds something when it explains a missing value or an incomparable baseline
    redundant = detail.startswith(("observed", "dropped"))
    return f"{head} ({detail})" if detail and not redundant else head


def junit_xml(doc: Mapping[str, Any]) -> str:
    """JUnit XML: a ``testsuites`` root with one ``testsuite``; each threshold and regression rule
    is a ``testcase`` whose ``failure`` message gives the observed and the required value."""
    rules = cases(doc)
    failures = sum(1 for _, r in rules if not r.get("passed"))
    seconds = _num(float((doc.get("timings") or {}).get("total_s") or 0.0), 3)
    root = ET.Element(
        "testsuites", name=SUITE, tests=str(len(rules)), failures=str(failures), errors="0"
    )
    suite = ET.SubElement(
        root,
        "testsuite",
        name=SUITE,
        tests=str(len(rules)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=seconds,
    )
    props = ET.SubElement(suite, "properties")
    audit = doc.get("audit") or {}
    model, data = doc.get("model") or {}, doc.get("dataset") or {}
    for name, value in (
        ("audit_id", audit.get("id")),
        ("model_id", audit.get("model_id")),
        ("checkpoint_sha256", model.get("checkpoint_sha256")),
        ("dataset", data.get("name")),
        ("manifest_sha256", data.get("manifest_sha256")),
        ("verdict", doc.get("verdict")),
    ):
        ET.SubElement(props, "property", name=name, value=str(value))
    for kind, r in rules:
        case = ET.SubElement(
            suite, "testcase", classname=f"dpaat.audit.{kind}", name=str(r["name"]), time="0"
        )
        if not r.get("passed"):
            message = failure_message(kind, r)
            failure = ET.SubElement(case, "failure", message=message, type=f"{kind}_not_met")
            failure.text = f"{r['name']}: {message}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def error_junit(message: str, kind: str = "evaluation_error") -> str:
    """JUnit XML for an audit that produced no report (its job failed or was cancelled, or the
    client timed out waiting: ``kind`` "timeout")."""
    root = ET.Element("testsuites", name=SUITE, tests="1", failures="0", errors="1")
    suite = ET.SubElement(
        root, "testsuite", name=SUITE, tests="1", failures="0", errors="1", skipped="0", time="0"
    )
    case = ET.SubElement(suite, "testcase", classname="dpaat.audit", name="evaluation", time="0")
    ET.SubElement(case, "error", message=message, type=kind).text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _mark(passed: Any) -> str:
    return "✅ pass" if passed else "❌ FAIL"


def markdown(
    doc: Mapping[str, Any], plot: str | None = None, figures: Mapping[str, str] | None = None
) -> str:
    """A pull-request comment: the outcome, every threshold and regression rule with its observed
    and required value, and the robustness curve's numbers (``plot``: the curve image's link;
    ``figures``: figure name -> link of the other figures, shown at the end)."""
    audit = doc.get("audit") or {}
    model, data = doc.get("model") or {}, doc.get("dataset") or {}
    passed = bool(audit.get("passed"))
    classes = list(model.get("classes") or [])
    lines = [
        f"## {'✅' if passed else '❌'} Robustness audit {'passed' if passed else 'FAILED'}",
        "",
        f"Model `{model.get('architecture')}` ({model.get('method') or 'uploaded'}, sha256 "
        f"`{str(model.get('checkpoint_sha256'))[:12]}`) on {data.get('name')} "
        f"({data.get('split')}, {data.get('samples')} images) · validity checks: "
        f"**{str(doc.get('verdict')).upper()}** · curve area {_num(doc.get('curve_auc'))} · "
        f"audit `{audit.get('id')}`",
        "",
        "### Thresholds",
        "",
        *_table(
            ["rule", "observed", "required", "result"],
            [
                [
                    r["name"],
                    _num(r.get("observed")),
                    f"{r['op']} {_num(r.get('required'))}",
                    _mark(r.get("passed")),
                ]
                for r in audit.get("thresholds", [])
            ],
        ),
    ]
    regression = audit.get("regression") or []
    if regression:
        base = audit.get("baseline") or {}
        lines += [
            "",
            f"### Regression against audit `{base.get('audit_id')}` "
            f"(max drop {_num(base.get('max_drop'))})",
            "",
            *_table(
                ["metric", "baseline", "observed", "required", "result"],
                [
                    [
                        r["name"].split(" ")[0],
                        _num(r.get("baseline")),
                        _num(r.get("observed")),
                        f">= {_num(r.get('required'))}",
                        _mark(r.get("passed")),
                    ]
                    for r in regression
                ],
            ),
        ]
        notes = sorted({r["detail"] for r in regression if r.get("detail")})
        lines += ["", *[f"- {n}" for n in notes]] if notes else []
    robust = doc.get("robust") or {}
    rows = sorted(robust.values(), key=lambda r: float(r.get("eps", 0)))
    mel = "mel" in classes
    header = ["eps (1/255)", "accuracy", "balanced accuracy", "mAP"]
    header += ["mel recall"] if mel else []
    lines += ["", "### Robustness curve (worst case over the attacks)", ""]
    lines += _table(
        header,
        [
            [f"{float(r['eps']):g}", _ci(r, "accuracy"), _ci(r, "balanced_accuracy")]
            + [_ci(r, "map")]
            + ([_ci(r, "recall.mel")] if mel else [])
            for r in rows
        ],
    )
    lines += ["", "<sub>In brackets: 95 % intervals (Wilson; bootstrap for balanced accuracy "
              "and mAP).</sub>"]  # fmt: skip
    if plot:
        lines += ["", f"![Robustness curve]({plot})"]
    failing = [c for c in doc.get("checks") or [] if c.get("status") != "pass"]
    if failing:
        lines += ["", "### Validity checks not passing", ""]
        lines += _table(
            ["check", "status", "detail"],
            [[c.get("name"), str(c.get("status")).upper(), c.get("detail")] for c in failing],
        )
    others = {k: v for k, v in (figures or {}).items() if k != "robustness_curve"}
    if others:
        lines += ["", "### Figures"]
        for name, link in others.items():
            lines += ["", f"![{FIGURES.get(name, name)}]({link})"]
    threat = doc.get("threat_model") or {}
    attacks = ", ".join(str(a.get("label", a.get("name"))) for a in threat.get("attacks", []))
    lines += ["", f"<sub>Threat model: L-inf, attacks {attacks}; eps in 1/255 units.</sub>"]
    return "\n".join(lines) + "\n"


def comparison_markdown(doc: Mapping[str, Any], curve: str | None = None) -> str:
    """Reports side by side (a ``Comparison`` JSON): one column per report, one row per metric
    (clean, then each eps), and the combined robustness curve (``curve``: its link)."""
    items = list(doc.get("items") or [])
    header = ["metric", *[str(i.get("label")) for i in items]]

    def outcome(i: Mapping[str, Any]) -> str:
        return "–" if i.get("passed") is None else _mark(i.get("passed"))

    rows: list[list[Any]] = [
        ["audit", *[f"`{i['audit_id'][:8]}`" if i.get("audit_id") else "–" for i in items]],
        ["outcome", *[outcome(i) for i in items]],
        ["validity checks", *[str(i.get("verdict")).upper() for i in items]],
        ["curve area", *[_num(i.get("curve_auc")) for i in items]],
        ["clean accuracy", *[_ci(i.get("clean") or {}, "accuracy") for i in items]],
        ["clean balanced accuracy",
         *[_ci(i.get("clean") or {}, "balanced_accuracy") for i in items]],
    ]  # fmt: skip
    mel = all("mel" in ((i.get("clean") or {}).get("recall") or {}) for i in items)
    for eps in doc.get("eps") or []:
        if float(eps) == 0:
            continue
        key = f"{float(eps):g}"
        robust = [(i.get("robust") or {}).get(key) or {} for i in items]
        rows.append([f"accuracy @ {key}/255", *[_ci(r, "accuracy") for r in robust]])
        rows.append(
            [f"balanced accuracy @ {key}/255", *[_ci(r, "balanced_accuracy") for r in robust]]
        )
        if mel:
            rows.append([f"mel recall @ {key}/255", *[_ci(r, "recall.mel") for r in robust]])
    lines = [f"## Robustness comparison of {len(items)} reports", "", *_table(header, rows)]
    notes = list(doc.get("notes") or [])
    if notes:
        lines += ["", "**Not comparable number for number:**", "", *[f"- {n}" for n in notes]]
    if curve:
        lines += ["", f"![Robustness curves]({curve})"]
    lines += ["", "<sub>Worst case over each report's attacks; eps in 1/255 units.</sub>"]
    return "\n".join(lines) + "\n"
