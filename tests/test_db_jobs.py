"""The job state machine on SQLite and on the real Postgres: every transition from every state,
double claims, lease expiry, retries, cancellation, idempotency."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from app.db.migrate import upgrade
from app.db.session import make_engine, make_sessionmaker
from app.db.tables import Job, JobStatus, utcnow
from app.db.testing import fresh_postgres_database, truncate_all
from app.services import jobs
from app.services.errors import Conflict, NotFound


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('jobs') / 'jobs.db'}"
        upgrade(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()
        return
    server = request.getfixturevalue("postgres_url")
    with fresh_postgres_database(server) as url:
        upgrade(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    truncate_all(engine)
    with make_sessionmaker(engine)() as s:
        yield s


def new_job(session: Session, owner: str = "local", **params: object) -> Job:
    return jobs.create_job(session, owner=owner, kind="train", params={"config": params})


def force(session: Session, job_id: str, status: str, worker: str | None = "w1") -> None:
    """Put a job in ``status`` as if held by ``worker`` with a live lease."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=status,
            worker_id=worker,
            lease_expires_at=None if worker is None else utcnow() + timedelta(minutes=5),
        )
    )
    session.commit()


def status_of(session: Session, job_id: str) -> str:
    return jobs.get_job(session, job_id).status


# ------------------------------------------------------------------ creation and idempotency
def test_create_is_queued_with_timestamps(session: Session) -> None:
    job = new_job(session, epochs=1)
    assert job.status == "queued" and job.retries == 0 and job.worker_id is None
    assert job.created_at.tzinfo is not None and job.started_at is None
    assert jobs.get_job(session, job.id).params == {"config": {"epochs": 1}}


def test_idempotency_key_same_owner_same_job(session: Session) -> None:
    a, created_a = jobs.submit_job(
        session, owner="o1", kind="train", params={"x": 1}, idempotency_key="k"
    )
    b, created_b = jobs.submit_job(
        session, owner="o1", kind="train", params={"x": 1}, idempotency_key="k"
    )
    assert created_a and not created_b and a.id == b.id
    with pytest.raises(Conflict, match="different request"):
        jobs.submit_job(session, owner="o1", kind="train", params={"x": 2}, idempotency_key="k")
    with pytest.raises(Conflict):
        jobs.submit_job(session, owner="o1", kind="evaluate", params={"x": 1}, idempotency_key="k")
    other, created_other = jobs.submit_job(
        session, owner="o2", kind="train", params={"x": 1}, idempotency_key="k"
    )
    assert created_other and other.id != a.id
    assert jobs.list_jobs(session, "o1")[1] == 1


def test_dataset_and_model_ids_become_columns(session: Session) -> None:
    job = jobs.create_job(session, owner="o", kind="evaluate", params={"model_id": "m" * 32})
    assert job.model_id == "m" * 32 and job.dataset_id is None


# ------------------------------------------------------------------ every transition
ALL = [s.value for s in JobStatus]
# (from status, operation) -> resulting status, or "Conflict"; operations by worker w1 (the
# holder) except claim, which a second worker w2 attempts.
EXPECTED = {
    "queued": {
        "claim": "running",
        "finish": "queued",
        "fail": "queued",
        "mark_cancelled": "queued",
        "request_cancel": "cancelled",
    },
    "running": {
        "claim": "running",
        "finish": "succeeded",
        "fail": "failed",
        "mark_cancelled": "cancelled",
        "request_cancel": "cancel_requested",
    },
    "cancel_requested": {
        "claim": "cancel_requested",
        "finish": "succeeded",
        "fail": "failed",
        "mark_cancelled": "cancelled",
        "request_cancel": "cancel_requested",
    },
    "succeeded": {
        "claim": "succeeded",
        "finish": "succeeded",
        "fail": "succeeded",
        "mark_cancelled": "succeeded",
        "request_cancel": "Conflict",
    },
    "failed": {
        "claim": "failed",
        "finish": "failed",
        "fail": "failed",
        "mark_cancelled": "failed",
        "request_cancel": "Conflict",
    },
    "cancelled": {
        "claim": "cancelled",
        "finish": "cancelled",
        "fail": "cancelled",
        "mark_cancelled": "cancelled",
        "request_cancel": "cancelled",
    },
}


