"""A RobustBench-style ranking of one owner's models: each model's latest report on one dataset
and threat model, ranked by robust balanced accuracy at a chosen eps (clean balanced accuracy
breaks ties). Reports on other datasets or attacks are not comparable and are left out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from app.services import models_registry
from app.services.audits import eps_key

MAX_MODELS = 200


def threat_label(report: Mapping[str, Any]) -> str:
    """``fgsm + pgd-20 (Linf)``: the attacks of a report and their norm, as one label."""
    tm = report.get("threat_model") or {}
    attacks = [str(a.get("label") or a.get("name")) for a in tm.get("attacks") or []]
    return f"{' + '.join(attacks) or '?'} ({tm.get('norm', 'Linf')})"


@dataclass(frozen=True)
class Row:
    rank: int
    model_id: str
    model_name: str
    method: str | None
    robust_bacc: float | None
    clean_bacc: float | None
    clean_map: float | None
    verdict: str | None
    evaluated_at: datetime


@dataclass(frozen=True)
class Board:
    dataset_id: str | None
    threat: str | None
    eps: float | None
    rows: list[Row]
    datasets: list[str]  # dataset ids the owner has reports on
    threats: list[str]  # threat models seen on the chosen dataset
    eps_choices: list[float]  # radii shared by the chosen reports


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def board(
    session: Session,
    owner: str,
    *,
    dataset_id: str | None = None,
    threat: str | None = None,
    eps: float | None = None,
) -> Board:
    """The ranking; missing choices default to the most common dataset, threat model and the
    largest radius every chosen report has."""
    models, _ = models_registry.list_models(session, owner, limit=MAX_MODELS)
    latest = []  # (model, its latest report, the dataset the report is on)
    for model in models:
        evaluation = models_registry.latest_evaluation(session, model)
        # An evaluation without a dataset of its own ran on the model's training dataset.
        on = evaluation and (evaluation.dataset_id or model.dataset_id)
        if evaluation is not None and on:
            latest.append((model, evaluation, on))
    datasets = sorted({d for _, _, d in latest})
    if dataset_id is None and latest:
        ids = [d for _, _, d in latest]
        dataset_id = max(datasets, key=ids.count)
    on_dataset = [(m, e) for m, e, d in latest if d == dataset_id]
    threats = sorted({threat_label(e.report) for _, e in on_dataset})
    if threat not in threats:
        labels = [threat_label(e.report) for _, e in on_dataset]
        threat = max(threats, key=labels.count) if threats else None
    chosen = [(m, e) for m, e in on_dataset if threat_label(e.report) == threat]
    shared: set[float] | None = None
    for _, e in chosen:
        radii = {float(r["eps"]) for r in (e.report.get("robust") or {}).values()}
        shared = radii if shared is None else shared & radii
    eps_choices = sorted(shared or set())
    if eps is None or eps not in eps_choices:
        eps = eps_choices[-1] if eps_choices else None
    scored = []
    for model, e in chosen:
        clean = e.report.get("clean") or {}
        robust = (e.report.get("robust") or {}).get(eps_key(eps)) if eps is not None else None
        scored.append(
            (
                _num((robust or {}).get("balanced_accuracy")),
                _num(clean.get("balanced_accuracy")),
                _num(clean.get("map")),
                model,
                e,
            )
        )
    scored.sort(key=lambda s: (-(s[0] if s[0] is not None else -1), -(s[1] or 0)))
    rows = [
        Row(
            rank=i + 1,
            model_id=m.id,
            model_name=m.name,
            method=m.training_method,
            robust_bacc=r,
            clean_bacc=c,
            clean_map=p,
            verdict=e.verdict,
            evaluated_at=e.created_at,
        )
        for i, (r, c, p, m, e) in enumerate(scored)
    ]
    return Board(dataset_id, threat, eps, rows, datasets, threats, eps_choices)
