"""CI audits: an evaluation job plus thresholds, optionally compared with a baseline audit.

An audit is created with its evaluation job (``submissions.submit_evaluate``) and is *settled* the
first time it is read after the job has finished: the thresholds and the regression rules are
evaluated against the stored report and the outcome is written once, with a conditional UPDATE
(``WHERE outcome = 'pending'``). Reports are immutable, so every later read gives the same verdict;
the worker knows nothing about audits.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.tables import Artifact, Audit, Evaluation, Job, JobStatus, Model, utcnow
from app.services import jobs, models_registry, submissions
from app.services.errors import Conflict, Invalid, NotFound
from app.services.storage import Storage
from app.services.submissions import Dispatcher

# Observed values are means over a test set: a float error must not fail "0.4 >= 0.4".
_TOLERANCE = 1e-9
_VERDICT_RANK = {"pass": 0, "warn": 1, "fail": 2}
SETTLED = ("passed", "failed")


def eps_key(eps: float) -> str:
    """The key of an eps in ``report["robust"]`` (same format as ``models.evaluation``, which
    this module must not import: it brings torch)."""
    return f"{float(eps):g}"


def threshold_name(t: Mapping[str, Any]) -> str:
    """``accuracy@2 >= 0.4`` / ``balanced_accuracy >= 0.6`` / ``verdict != fail``."""
    where = "" if t.get("eps") is None else f"@{float(t['eps']):g}"
    value = t["value"] if isinstance(t["value"], str) else f"{float(t['value']):g}"
    return f"{t['metric']}{where} {t['op']} {value}" + (
        " (95% bound)" if t.get("use_interval") else ""
    )


# ---------------------------------------------------------------------------- rules
def observed_value(report: Mapping[str, Any], metric: str, eps: float | None) -> Any:
    """The report's value of ``metric`` (clean when ``eps`` is None); None when it has none."""
    if metric == "verdict":
        return report.get("verdict")
    if metric == "curve_auc":
        return report.get("curve_auc")
    section = report.get("clean") if eps is None else (report.get("robust") or {}).get(eps_key(eps))
    if not isinstance(section, Mapping):
        return None
    if metric.startswith("recall."):
        return (section.get("recall") or {}).get(metric.removeprefix("recall."))
    return section.get(metric)