@pytest.mark.parametrize("start", ALL)
@pytest.mark.parametrize("op", ["claim", "finish", "fail", "mark_cancelled", "request_cancel"])
def test_transition_table(session: Session, start: str, op: str) -> None:
    job = new_job(session)
    force(session, job.id, start, worker=None if start == "queued" else "w1")
    expected = EXPECTED[start][op]
    if expected == "Conflict":
        with pytest.raises(Conflict, match="cannot be cancelled"):
            jobs.request_cancel(session, job.id, "local")
        assert status_of(session, job.id) == start
        return
    changed: object
    if op == "claim":
        changed = jobs.claim_job(session, job.id, "w2", 60)
        assert (changed is not None) == (expected != start)
    elif op == "finish":
        changed = jobs.finish_job(session, job.id, "w1", {"ok": 1})
    elif op == "fail":
        changed = jobs.fail_job(session, job.id, "w1", "boom")
    elif op == "mark_cancelled":
        changed = jobs.mark_cancelled(session, job.id, "w1")
    else:
        changed = jobs.request_cancel(session, job.id, "local")
    if isinstance(changed, bool):
        assert changed == (expected != start)
    assert status_of(session, job.id) == expected
    final = jobs.get_job(session, job.id)
    if expected in ("succeeded", "failed", "cancelled") and start != expected:
        assert final.finished_at is not None and final.lease_expires_at is None
    if op == "finish" and expected == "succeeded" != start:
        assert final.result == {"ok": 1}
    if op == "fail" and expected == "failed" != start:
        assert final.error == "boom"


@pytest.mark.parametrize("op", ["finish", "fail", "mark_cancelled"])
def test_only_the_holder_can_settle(session: Session, op: str) -> None:
    job = new_job(session)
    assert jobs.claim_job(session, job.id, "w1", 60) is not None
    settle = {
        "finish": lambda w: jobs.finish_job(session, job.id, w, {}),
        "fail": lambda w: jobs.fail_job(session, job.id, w, "x"),
        "mark_cancelled": lambda w: jobs.mark_cancelled(session, job.id, w),
    }[op]
    assert settle("intruder") is False
    assert status_of(session, job.id) == "running"
    assert settle("w1") is True


def test_claim_sets_lease_and_double_claim_gets_none(session: Session) -> None:
    job = new_job(session)
    before = utcnow()
    claimed = jobs.claim_job(session, job.id, "w1", 60)
    assert claimed is not None and claimed.status == "running" and claimed.worker_id == "w1"
    assert claimed.lease_expires_at is not None and claimed.started_at is not None
    assert timedelta(seconds=59) <= claimed.lease_expires_at - before <= timedelta(seconds=61)
    assert jobs.claim_job(session, job.id, "w2", 60) is None
    assert jobs.claim_job(session, "0" * 32, "w2", 60) is None
    assert jobs.get_job(session, job.id).worker_id == "w1"


def test_concurrent_claims_have_one_winner(session: Session, engine: Engine) -> None:
    job = new_job(session)
    factory = make_sessionmaker(engine)
    winners: list[str] = []
    barrier = threading.Barrier(4)

    def claim(worker: str) -> None:
        with factory() as s:
            barrier.wait()
            if jobs.claim_job(s, job.id, worker, 60) is not None:
                winners.append(worker)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert jobs.get_job(session, job.id).worker_id == winners[0]


def test_heartbeat_extends_lease_and_reports_status(session: Session) -> None:
    job = new_job(session)
    jobs.claim_job(session, job.id, "w1", 1)
    first = jobs.get_job(session, job.id).lease_expires_at
    assert jobs.heartbeat(session, job.id, "w1", 300) == "running"
    later = jobs.get_job(session, job.id).lease_expires_at
    assert first is not None and later is not None and later - first > timedelta(seconds=200)
    assert jobs.heartbeat(session, job.id, "w2", 300) == jobs.LEASE_LOST
    jobs.request_cancel(session, job.id, "local")
    assert jobs.heartbeat(session, job.id, "w1", 300) == "cancel_requested"
    jobs.mark_cancelled(session, job.id, "w1")
    assert jobs.heartbeat(session, job.id, "w1", 300) == jobs.LEASE_LOST


def test_progress_only_while_held_and_epochs_upsert(session: Session) -> None:
    job = new_job(session)
    assert jobs.record_progress(session, job.id, {"epoch": 0}) is False  # still queued
    jobs.claim_job(session, job.id, "w1", 60)
    assert jobs.record_progress(session, job.id, {"epoch": 1, "step": 3}) is True
    jobs.record_epoch(session, job.id, 0, {"loss": 1.0})
    jobs.record_epoch(session, job.id, 1, {"loss": 0.5, "tau": 1.2})
    jobs.record_epoch(session, job.id, 1, {"loss": 0.4, "tau": 1.1})  # a resumed run re-records
    epochs = jobs.epochs_of(session, job.id)
    assert [(e.epoch, e.metrics["loss"]) for e in epochs] == [(0, 1.0), (1, 0.4)]
    assert jobs.get_job(session, job.id).progress == {"epoch": 1, "step": 3}
    jobs.finish_job(session, job.id, "w1", {})
    assert jobs.record_progress(session, job.id, {"epoch": 9}) is False
    assert jobs.get_job(session, job.id).progress == {"epoch": 1, "step": 3}


