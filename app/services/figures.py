"""The figures of a model's evaluation, served by the API and linked from the Markdown reports.

- ``robustness_curve``: drawn by the worker with the report (the evaluation's ``plot_uri``);
- ``gradcam_montage``: drawn by the worker (it needs the model and the images), stored as an
  artifact of kind ``report_gradcam``;
- ``class_recall``: drawn here from the stored report;
- ``dpaat_eps_hist`` / ``dpaat_tau``: drawn here from the epoch records of the training job, when
  the model was trained here with a per-sample-radius method.

Figures drawn here come from immutable rows (a report, a finished job's epochs), so each is drawn
once and kept in the job's folder of the artifact store (removed with the job). Drawing uses
:mod:`models.plots` (numpy + matplotlib, no torch), imported on first use so that the web process
starts without matplotlib.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.client import render
from app.db.tables import Artifact, Evaluation, Job, Model
from app.services import jobs
from app.services.errors import NotFound, Unavailable
from app.services.storage import SCHEME, ArtifactMissing, Storage

# name -> caption, in the order the reports show them (shared with the client's Markdown)
FIGURES = render.FIGURES
MONTAGE_KIND = "report_gradcam"
_FINISHED = ("succeeded", "failed", "cancelled")


def file_name(name: str) -> str:
    return f"{name}.png"


def _montage(session: Session, evaluation: Evaluation, model: Model) -> Artifact | None:
    job_id = evaluation.job_id or model.job_id
    if job_id is None:
        return None
    return session.scalars(
        select(Artifact)
        .where(
            Artifact.kind == MONTAGE_KIND,
            Artifact.job_id == job_id,
            Artifact.model_id == model.id,
        )
        .order_by(Artifact.created_at.desc())
        .limit(1)
    ).first()


def training_history(session: Session, model: Model) -> list[dict[str, Any]]:
    """The epoch records of the finished job that trained ``model`` that carry DPAAT's state
    (empty for uploaded models and methods without per-sample radii)."""
    if model.job_id is None:
        return []
    job = session.get(Job, model.job_id)
    if job is None or job.status not in _FINISHED:
        return []
    records = [dict(row.metrics, epoch=row.epoch) for row in jobs.epochs_of(session, job.id)]
    return [r for r in records if isinstance(r.get("eps_hist"), Mapping)]


def available(session: Session, model: Model, evaluation: Evaluation | None) -> list[str]:
    """The figures that exist (or can be drawn) for this model and evaluation, in report order."""
    names: list[str] = []
    if evaluation is not None:
        if evaluation.plot_uri is not None or evaluation.report.get("robust"):
            names.append("robustness_curve")
        if evaluation.report.get("robust") and evaluation.report.get("clean"):
            names.append("class_recall")
        if _montage(session, evaluation, model) is not None:
            names.append("gradcam_montage")
    if training_history(session, model):
        names += ["dpaat_eps_hist", "dpaat_tau"]
    return names


def _existing(store: Storage, uri: str, what: str) -> Path:
    try:
        return store.local_path(uri)
    except ArtifactMissing as e:
        raise Unavailable(f"the {what} is missing from the artifact store") from e


def _cached(store: Storage, job_id: str | None, key: str, draw: Callable[[Path], Any]) -> Path:
    """The PNG drawn by ``draw(path)``, kept under ``jobs/<job_id>/figures/<key>.png``. Concurrent
    first requests may both draw; each publishes its own whole file (atomic either way)."""
    folder = store.temp_dir()
    target = folder / f"{key}.png"
    if job_id is None:  # nowhere to keep it: draw into a private folder (rare: no job at all)
        draw(target)
        return target
    uri = SCHEME + f"jobs/{job_id}/figures/{key}.png"
    try:
        if store.exists(uri):
            return store.local_path(uri)
        draw(target)
        ref = store.publish(target, f"jobs/{job_id}/figures/{key}.png")
        return store.local_path(ref.uri, ref.sha256)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def path_of(
    session: Session,
    store: Storage,
    name: str,
    model: Model,
    evaluation: Evaluation | None,
) -> Path:
    """The PNG file of figure ``name`` (NotFound when this model/evaluation has no such figure)."""
    if name not in FIGURES:
        raise NotFound(f"no figure named {name!r}; figures are {', '.join(FIGURES)}")
    if name not in available(session, model, evaluation):
        raise NotFound(f"figure {name!r} does not exist for this report")
    from models import plots

    if name in ("dpaat_eps_hist", "dpaat_tau"):
        history = training_history(session, model)
        draw_history = (
            plots.plot_eps_histogram if name == "dpaat_eps_hist" else plots.plot_tau_history
        )
        return _cached(store, model.job_id, name, lambda p: draw_history(history, p))
    assert evaluation is not None  # available() lists evaluation figures only with one
    job_id = evaluation.job_id or model.job_id
    report = evaluation.report
    if name == "robustness_curve":
        if evaluation.plot_uri is not None:
            return _existing(store, evaluation.plot_uri, "robustness curve")
        return _cached(
            store, job_id, f"{evaluation.id}-{name}", lambda p: plots.plot_curve(report, p)
        )
    if name == "class_recall":
        return _cached(
            store, job_id, f"{evaluation.id}-{name}", lambda p: plots.plot_class_recall(report, p)
        )
    montage = _montage(session, evaluation, model)
    assert montage is not None
    return _existing(store, montage.uri, "Grad-CAM montage")


def curve_png(store: Storage, reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> bytes:
    """The robustness curves of several reports on one PNG (drawn per request: any combination
    of reports can be asked for)."""
    from models import plots

    folder = store.temp_dir()
    try:
        path = folder / "curve.png"
        plots.plot_curve(list(reports), path, labels=list(labels))
        return path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def links(base: str, names: Sequence[str]) -> dict[str, str]:
    """``{name: "<base>/<name>.png"}`` for Markdown reports and API responses."""
    return {name: f"{base}/{file_name(name)}" for name in names}


def model_markdown(stored: str, base: str, names: Sequence[str]) -> str:
    """A stored model report (``report.md``, figures linked by file name) with every figure
    linked by its API URL under ``base``, and the figures it did not show appended."""
    text = stored
    shown = []
    for name in names:
        local = f"]({file_name(name)})"
        if local in text:
            text = text.replace(local, f"]({base}/{file_name(name)})")
            shown.append(name)
    rest = [n for n in names if n not in shown]
    if rest:
        text = text.rstrip("\n") + "\n\n## More figures\n"
        for name in rest:
            text += f"\n![{FIGURES[name]}]({base}/{file_name(name)})\n"
    return text