def observed_interval(
    report: Mapping[str, Any], metric: str, eps: float | None
) -> Mapping[str, Any] | None:
    """The report's 95 % interval of ``metric`` ({n, low, high, method}); None when it has none
    (reports made before intervals existed)."""
    section = report.get("clean") if eps is None else (report.get("robust") or {}).get(eps_key(eps))
    intervals = section.get("intervals") if isinstance(section, Mapping) else None
    if not isinstance(intervals, Mapping):
        return None
    if metric.startswith("recall."):
        found = (intervals.get("recall") or {}).get(metric.removeprefix("recall."))
    else:
        found = intervals.get(metric)
    return found if isinstance(found, Mapping) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def evaluate_thresholds(
    report: Mapping[str, Any], thresholds: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One result per threshold: name, observed, required, passed (and why, when it failed)."""
    results = []
    for t in thresholds:
        metric, eps, op, required = t["metric"], t.get("eps"), t["op"], t["value"]
        raw = observed_value(report, metric, eps)
        interval = observed_interval(report, metric, eps) if metric != "verdict" else None
        if t.get("use_interval"):  # the conservative end: lower bound for >=, upper for <=
            raw = (interval or {}).get("low" if op == ">=" else "high")
        detail = ""
        if metric == "verdict":
            observed: Any = raw if raw in _VERDICT_RANK else None
            passed = observed is not None and ((observed == required) == (op == "=="))
        else:
            observed = _number(raw)
            if observed is None:
                passed = False
            elif op == ">=":
                passed = observed >= float(required) - _TOLERANCE
            else:
                passed = observed <= float(required) + _TOLERANCE
        bound = "95% interval bound " if t.get("use_interval") else ""
        if observed is None:
            where = "clean" if eps is None else f"eps {float(eps):g}"
            detail = f"the report has no {bound or 'value '}of {metric} ({where})"
        elif not passed:
            detail = f"observed {bound}{_show(observed)}, required {op} {_show(required)}"
        results.append(
            {
                "name": threshold_name(t),
                "metric": metric,
                "eps": eps,
                "op": op,
                "required": required,
                "observed": observed,
                "passed": passed,
                "detail": detail,
                "interval": dict(interval) if interval else None,
            }
        )
    return results


def _show(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def comparability(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """Why two reports cannot be compared metric by metric (empty when they can): another split
    of another dataset, or another attack set (robust accuracy is a worst case over attacks)."""
    reasons = []
    for key in ("manifest_sha256", "split"):
        mine, theirs = (
            (report.get("dataset") or {}).get(key),
            (baseline.get("dataset") or {}).get(key),
        )
        if mine != theirs:
            reasons.append(f"dataset {key} differs ({theirs} in the baseline, {mine} here)")
    attacks = [(r.get("threat_model") or {}).get("attacks") for r in (report, baseline)]
    if attacks[0] != attacks[1]:
        reasons.append("the baseline was attacked with other attacks or parameters")
    return reasons


def evaluate_regression(
    report: Mapping[str, Any],
    baseline_report: Mapping[str, Any] | None,
    thresholds: Sequence[Mapping[str, Any]],
    max_drop: float,
) -> list[dict[str, Any]]:
    """For every numeric threshold metric (each metric and eps once): the value must not drop
    more than ``max_drop`` below the baseline's. Every metric here is higher-is-better. A baseline
    that cannot be compared fails every rule (a gate must not pass on numbers it cannot check)."""
    reasons = (
        ["the baseline's report no longer exists"]
        if baseline_report is None
        else comparability(report, baseline_report)
    )
    seen: set[tuple[str, float | None]] = set()
    results = []
    for t in thresholds:
        metric, eps = t["metric"], t.get("eps")
        if metric == "verdict" or (metric, eps) in seen:
            continue
        seen.add((metric, eps))
        mine = _number(observed_value(report, metric, eps))
        base = (
            _number(observed_value(baseline_report, metric, eps))
            if baseline_report is not None
            else None
        )
        required = None if base is None else base - max_drop
        where = "" if eps is None else f"@{float(eps):g}"
        detail, passed = "; ".join(reasons), False
        if detail:
            pass
        elif mine is None or base is None or required is None:
            detail = (
                f"no value of {metric}{where} in the {'report' if mine is None else 'baseline'}"
            )
        elif mine >= required - _TOLERANCE:
            passed = True
        else:
            detail = f"dropped {base - mine:.4f} below the baseline's {base:.4f} (max {max_drop:g})"
        results.append(
            {
                "name": f"{metric}{where} no worse than baseline - {max_drop:g}",
                "metric": metric,
                "eps": eps,
                "baseline": base,
                "observed": mine,
                "required": required,
                "passed": passed,
                "detail": detail,
            }
        )
    return results


# ---------------------------------------------------------------------------- creating
def _canonical(body: Mapping[str, Any]) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(json.dumps(dict(body), sort_keys=True))
    return value


def _by_key(session: Session, owner: str, key: str) -> Audit | None:
    return session.scalars(
        select(Audit).where(Audit.owner == owner, Audit.idempotency_key == key)
    ).one_or_none()


def _replay(audit: Audit, body: dict[str, Any]) -> Audit:
    if audit.request != body:
        raise Conflict(
            "this Idempotency-Key was already used for a different audit; "
            "use a new key for a new audit"
        )
    return audit


def _check_recall_classes(thresholds: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> None:
    unknown = [
        t["metric"]
        for t in thresholds
        if t["metric"].startswith("recall.") and t["metric"].removeprefix("recall.") not in classes
    ]
    if unknown:
        raise Invalid(
            f"{', '.join(unknown)}: no such class; the model's classes are {list(classes)}"
        )


def create_audit(
    session: Session,
    dispatcher: Dispatcher,
    *,
    owner: str,
    request: Mapping[str, Any],
    evaluation_params: Mapping[str, Any],
    idempotency_key: str | None,
    max_active_jobs: int = 0,
) -> tuple[Audit, bool]:
    """Create an audit and its evaluation job; ``(audit, created)``. ``request`` is a validated
    ``AuditRequest`` as JSON. A retried request (same owner and key) gets its audit back."""
    body = _canonical(request)
    if idempotency_key is not None and (found := _by_key(session, owner, idempotency_key)):
        return _replay(found, body), False
    model = models_registry.get_model(session, body["model_id"], owner)
    _check_recall_classes(body["thresholds"], model.classes)
    baseline = _resolve_baseline(session, owner, body.get("baseline"))
    return _insert(
        session,
        dispatcher,
        owner,
        body,
        model.id,
        baseline,
        evaluation_params,
        idempotency_key,
        max_active_jobs,
    )


def create_audit_with_upload(
    session: Session,
    store: Storage,
    dispatcher: Dispatcher,
    *,
    owner: str,
    request: Mapping[str, Any],
    evaluation_params: Mapping[str, Any],
    description: Mapping[str, Any],
    weights: BinaryIO,
    max_bytes: int,
    idempotency_key: str | None,
    max_active_jobs: int = 0,
) -> tuple[Audit, bool]:
    """Register an uploaded model (safetensors + description, checked as ``POST /models``
    checks them) and audit it, in one request. ``request`` is a validated ``AuditSpec``. Every
    check (file, architecture, classes, dataset, baseline) runs before anything is registered;
    when one fails, nothing is kept. The model belongs to ``owner`` like any upload. A retry with
    the same Idempotency-Key and the same file gets its audit back (no second model)."""
    from app.services import datasets

    ref = store.put_stream(
        weights, models_registry.weights_suffix(description), max_bytes=max_bytes
    )
    model: Model | None = None
    try:
        upload = {"sha256": ref.sha256, "size": ref.size, "description": dict(description)}
        body = _canonical({**request, "upload": upload})
        if idempotency_key is not None and (found := _by_key(session, owner, idempotency_key)):
            store.delete(ref.uri)
            return _replay(found, body), False
        classes = [str(c) for c in description["classes"]]
        summary = models_registry.check_weights(store, ref, description)
        _check_recall_classes(body["thresholds"], classes)
        if not body.get("dataset_id"):
            raise Invalid("an uploaded model records no training data: give a dataset_id")
        dataset = datasets.get_dataset(session, body["dataset_id"], owner)
        if list(dataset.classes) != classes:
            raise Invalid(
                f"the dataset's classes {dataset.classes} differ from the model's {classes}"
            )
        baseline = _resolve_baseline(session, owner, body.get("baseline"))
        model = models_registry.register_uploaded_model(
            session, owner=owner, ref=ref, description={**description, **summary}
        )
        params = {**evaluation_params, "model_id": model.id}
        audit, created = _insert(
            session,
            dispatcher,
            owner,
            body,
            model.id,
            baseline,
            params,
            idempotency_key,
            max_active_jobs,
        )
        if not created:  # a concurrent retry with this key won: it has its own model
            raise _Superseded(audit)
        return audit, created
    except _Superseded as won:
        _forget_upload(session, store, model, ref.uri)
        return won.audit, False
    except BaseException:
        _forget_upload(session, store, model, ref.uri)
        raise


class _Superseded(Exception):
    def __init__(self, audit: Audit) -> None:
        self.audit = audit


def _forget_upload(session: Session, store: Storage, model: Model | None, uri: str) -> None:
    """Undo a half-made upload: the model row and its artifact row (if registered) and the file."""
    session.rollback()
    if model is not None:
        session.execute(delete(Artifact).where(Artifact.model_id == model.id))
        session.execute(delete(Model).where(Model.id == model.id))
        session.commit()
    store.delete(uri)


def _insert(
    session: Session,
    dispatcher: Dispatcher,
    owner: str,
    body: dict[str, Any],
    model_id: str,
    baseline: dict[str, Any] | None,
    evaluation_params: Mapping[str, Any],
    idempotency_key: str | None,
    max_active_jobs: int = 0,
) -> tuple[Audit, bool]:
    """Queue the evaluation job, then the audit row."""
    # The job's key is derived from the audit's (a retry after a crash between the two inserts
    # finds its job again) and hashed, so it can never equal a key a client sends for a job.
    job_key = (
        f"audit:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
        if idempotency_key is not None
        else None
    )
    job, _ = submissions.submit_evaluate(
        session,
        dispatcher,
        owner=owner,
        params=dict(evaluation_params),
        idempotency_key=job_key,
        max_active_jobs=max_active_jobs,
    )
    audit = Audit(
        owner=owner,
        model_id=model_id,
        dataset_id=body.get("dataset_id"),
        job_id=job.id,
        request=body,
        thresholds=body["thresholds"],
        baseline=baseline,
        idempotency_key=idempotency_key,
        outcome="pending",
    )
    session.add(audit)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # a concurrent request with the same key won the insert
        found = _by_key(session, owner, idempotency_key) if idempotency_key else None
        if found is None:
            raise
        return _replay(found, body), False
    return audit, True


def _resolve_baseline(
    session: Session, owner: str, spec: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Pin the baseline to one finished audit now, so the comparison never moves afterwards."""
    if spec is None:
        return None
    if spec.get("audit_id"):
        base = get_audit(session, spec["audit_id"], owner)
        if base.outcome == "pending":
            raise Conflict(f"baseline audit {base.id} has not finished yet")
        if base.outcome == "error":
            raise Invalid(f"baseline audit {base.id} has no report (its evaluation job failed)")
    else:
        name = spec["model_name"]
        models = select(Model.id).where(Model.owner == owner, Model.name == name)
        for pending in session.scalars(
            select(Audit).where(Audit.model_id.in_(models), Audit.outcome == "pending")
        ).all():
            refresh(session, pending)
        found = session.scalars(
            select(Audit)
            .where(Audit.model_id.in_(models), Audit.outcome == "passed")
            .order_by(Audit.finished_at.desc(), Audit.id)
            .limit(1)
        ).first()
        if found is None:
            raise Invalid(f"no passing audit of a model named {name!r}")
        base = found
    return {"requested": dict(spec), "audit_id": base.id, "max_drop": float(spec["max_drop"])}


# ---------------------------------------------------------------------------- reading
def get_audit(session: Session, audit_id: str, owner: str | None = None) -> Audit:
    """The audit (of this owner when given), settled if its job has finished; else NotFound."""
    audit = session.get(Audit, audit_id, populate_existing=True)
    if audit is None or (owner is not None and audit.owner != owner):
        raise NotFound(f"audit {audit_id} not found")
    return refresh(session, audit)


def list_audits(
    session: Session, owner: str, *, model_id: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[Audit], int]:
    """A page of the owner's audits (of one model when given), newest first, and their total."""
    conditions = [Audit.owner == owner]
    if model_id is not None:
        conditions.append(Audit.model_id == model_id)
    total = session.scalar(select(func.count()).select_from(Audit).where(*conditions)) or 0
    rows = session.scalars(
        select(Audit)
        .where(*conditions)
        .order_by(Audit.created_at.desc(), Audit.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return [refresh(session, a) for a in rows], int(total)


def job_of(session: Session, audit: Audit) -> Job | None:
    return session.get(Job, audit.job_id, populate_existing=True) if audit.job_id else None


def evaluation_of(session: Session, audit: Audit) -> Evaluation | None:
    """The report the audit was judged on (None until settled, or when it ended in error)."""
    evaluation_id = (audit.result or {}).get("evaluation_id")
    return session.get(Evaluation, evaluation_id) if evaluation_id else None


def refresh(session: Session, audit: Audit) -> Audit:
    """Settle a pending audit whose job has finished (idempotent; the first writer wins)."""
    if audit.outcome != "pending":
        return audit
    job = job_of(session, audit)
    if job is not None and not jobs.is_final(job.status):
        return audit
    if job is None or job.status != JobStatus.succeeded:
        status = job.status if job is not None else "deleted"
        result: dict[str, Any] = {
            "status": status,
            "error": job.error if job is not None else "the evaluation job no longer exists",
        }
        outcome, passed = "error", None
    else:
        evaluation = session.scalars(
            select(Evaluation).where(Evaluation.job_id == job.id)
        ).one_or_none()
        if evaluation is None:
            result = {"status": job.status, "error": "the evaluation job stored no report"}
            outcome, passed = "error", None
        else:
            result = judge(session, audit, evaluation)
            passed = result["passed"]
            outcome = "passed" if passed else "failed"
    # When another request settled it first, this UPDATE changes nothing and we read its result.
    session.execute(
        update(Audit)
        .where(Audit.id == audit.id, Audit.outcome == "pending")
        .values(outcome=outcome, passed=passed, result=result, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(audit)
    return audit


def judge(session: Session, audit: Audit, evaluation: Evaluation) -> dict[str, Any]:
    """Threshold and regression results of ``audit`` on ``evaluation``'s report."""
    report = evaluation.report
    thresholds = evaluate_thresholds(report, audit.thresholds)
    regression: list[dict[str, Any]] = []
    baseline_info: dict[str, Any] | None = None
    if audit.baseline is not None:
        base = session.get(Audit, audit.baseline["audit_id"])
        base_eval = evaluation_of(session, base) if base is not None else None
        regression = evaluate_regression(
            report,
            base_eval.report if base_eval is not None else None,
            audit.thresholds,
            float(audit.baseline["max_drop"]),
        )
        baseline_info = {
            **audit.baseline,
            "model_id": base.model_id if base is not None else None,
            "evaluation_id": base_eval.id if base_eval is not None else None,
        }
    return {
        "status": JobStatus.succeeded.value,
        "evaluation_id": evaluation.id,
        "verdict": report.get("verdict"),
        "thresholds": thresholds,
        "regression": regression,
        "baseline": baseline_info,
        "passed": all(r["passed"] for r in thresholds + regression),
    }


def document(session: Session, audit: Audit) -> dict[str, Any]:
    """``audit.json``: the evaluation report (the contract of docs/dpaat.md) with an ``audit``
    section holding the thresholds, their results and the regression results."""
    evaluation = evaluation_of(session, audit)
    if audit.outcome not in SETTLED or evaluation is None:
        if audit.outcome == "error":
            result = audit.result or {}
            error = f": {result['error']}" if result.get("error") else ""
            raise Conflict(
                f"audit {audit.id} has no report: its evaluation job ended {result.get('status')}"
                f"{error}"
            )
        raise Conflict(f"audit {audit.id} has not finished yet")
    result = audit.result or {}
    return {
        **evaluation.report,
        "audit": {
            "id": audit.id,
            "model_id": audit.model_id,
            "dataset_id": audit.dataset_id,
            "job_id": audit.job_id,
            "evaluation_id": evaluation.id,
            "passed": audit.passed,
            "outcome": audit.outcome,
            "thresholds": result.get("thresholds", []),
            "regression": result.get("regression", []),
            "baseline": result.get("baseline"),
            "created_at": audit.created_at.isoformat(),
            "finished_at": audit.finished_at.isoformat() if audit.finished_at else None,
        },
    }
