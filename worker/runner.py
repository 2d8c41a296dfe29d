"""What a task does with a job: claim it, run ``models.api`` on it, persist the outcome.

Kept apart from the Celery task wrappers (``worker.tasks``) so the same code runs in a
``dpaat worker`` process, in the embedded worker thread, and in tests without a broker.

Every write after the claim is conditional on this worker still holding the job: when the lease
was lost (the reaper re-queued the job, another worker took it) the run stops and writes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from app.core.settings import Settings, get_settings
from app.db.session import DATABASE_DOWN, session_scope
from app.db.tables import Artifact, Job, Model
from app.services import job_params, jobs, models_registry, public_errors
from app.services.errors import NotFound
from app.services.storage import Storage, open_store
from worker.job_files import JobFiles

if TYPE_CHECKING:  # worker.hooks imports models (torch): only inside a task, never in the parent
    from worker.hooks import JobHooks

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a finished run keeps retrying its final transaction while the database is away. The
# work is done and on disk: waiting out a database restart beats a re-queue that reloads it.
SETTLE_RETRY_SECONDS = 120.0

# Config keys that name server files: only the server sets them, from the job's dataset/model.
REPORT_FILES = (
    "report.json",
    "report.md",
    "robustness_curve.png",
    "report.xml",
    "gradcam_montage.png",
)


def worker_id(task_id: str | None = None) -> str:
    """Who holds a lease: host, process and (when known) the delivery of the task."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}:{task_id}" if task_id else base


def _claim(job_id: str, holder: str, settings: Settings) -> Job | None:
    with session_scope() as session:
        job = jobs.claim_job(session, job_id, holder, settings.lease_seconds)
    if job is None:
        # A second delivery of the same message, a finished or cancelled job: nothing to do.
        log.info("job %s: nothing to claim (already taken, finished or cancelled)", job_id)
    else:
        log.info("job %s: claimed by %s (attempt %d)", job_id, holder, job.retries + 1)
    return job


def _hooks(job: Job, holder: str, settings: Settings, files: JobFiles | None = None) -> JobHooks:
    from worker.hooks import JobHooks

    return JobHooks(
        job.id,
        holder,
        after_checkpoint=files.save if files is not None else None,
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        base_progress={
            "attempt": job.retries + 1,
            "worker": holder,
            # The last lost worker stays visible while the job runs again (issue 14).
            **{k: v for k, v in (job.progress or {}).items() if k == "lost_worker"},
        },
    )


def train_config(session: Session, job: Job, store: Storage) -> dict[str, Any]:
    """The ``TrainConfig`` dict of a training job: server paths resolved by the service layer,
    and no server file named by the client (the API forbids these keys; this is the backstop)."""
    config = job_params.train_config(session, job, store)
    if job.params.get("pretrained") != "imagenet":  # only the server's own directory
        config.pop("pretrained", None)
    if not job.params.get("reference_model_id"):
        config.pop("reference_checkpoint", None)
    return config


def _finish_stop(job_id: str, holder: str, reason: str, store: Storage) -> str:
    """Settle a run that stopped before the end; returns the outcome for logs and tests."""
    if reason == "lease_lost":
        log.warning("job %s: lease lost, abandoning this run without writing", job_id)
        return "lease_lost"
    with session_scope() as session:
        if reason == "cancel":
            _record_checkpoint(session, job_id, store)
            jobs.mark_cancelled(session, job_id, holder)
            log.info("job %s: cancelled (checkpoint kept)", job_id)
            return "cancelled"
        # The service is stopping: expire the lease now so the next reaper pass re-queues the
        # job and it resumes from its checkpoint instead of waiting out the lease.
        jobs.heartbeat(session, job_id, holder, 0)
    log.info("job %s: interrupted by shutdown; it will be re-queued", job_id)
    return "interrupted"


def _record_checkpoint(session: Session, job_id: str, store: Storage) -> None:
    """Keep a stopped job's checkpoint visible as an artifact (it can be resumed or inspected)."""
    path = job_params.job_dir(store, job_id) / "checkpoint.pt"
    job = session.get(Job, job_id)
    if job is None or not path.is_file():
        return
    ref = store.publish(path, f"jobs/{job_id}/checkpoint.pt")
    session.add(
        Artifact(
            owner=job.owner,
            uri=ref.uri,
            size=ref.size,
            sha256=ref.sha256,
            kind="checkpoint",
            job_id=job_id,
        )
    )
    session.commit()


def _settle(job_id: str, transaction: Callable[[], T]) -> T:
    """Run the final transaction of a run, retried (with backoff) while the database is down."""
    deadline = time.monotonic() + SETTLE_RETRY_SECONDS
    delay = 0.5
    while True:
        try:
            return transaction()
        except DATABASE_DOWN as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: database unavailable while settling, retrying: %s", job_id, e)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def _fail(job_id: str, holder: str, error: BaseException) -> str:
    # The job keeps a short message for its owner; the details stay in this log (issue 14).
    reference = public_errors.new_reference()
    log.error(
        "job %s failed (reference %s):\n%s",
        job_id,
        reference,
        "".join(traceback.format_exception(error)),
    )
    with session_scope() as session:
        jobs.fail_job(session, job_id, holder, public_errors.job_error(error, reference))
    return "failed"


