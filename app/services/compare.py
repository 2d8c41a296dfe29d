"""Reports side by side: finished audits (the report each was judged on) and models' latest
reports, as one table (JSON, Markdown) and one robustness-curve figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.db.tables import Audit, Evaluation, Model
from app.services import audits, models_registry
from app.services.errors import Conflict, Invalid, NotFound

MAX_ITEMS = 8
_METRICS = ("accuracy", "balanced_accuracy", "map", "auroc", "recall", "n", "intervals")


@dataclass(frozen=True)
class Entry:
    label: str
    audit: Audit | None
    model: Model
    evaluation: Evaluation


def resolve(
    session: Session, owner: str, audit_ids: Sequence[str], model_ids: Sequence[str]
) -> list[Entry]:
    """The reports to compare, audits first then models, in the order given; 2 to 8 of them."""
    total = len(audit_ids) + len(model_ids)
    if not 2 <= total <= MAX_ITEMS:
        raise Invalid(f"compare 2 to {MAX_ITEMS} reports (audit=ID / model=ID), got {total}")
    found: list[tuple[Audit | None, Model, Evaluation]] = []
    for audit_id in audit_ids:
        row = audits.get_audit(session, audit_id, owner)
        evaluation = audits.evaluation_of(session, row)
        if row.outcome not in audits.SETTLED or evaluation is None:
            state = "has not finished" if row.outcome == "pending" else "has no report"
            raise Conflict(f"audit {audit_id} {state}")
        found.append((row, models_registry.get_model(session, row.model_id), evaluation))
    for model_id in model_ids:
        model = models_registry.get_model(session, model_id, owner)
        latest = models_registry.latest_evaluation(session, model)
        if latest is None:
            raise NotFound(f"model {model_id} has no evaluation report yet")
        found.append((None, model, latest))
    names = [m.name for _, m, _ in found]
    entries = []
    for audit, model, evaluation in found:
        label = model.name
        if names.count(label) > 1:  # the same model twice, or two models of one name
            label = f"{label} [{(audit.id if audit else evaluation.id)[:8]}]"
        entries.append(Entry(label, audit, model, evaluation))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise Invalid("the same report is named twice")
    return entries


def _metrics(section: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: (section or {}).get(k) for k in _METRICS}


def comparison(entries: Sequence[Entry], curve_url: str) -> dict[str, Any]:
    """The ``Comparison`` JSON: every report's headline numbers, the union of their eps, and
    whether they can be compared number for number (same split, same attacks)."""
    first = entries[0].evaluation.report
    notes: list[str] = []
    for e in entries[1:]:
        reasons = audits.comparability(e.evaluation.report, first)
        notes += [f"{e.label} vs {entries[0].label}: {r}" for r in reasons]
    eps = sorted(
        {
            float(r["eps"])
            for e in entries
            for r in (e.evaluation.report.get("robust") or {}).values()
        }
    )
    items = []
    for e in entries:
        report = e.evaluation.report
        items.append(
            {
                "label": e.label,
                "audit_id": e.audit.id if e.audit else None,
                "model_id": e.model.id,
                "model_name": e.model.name,
                "evaluation_id": e.evaluation.id,
                "passed": e.audit.passed if e.audit else None,
                "verdict": report.get("verdict"),
                "curve_auc": report.get("curve_auc"),
                "clean": _metrics(report.get("clean")),
                "robust": {k: _metrics(v) for k, v in (report.get("robust") or {}).items()},
            }
        )
    return {
        "items": items,
        "eps": eps,
        "comparable": not notes,
        "notes": notes,
        "curve_url": curve_url,
    }