# ------------------------------------------------------------------ cancellation
def test_cancel_queued_vs_running(session: Session) -> None:
    queued, running = new_job(session), new_job(session)
    jobs.claim_job(session, running.id, "w1", 60)
    assert jobs.request_cancel(session, queued.id, "local").status == "cancelled"
    assert jobs.claim_job(session, queued.id, "w1", 60) is None  # its message finds nothing
    assert jobs.request_cancel(session, running.id, "local").status == "cancel_requested"
    assert jobs.heartbeat(session, running.id, "w1", 60) == "cancel_requested"
    assert jobs.mark_cancelled(session, running.id, "w1")
    assert status_of(session, running.id) == "cancelled"


def test_cancel_of_another_owner_is_not_found(session: Session) -> None:
    job = new_job(session, owner="alice")
    with pytest.raises(NotFound):
        jobs.request_cancel(session, job.id, "mallory")
    assert status_of(session, job.id) == "queued"


# ------------------------------------------------------------------ recovery (reaper)
def test_reap_requeues_expired_lease_and_old_worker_is_locked_out(session: Session) -> None:
    job, healthy = new_job(session), new_job(session)
    jobs.claim_job(session, job.id, "dead", 10)
    jobs.claim_job(session, healthy.id, "alive", 3600)
    later = utcnow() + timedelta(seconds=60)
    resend = jobs.reap(session, now=later, max_retries=3, stale_queued_seconds=3600)
    assert resend == [(job.id, "train")]
    row = jobs.get_job(session, job.id)
    assert row.status == "queued" and row.retries == 1 and row.worker_id is None
    assert status_of(session, healthy.id) == "running"
    # The worker that lost its lease can no longer write anything.
    assert jobs.heartbeat(session, job.id, "dead", 60) == jobs.LEASE_LOST
    assert jobs.finish_job(session, job.id, "dead", {}) is False
    # A new worker claims it and resumes.
    assert jobs.claim_job(session, job.id, "new", 60) is not None


def test_reap_fails_job_when_retries_exhausted(session: Session) -> None:
    job = new_job(session)
    now = utcnow()
    for attempt in range(3):
        jobs.claim_job(session, job.id, f"w{attempt}", 1)
        now += timedelta(seconds=10)
        assert jobs.reap(session, now=now, max_retries=2, stale_queued_seconds=3600) == (
            [(job.id, "train")] if attempt < 2 else []
        )
    row = jobs.get_job(session, job.id)
    assert row.status == "failed" and row.retries == 2
    assert row.error is not None and "max_retries=2" in row.error


def test_reap_settles_expired_cancel_request(session: Session) -> None:
    job = new_job(session)
    jobs.claim_job(session, job.id, "w1", 1)
    jobs.request_cancel(session, job.id, "local")
    assert (
        jobs.reap(
            session, now=utcnow() + timedelta(seconds=30), max_retries=3, stale_queued_seconds=3600
        )
        == []
    )
    assert status_of(session, job.id) == "cancelled"


def test_reap_resends_stale_queued_once(session: Session) -> None:
    stale, fresh = new_job(session), new_job(session)
    session.execute(
        update(Job).where(Job.id == stale.id).values(enqueued_at=utcnow() - timedelta(hours=1))
    )
    session.commit()
    assert jobs.reap(session, max_retries=3, stale_queued_seconds=300) == [(stale.id, "train")]
    assert jobs.reap(session, max_retries=3, stale_queued_seconds=300) == []
    assert status_of(session, stale.id) == "queued" and status_of(session, fresh.id) == "queued"


def test_heartbeat_in_time_prevents_reap(session: Session) -> None:
    job = new_job(session)
    jobs.claim_job(session, job.id, "w1", 5)
    jobs.heartbeat(session, job.id, "w1", 3600)
    assert (
        jobs.reap(
            session, now=utcnow() + timedelta(seconds=60), max_retries=3, stale_queued_seconds=3600
        )
        == []
    )
    assert status_of(session, job.id) == "running"


# ------------------------------------------------------------------ reading
def test_list_filters_paginates_and_counts(session: Session) -> None:
    ids = [new_job(session, n=i).id for i in range(5)]
    new_job(session, owner="someone-else")
    jobs.request_cancel(session, ids[0], "local")
    page, total = jobs.list_jobs(session, "local", limit=2, offset=0)
    assert total == 5 and len(page) == 2
    rest, _ = jobs.list_jobs(session, "local", limit=10, offset=2)
    assert len(rest) == 3 and not {j.id for j in page} & {j.id for j in rest}
    cancelled, n = jobs.list_jobs(session, "local", status="cancelled")
    assert n == 1 and cancelled[0].id == ids[0]
    counts = jobs.counts_by_status(session)
    assert counts["queued"] == 5 and counts["cancelled"] == 1 and counts["failed"] == 0


def test_status_column_rejects_unknown_states(session: Session) -> None:
    from sqlalchemy.exc import IntegrityError

    job = new_job(session)
    with pytest.raises(IntegrityError):
        session.execute(update(Job).where(Job.id == job.id).values(status="exploded"))
        session.commit()
    session.rollback()
    assert status_of(session, job.id) == "queued"