def run_train_job(job_id: str, holder: str, settings: Settings | None = None) -> str:
    """Claim and run a training job. Returns the outcome: ``skipped`` (nothing to claim),
    ``succeeded``, ``failed``, ``cancelled``, ``interrupted`` or ``lease_lost``."""
    from models import api  # torch: imported before the claim, so the lease starts beating at once

    settings = settings or get_settings()
    store = open_store(settings)
    job = _claim(job_id, holder, settings)
    if job is None:
        return "skipped"
    out_dir = job_params.job_dir(store, job_id)  # train() resumes from the checkpoint found here
    files = JobFiles(store, job_id, out_dir)  # object storage: fetched here, published per epoch
    with _hooks(job, holder, settings, files) as hooks, store.holding():
        try:
            files.restore()
            with session_scope() as session:
                config = train_config(session, job, store)
            result = api.train(config, out_dir, hooks=hooks)
            if result.status != "completed":
                hooks.sync()  # the progress shows where the run stopped
                return _finish_stop(job_id, holder, hooks.stop_reason or "shutdown", store)
            if hooks.stop_reason == "lease_lost":
                return _finish_stop(job_id, holder, "lease_lost", store)
            run = {
                "resumed_from_epoch": (hooks.first_epoch or result.epochs_done + 1) - 1,
                "epochs_this_run": hooks.epochs_this_run,
            }

            def finish() -> str:
                with session_scope() as session:
                    _record_missing_epochs(session, job_id, result.history)
                    job = jobs.get_job(session, job_id)
                    # the model is the best epoch by the config's best_by (robust overfitting);
                    # checkpoint.pt, the last epoch, stays in the run directory for resuming
                    model = models_registry.register_trained_model(
                        session,
                        job,
                        result.best_checkpoint,
                        result.model_info,
                        checkpoint_sha256=result.best_checkpoint_sha256,
                        store=store,
                    )
                    summary = {
                        "model_id": model.id,
                        "checkpoint_uri": model.weights_uri,
                        "checkpoint_sha256": result.best_checkpoint_sha256,
                        "best_epoch": result.best_epoch,
                        "best_by": result.best_by,
                        "epochs_done": result.epochs_done,
                        "final": result.history[-1] if result.history else {},
                        **run,
                    }
                    if not jobs.finish_job(session, job_id, holder, summary):
                        return "lease_lost"
                log.info("job %s: succeeded (model %s)", job_id, model.id)
                return "succeeded"

            outcome = _settle(job_id, finish)
            if outcome == "succeeded":
                files.discard_local()
            return outcome
        except Exception as e:
            if hooks.stop_reason == "lease_lost":
                return "lease_lost"
            return _fail(job_id, holder, e)


def _record_missing_epochs(session: Session, job_id: str, history: list[dict[str, Any]]) -> None:
    """Record epochs a crash kept out of the database (killed between checkpoint and record)."""
    known = {row.epoch for row in jobs.epochs_of(session, job_id)}
    for record in history:
        epoch = int(record.get("epoch", 0))
        if epoch and epoch not in known:
            jobs.record_epoch(session, job_id, epoch, record)


def run_evaluate_job(job_id: str, holder: str, settings: Settings | None = None) -> str:
    """Claim and run an evaluation job; outcomes as :func:`run_train_job`."""
    from models import api  # see run_train_job

    settings = settings or get_settings()
    store = open_store(settings)
    job = _claim(job_id, holder, settings)
    if job is None:
        return "skipped"
    out_dir = job_params.job_dir(store, job_id)
    params = dict(job.params)
    with _hooks(job, holder, settings) as hooks, store.holding():
        try:
            with session_scope() as session:
                model = session.get(Model, params.get("model_id"))
                if model is None:
                    raise NotFound(f"model {params.get('model_id')} no longer exists")
                model_id = model.id
                args = job_params.evaluate_args(session, job, store)
            report = api.evaluate(out_dir=out_dir, progress=hooks.on_progress, **args)
            if hooks.stop_reason is not None:
                return _finish_stop(job_id, holder, hooks.stop_reason, store)
            files = {name: out_dir / name for name in REPORT_FILES if (out_dir / name).is_file()}

            def finish() -> str:
                with session_scope() as session:
                    job = jobs.get_job(session, job_id)
                    evaluation = models_registry.register_evaluation(
                        session, job, model_id, report, files, store=store
                    )
                    summary = {
                        "evaluation_id": evaluation.id,
                        "model_id": model_id,
                        "verdict": report.get("verdict"),
                        "curve_auc": report.get("curve_auc"),
                        "clean_accuracy": (report.get("clean") or {}).get("accuracy"),
                    }
                    if not jobs.finish_job(session, job_id, holder, summary):
                        return "lease_lost"
                log.info("job %s: evaluation %s stored", job_id, evaluation.id)
                return "succeeded"

            outcome = _settle(job_id, finish)
            if outcome == "succeeded":
                JobFiles(store, job_id, out_dir).discard_local()
            return outcome
        except Exception as e:
            from worker.hooks import JobStopped

            if isinstance(e, JobStopped):
                return _finish_stop(job_id, holder, e.reason, store)
            if hooks.stop_reason == "lease_lost":
                return "lease_lost"
            return _fail(job_id, holder, e)
