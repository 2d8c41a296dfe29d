"""Per-owner quotas: active jobs, and bytes uploaded in a rolling window (HTTP 429 + Retry-After).

Both are checked before anything is stored: the job count before the job row is inserted, the
upload volume before the request body is read (with the declared Content-Length counted).
Concurrent requests may overshoot a limit by the number in flight; the limits bound abuse and
cost, they are not billing.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db.tables import ACTIVE_STATUSES, Job, UploadUsage, utcnow
from app.services.errors import QuotaExceeded, TooLarge

# When a job will finish is unknown; a client polling every 30 s is cheap and soon served.
JOB_RETRY_AFTER_SECONDS = 30
_MB = 1 << 20


def check_active_jobs(session: Session, owner: str, limit: int) -> None:
    """``QuotaExceeded`` when ``owner`` already has ``limit`` unfinished jobs (0: no limit)."""
    if limit <= 0:
        return
    active = (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner == owner, Job.status.in_([s.value for s in ACTIVE_STATUSES]))
        )
        or 0
    )
    if active >= limit:
        raise QuotaExceeded(
            f"job quota exceeded: {active} jobs queued or running (limit {limit} per owner); "
            "wait for one to finish or cancel one",
            retry_after=JOB_RETRY_AFTER_SECONDS,
        )


def check_upload(
    session: Session,
    owner: str,
    incoming: int,
    *,
    limit_mb: int,
    window_seconds: int,
    now: datetime | None = None,
) -> None:
    """``QuotaExceeded`` when ``incoming`` more bytes would take ``owner`` over ``limit_mb`` in
    the last ``window_seconds``; Retry-After is when enough earlier uploads leave the window."""
    if limit_mb <= 0:
        return
    limit = limit_mb * _MB
    if incoming > limit:
        raise TooLarge(f"the upload exceeds the upload quota of {limit_mb} MB")
    now = now or utcnow()
    window = timedelta(seconds=window_seconds)
    rows = session.execute(
        select(UploadUsage.created_at, UploadUsage.bytes)
        .where(UploadUsage.owner == owner, UploadUsage.created_at > now - window)
        .order_by(UploadUsage.created_at)
    ).all()
    used = sum(int(b) for _, b in rows)
    excess = used + incoming - limit
    if excess <= 0:
        return
    freed, retry_at = 0, now + window
    for created, size in rows:  # oldest first: the first moment enough has expired
        freed += int(size)
        if freed >= excess:
            retry_at = created + window
            break
    minutes = window_seconds / 60
    raise QuotaExceeded(
        f"upload quota exceeded: {used / _MB:.1f} MB uploaded in the last {minutes:g} min, "
        f"this upload declares {incoming / _MB:.1f} MB, the limit is {limit_mb} MB per "
        f"{minutes:g} min",
        retry_after=math.ceil((retry_at - now).total_seconds()),
    )


def record_upload(
    session: Session, owner: str, nbytes: int, *, window_seconds: int, now: datetime | None = None
) -> None:
    """Count a stored upload, and forget this owner's uploads that left the window."""
    now = now or utcnow()
    session.execute(
        delete(UploadUsage).where(
            UploadUsage.owner == owner,
            UploadUsage.created_at <= now - timedelta(seconds=window_seconds),
        )
    )
    session.add(UploadUsage(owner=owner, bytes=nbytes, created_at=now))
    session.commit()
