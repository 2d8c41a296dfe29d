"""How a running job talks to the database: lease heartbeats, progress at a bounded rate, and the
stop signals (cancellation, a lost lease, the embedded runtime shutting down).

One ``JobHooks`` object lives for the duration of one task. A background thread renews the lease
every ``heartbeat_seconds`` whatever the task is doing (loading data, evaluating, registering),
and the training loop's ``on_step`` writes progress and reads the job's status at most once per
``progress_seconds``, so a cancellation is seen within about a second and a few steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.orm import Session

from app.db.session import session_scope
from app.services import jobs
from models.training.hooks import TrainingHooks

log = logging.getLogger(__name__)

# Set by the embedded runtime when the service stops: running tasks stop at the next step.
SHUTDOWN = threading.Event()

SessionFactory = Callable[[], AbstractContextManager[Session]]


class JobStopped(Exception):
    """Raised from a progress callback to abandon work that has no stop hook (evaluation)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"job stopped: {reason}")
        self.reason = reason


class JobHooks(TrainingHooks):
    """Heartbeat, progress and stop checks of one job held by ``worker_id``.

    Use as a context manager: entering starts the heartbeat thread, leaving stops it.
    ``stop_reason`` is None while the job may go on, else ``"cancel"``, ``"lease_lost"`` or
    ``"shutdown"``.
    """

    def __init__(
        self,
        job_id: str,
        worker_id: str,
        *,
        lease_seconds: float,
        heartbeat_seconds: float,
        progress_seconds: float = 1.0,
        base_progress: dict[str, Any] | None = None,
        sessions: SessionFactory = session_scope,
        after_checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.progress_seconds = min(progress_seconds, heartbeat_seconds)
        self.sessions = sessions
        # Publishes the epoch's checkpoint to object storage (worker.job_files), before the epoch
        # is recorded (when publishing fails, a resume redoes the epoch and records it again).
        self.after_checkpoint = after_checkpoint
        self.status = "running"
        self.progress: dict[str, Any] = dict(base_progress or {})
        self.first_epoch: int | None = None  # the first epoch this run trained (1-based)
        self.epochs_this_run = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._lock = threading.Lock()  # one sync at a time (training thread vs heartbeat thread)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> JobHooks:
        self._thread = threading.Thread(
            target=self._beat_forever, name=f"heartbeat-{self.job_id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_seconds + 5)

    def _beat_forever(self) -> None:
        while not self._done.wait(self.heartbeat_seconds):
            self.sync()

    # ------------------------------------------------------------------ database
    def sync(self) -> str:
        """Renew the lease, read the status and write pending progress (one short transaction)."""
        with self._lock:
            try:
                with self.sessions() as session:
                    status = jobs.heartbeat(
                        session, self.job_id, self.worker_id, self.lease_seconds
                    )
                    if status != jobs.LEASE_LOST and self._dirty:
                        jobs.record_progress(session, self.job_id, self.progress)
                        self._dirty = False
                self.status = status
            except Exception as e:  # a database hiccup: keep working, the lease has slack
                log.warning("heartbeat of job %s failed: %s", self.job_id, e)
            self._last_sync = time.monotonic()
            return self.status

    def _sync_if_due(self) -> None:
        if time.monotonic() - self._last_sync >= self.progress_seconds:
            self.sync()

    def update_progress(self, **values: Any) -> None:
        """Merge ``values`` into the job's progress; written at the next sync."""
        self.progress.update(values)
        self._dirty = True

    # ------------------------------------------------------------------ stop signals
    @property
    def stop_reason(self) -> str | None:
        if self.status == jobs.LEASE_LOST:
            return "lease_lost"  # re-queued or taken over: this run must not write anything
        if self.status == "cancel_requested":
            return "cancel"
        if SHUTDOWN.is_set():
            return "shutdown"
        return None

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    # ------------------------------------------------------------------ training callbacks
    def on_step(
        self, epoch: int, step: int, steps_per_epoch: int, metrics: dict[str, float]
    ) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
        self.update_progress(
            phase="training",
            epoch=epoch,
            step=step,
            steps_per_epoch=steps_per_epoch,
            metrics={k: float(v) for k, v in metrics.items()},
            resumed_from_epoch=self.first_epoch - 1,
            epochs_this_run=self.epochs_this_run,
        )
        self._sync_if_due()

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        if self.status == jobs.LEASE_LOST:
            return  # another worker owns the job now: publish nothing, record nothing
        if self.after_checkpoint is not None:
            try:
                self.after_checkpoint()
            except Exception as e:  # storage down: the next epoch publishes again
                log.warning("could not publish epoch %s of job %s: %s", epoch, self.job_id, e)
        self.epochs_this_run += 1
        try:
            with self.sessions() as session:
                jobs.record_epoch(session, self.job_id, epoch, record)
        except Exception as e:  # metrics are worth a retry next epoch, not the whole run
            log.warning("could not record epoch %s of job %s: %s", epoch, self.job_id, e)
        self.update_progress(epochs_this_run=self.epochs_this_run, last_epoch=epoch)
        self.sync()

    # ------------------------------------------------------------------ evaluation callback
    def on_progress(self, stage: str, fraction: float) -> None:
        """The ``progress`` callback of ``models.api.evaluate``; raises ``JobStopped`` to abort."""
        self.update_progress(phase="evaluating", stage=stage, fraction=round(float(fraction), 4))
        self._sync_if_due()
        reason = self.stop_reason
        if reason is not None:
            raise JobStopped(reason)
