"""The job state machine. Every transition is one conditional ``UPDATE ... WHERE status IN (...)``
so that two workers, a worker and the reaper, or a task delivered twice can never both win.

::

    queued --claim--> running --finish--> succeeded
      |                  |  \\--fail-----> failed
      |                  |   \\--lease expired--> queued (retries+1) | failed (retries exhausted)
      |                  \\--request_cancel--> cancel_requested --mark_cancelled--> cancelled
      \\--request_cancel------------------------------------------------------------> cancelled

Every function commits its own transaction (a transition is visible to other processes when the
function returns), so call them with a session that holds no other pending work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from app.db.tables import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    Job,
    JobEpoch,
    JobKind,
    JobStatus,
    utcnow,
)
from app.services.errors import Conflict, Invalid, NotFound

# What ``heartbeat`` returns to a worker that no longer holds the job (its lease expired and the
# job was re-queued or taken by another worker): the worker must stop without writing anything.
LEASE_LOST = "lease_lost"
_HELD = (JobStatus.running, JobStatus.cancel_requested)
_MAX_ERROR_CHARS = 20_000


def _update(
    session: Session,
    job_id: str,
    allowed: Iterable[str],
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """``UPDATE jobs SET values WHERE id = job_id AND status IN allowed AND where``; commits and
    says whether a row changed."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_([str(s) for s in allowed]), *where)
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    result = cast(CursorResult[Any], session.execute(stmt))
    session.commit()
    return result.rowcount == 1


