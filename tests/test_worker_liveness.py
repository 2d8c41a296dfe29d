"""Issue 14: a lost worker shows on its job within a lease and a reap (seconds), and the job is
re-queued one confirmation later; a worker that was only cut off from the database (every
heartbeat fails during an outage) beats again in time and keeps its job. /health/ready reports
live workers per queue and fails when a required queue has none. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import test_api
import test_db_jobs
from sqlalchemy.orm import Session
from test_api import Api

from app.core.settings import Settings
from app.db.tables import utcnow
from app.services import jobs, workers

engine = test_db_jobs.engine
session = test_db_jobs.session
database_url = test_api.database_url
make_api = test_api.make_api


def _reap(session: Session, seconds_from_now: float) -> list[tuple[str, str]]:
    return jobs.reap(
        session,
        now=utcnow() + timedelta(seconds=seconds_from_now),
        max_retries=3,
        stale_queued_seconds=3600,
        confirm_seconds=3,
    )


def test_defaults_notice_a_lost_worker_within_seconds() -> None:
    s = Settings()
    assert s.heartbeat_seconds == 2 and s.lease_seconds <= 3 * s.heartbeat_seconds
    assert s.reap_interval_seconds <= s.heartbeat_seconds
    # kill -> shown: at most a lease and a reap interval; -> re-queued: plus the confirmation
    assert s.lease_seconds + s.reap_interval_seconds <= 10
    assert s.lease_seconds + 2 * s.reap_interval_seconds + s.lost_worker_confirm_seconds <= 15


def test_a_dead_worker_is_shown_then_its_job_requeued(session: Session) -> None:
    job = test_db_jobs.new_job(session)
    jobs.claim_job(session, job.id, "host:42:task", 5)
    assert _reap(session, 6) == []  # first sight: shown, not yet re-queued
    row = jobs.get_job(session, job.id)
    lost = row.progress["lost_worker"]
    assert row.status == "running" and lost["suspected"] is True
    assert lost["worker"] == "host:42:task" and lost["noticed_at"] and lost["lease_expired_at"]
    assert _reap(session, 7) == []  # within the confirmation: still waiting
    assert _reap(session, 10) == [(job.id, "train")]  # silent all along: re-queued
    row = jobs.get_job(session, job.id)
    lost = row.progress["lost_worker"]
    assert row.status == "queued" and row.retries == 1 and lost["suspected"] is False
    assert lost["requeued_at"] > lost["noticed_at"]  # ISO times, comparable as text
    assert jobs.heartbeat(session, job.id, "host:42:task", 5) == jobs.LEASE_LOST


def test_a_worker_back_after_a_database_outage_keeps_its_job(session: Session) -> None:
    job = test_db_jobs.new_job(session)
    jobs.claim_job(session, job.id, "w1", 5)
    assert _reap(session, 15) == []  # the outage: every lease expired, the worker is suspected
    # the database is back; the live worker beats and writes its progress (clearing the mark)
    assert jobs.heartbeat(session, job.id, "w1", 5) == "running"
    jobs.record_progress(session, job.id, {"epoch": 3})
    assert _reap(session, 3) == []
    row = jobs.get_job(session, job.id)
    assert row.status == "running" and row.retries == 0 and "lost_worker" not in row.progress


def test_without_confirmation_the_old_behaviour_stays(session: Session) -> None:
    job = test_db_jobs.new_job(session)
    jobs.claim_job(session, job.id, "w1", 5)
    later = utcnow() + timedelta(seconds=6)
    assert jobs.reap(session, now=later, max_retries=3, stale_queued_seconds=3600) == [
        (job.id, "train")
    ]
    assert jobs.get_job(session, job.id).progress["lost_worker"]["worker"] == "w1"


# ============================================================================ readiness
@pytest.mark.parametrize(
    ("required", "live", "status", "report"),
    [
        ("", {"train": 2, "evaluate": 1}, 200, {"train": 2, "evaluate": 1}),
        ("train,evaluate", {"train": 1}, 503, {"train": 1, "evaluate": 0}),
        ("train", {"train": 1, "default": 1}, 200, {"train": 1, "default": 1}),
    ],
)
def test_ready_reports_live_workers_per_queue(
    make_api: Callable[..., Api],
    monkeypatch: pytest.MonkeyPatch,
    required: str,
    live: dict[str, int],
    status: int,
    report: dict[str, Any],
) -> None:
    from app.api.routes import health

    api = make_api(broker_url="redis://127.0.0.1:1/0", required_queues=required)
    monkeypatch.setattr(health, "_check_broker", lambda url: "ok")
    monkeypatch.setattr(workers, "live_workers_per_queue", lambda: dict(live))
    r = api.client.get("/health/ready")
    assert r.status_code == status, r.text
    got = r.json()["workers"]
    assert {k: v for k, v in got.items() if k != "error"} == report
    if status == 503:
        assert "no live worker for required queue(s) evaluate" in got["error"]