def _fresh(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


# ---------------------------------------------------------------------------- creating, reading
def submit_job(
    session: Session,
    *,
    owner: str,
    kind: str,
    params: Mapping[str, Any],
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Create a queued job, or return the job an earlier submit with the same idempotency key made.

    Returns ``(job, created)``. The same owner and key with different ``params`` raise ``Conflict``.
    ``params["dataset_id"]`` / ``params["model_id"]``, when present, are also stored as columns.
    """
    if kind not in {k.value for k in JobKind}:
        raise Invalid(f"unknown job kind {kind!r}")
    body: dict[str, Any] = json.loads(json.dumps(dict(params)))  # stored as JSON: compare so
    if idempotency_key is not None:
        existing = _by_key(session, owner, idempotency_key)
        if existing is not None:
            return _same_request(existing, kind, body), False
    job = Job(
        owner=owner,
        kind=kind,
        status=JobStatus.queued,
        params=body,
        progress={},
        idempotency_key=idempotency_key,
        dataset_id=body.get("dataset_id"),
        model_id=body.get("model_id"),
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent submit with the same key won the insert: answer with its job.
        session.rollback()
        existing = _by_key(session, owner, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_request(existing, kind, body), False
    return job, True


def existing_for_key(
    session: Session, *, owner: str, key: str, kind: str, params: Mapping[str, Any]
) -> Job | None:
    """The job an earlier submit with this owner and idempotency key created, if any;
    ``Conflict`` when that submit asked for something else."""
    job = _by_key(session, owner, key)
    if job is None:
        return None
    return _same_request(job, kind, json.loads(json.dumps(dict(params))))


def _by_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.owner == owner, Job.idempotency_key == key)
    ).one_or_none()


def _same_request(job: Job, kind: str, params: dict[str, Any]) -> Job:
    if job.kind != kind or job.params != params:
        raise Conflict(
            "this Idempotency-Key was already used for a different request; "
            "use a new key for a new job"
        )
    return job


def create_job(
    session: Session,
    *,
    owner: str,
    kind: str,
    params: Mapping[str, Any],
    idempotency_key: str | None = None,
) -> Job:
    """Create a queued job (see :func:`submit_job`, which also says whether it was new)."""
    return submit_job(
        session, owner=owner, kind=kind, params=params, idempotency_key=idempotency_key
    )[0]


def get_job(session: Session, job_id: str, owner: str | None = None) -> Job:
    """The job with this id (of this owner when given); ``NotFound`` otherwise."""
    job = _fresh(session, job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise NotFound(f"job {job_id} not found")
    return job


def get_job_with_epochs(session: Session, job_id: str, owner: str) -> Job:
    """The owner's job with its epochs (``job.epochs``, in order) loaded by the same statement: a
    job's status is polled, and one statement is one round trip and one snapshot (a read-only
    session may run each statement in its own transaction)."""
    job = (
        session.scalars(
            select(Job)
            .where(Job.id == job_id, Job.owner == owner)  # another owner's epochs are not read
            .options(joinedload(Job.epochs))
            .execution_options(populate_existing=True)
        )
        .unique()
        .one_or_none()
    )
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    owner: str,
    *,
    status: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """A page of the owner's jobs, newest first, and the total matching the filters."""
    conditions = [Job.owner == owner]
    if status is not None:
        conditions.append(Job.status == status)
    if kind is not None:
        conditions.append(Job.kind == kind)
    total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    rows = session.scalars(
        select(Job)
        .where(*conditions)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), int(total)


def counts_by_status(session: Session) -> dict[str, int]:
    """Number of jobs in each status (every status present, zeros included)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = {s.value: 0 for s in JobStatus}
    counts.update({str(status): int(n) for status, n in rows})
    return counts


def epochs_of(session: Session, job_id: str) -> list[JobEpoch]:
    """The recorded epochs of a job, in order."""
    return list(
        session.scalars(
            select(JobEpoch).where(JobEpoch.job_id == job_id).order_by(JobEpoch.epoch)
        ).all()
    )


# ---------------------------------------------------------------------------- worker transitions
def claim_job(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> Job | None:
    """queued -> running for ``worker_id`` with a lease; None when the job is not claimable
    (already claimed, finished, cancelled or unknown)."""
    now = utcnow()
    claimed = _update(
        session,
        job_id,
        [JobStatus.queued],
        status=JobStatus.running,
        worker_id=worker_id,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        started_at=func.coalesce(Job.started_at, now),
    )
    return _fresh(session, job_id) if claimed else None


def heartbeat(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> str:
    """Extend the lease while ``worker_id`` holds the job; returns the job's status
    (``running`` or ``cancel_requested``), or :data:`LEASE_LOST` when the worker no longer holds
    it (re-queued after an expired lease, taken by another worker, finished, or deleted)."""
    extended = _update(
        session,
        job_id,
        _HELD,
        lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
        where=(Job.worker_id == worker_id,),
    )
    if not extended:
        return LEASE_LOST
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return str(status) if status is not None else LEASE_LOST


def record_progress(session: Session, job_id: str, progress: Mapping[str, Any]) -> bool:
    """Replace the job's progress (epoch, step, metrics...) while it runs. The caller bounds the
    rate (a few writes a second at most)."""
    return _update(session, job_id, _HELD, progress=dict(progress))


def record_epoch(session: Session, job_id: str, epoch: int, metrics: Mapping[str, Any]) -> None:
    """Store one epoch's metrics; recording an epoch again (a resumed run) replaces it."""
    row = session.scalars(
        select(JobEpoch).where(JobEpoch.job_id == job_id, JobEpoch.epoch == epoch)
    ).one_or_none()
    if row is None:
        session.add(JobEpoch(job_id=job_id, epoch=epoch, metrics=dict(metrics)))
    else:
        row.metrics = dict(metrics)
        row.created_at = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def finish_job(session: Session, job_id: str, worker_id: str, result: Mapping[str, Any]) -> bool:
    """running (or cancel_requested: the work completed first) -> succeeded with ``result``."""
    return _update(
        session,
        job_id,
        _HELD,
        status=JobStatus.succeeded,
        result=dict(result),
        finished_at=utcnow(),
        lease_expires_at=None,
        where=(Job.worker_id == worker_id,),
    )


def fail_job(session: Session, job_id: str, worker_id: str, error: str) -> bool:
    """running or cancel_requested -> failed with a message for the client."""
    return _update(
        session,
        job_id,
        _HELD,
        status=JobStatus.failed,
        error=str(error)[:_MAX_ERROR_CHARS],
        finished_at=utcnow(),
        lease_expires_at=None,
        where=(Job.worker_id == worker_id,),
    )


def mark_cancelled(session: Session, job_id: str, worker_id: str) -> bool:
    """The worker stopped on request: running or cancel_requested -> cancelled."""
    return _update(
        session,
        job_id,
        _HELD,
        status=JobStatus.cancelled,
        finished_at=utcnow(),
        lease_expires_at=None,
        where=(Job.worker_id == worker_id,),
    )


# ---------------------------------------------------------------------------- client transitions
def request_cancel(session: Session, job_id: str, owner: str) -> Job:
    """Cancel a job: queued -> cancelled at once (no worker holds it); running -> cancel_requested
    (the worker stops between steps). Idempotent for cancel_requested/cancelled; ``Conflict`` for a
    job that already succeeded or failed."""
    get_job(session, job_id, owner)
    now = utcnow()
    if _update(
        session,
        job_id,
        [JobStatus.queued],
        status=JobStatus.cancelled,
        finished_at=now,
        lease_expires_at=None,
    ) or _update(session, job_id, [JobStatus.running], status=JobStatus.cancel_requested):
        return get_job(session, job_id, owner)
    job = get_job(session, job_id, owner)
    if job.status in (JobStatus.cancel_requested, JobStatus.cancelled):
        return job
    raise Conflict(f"job {job_id} already {job.status}; it cannot be cancelled")


# ---------------------------------------------------------------------------- recovery
def reap(
    session: Session,
    *,
    now: datetime | None = None,
    max_retries: int,
    stale_queued_seconds: float,
    confirm_seconds: float = 0.0,
) -> list[tuple[str, str]]:
    """Recover jobs whose worker died or whose message was lost; returns ``(job_id, kind)`` of
    every job the caller must send to the queue again.

    - running with an expired lease: back to queued with ``retries + 1`` (the new worker resumes
      from the last checkpoint), or failed once ``retries`` reached ``max_retries``;
    - cancel_requested with an expired lease: cancelled (nobody is left to stop);
    - with ``confirm_seconds`` > 0, an expired lease is first only marked (``progress.lost_worker``
      with ``suspected``: the job shows it at once) and extended by ``confirm_seconds``; it is
      re-queued when it expires again with no heartbeat in between (a heartbeat renews the lease
      and the worker's next progress write clears the mark). ``progress.lost_worker`` keeps the
      worker, when its lease expired, when that was noticed and when the job was re-queued;
    - queued and not sent for ``stale_queued_seconds``: sent again (its ``enqueued_at`` is reset so
      the next reap does not resend it at once).
    """
    now = now or utcnow()
    resend: list[tuple[str, str]] = []
    expired = session.execute(
        select(
            Job.id, Job.kind, Job.status, Job.retries, Job.lease_expires_at, Job.worker_id,
            Job.progress,
        ).where(Job.status.in_([s.value for s in _HELD]), Job.lease_expires_at < now)
    ).all()  # fmt: skip
    for job_id, kind, status, retries, lease, worker, progress in expired:
        same_lease = (Job.lease_expires_at == lease,)  # a heartbeat in between wins
        lost = {"worker": worker, "lease_expired_at": _iso(lease), "noticed_at": _iso(now)}
        suspected = bool(((progress or {}).get("lost_worker") or {}).get("suspected"))
        if confirm_seconds > 0 and not suspected:
            # First sight: show it on the job at once, and give the worker one more chance to
            # beat. A database outage stops every heartbeat, and a live worker beats again
            # within a heartbeat of the database coming back; a dead one stays silent.
            _update(
                session,
                job_id,
                [status],
                lease_expires_at=now + timedelta(seconds=confirm_seconds),
                progress={**(progress or {}), "lost_worker": {**lost, "suspected": True}},
                where=same_lease,
            )
            continue
        if suspected:  # keep when it was first noticed
            lost = {**progress["lost_worker"]}
        lost = {**lost, "suspected": False, "requeued_at": _iso(now)}
        if status == JobStatus.cancel_requested:
            _update(
                session,
                job_id,
                [status],
                status=JobStatus.cancelled,
                finished_at=now,
                lease_expires_at=None,
                where=same_lease,
            )
        elif retries >= max_retries:
            _update(
                session,
                job_id,
                [status],
                status=JobStatus.failed,
                error=(
                    f"the worker stopped responding {retries + 1} times "
                    f"(lease expired; max_retries={max_retries})"
                ),
                finished_at=now,
                lease_expires_at=None,
                where=same_lease,
            )
        elif _update(
            session,
            job_id,
            [status],
            status=JobStatus.queued,
            retries=Job.retries + 1,
            worker_id=None,
            lease_expires_at=None,
            enqueued_at=now,
            progress={**(progress or {}), "lost_worker": lost},
            where=same_lease,
        ):
            resend.append((job_id, kind))
    stale = session.execute(
        select(Job.id, Job.kind, Job.enqueued_at).where(
            Job.status == JobStatus.queued,
            Job.enqueued_at < now - timedelta(seconds=stale_queued_seconds),
        )
    ).all()
    for job_id, kind, enqueued_at in stale:
        if _update(
            session,
            job_id,
            [JobStatus.queued],
            enqueued_at=now,
            where=(Job.enqueued_at == enqueued_at,),
        ):
            resend.append((job_id, kind))
    return resend


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def is_final(status: str) -> bool:
    """True for succeeded, failed and cancelled."""
    return status in {s.value for s in FINAL_STATUSES}


def is_active(status: str) -> bool:
    """True while a job is queued or held by a worker."""
    return status in {s.value for s in ACTIVE_STATUSES}
