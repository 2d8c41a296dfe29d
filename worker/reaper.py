"""The reaper: re-queue jobs whose worker died (expired lease) and re-send queued jobs whose
message was lost. Celery beat runs it as the ``dpaat.reap`` task in the full deployment; the
embedded runtime runs it on a timer thread. Both call :func:`reap_and_redispatch`."""

from __future__ import annotations

import logging
import threading

from app.core.settings import Settings, get_settings
from app.db.session import session_scope
from app.services import jobs
from app.services.dispatch import dispatch

log = logging.getLogger(__name__)


def reap_and_redispatch(
    settings: Settings | None = None, *, stale_queued_seconds: float | None = None
) -> list[tuple[str, str]]:
    """One reaper pass; returns the ``(job_id, kind)`` sent to the queue again.

    ``stale_queued_seconds`` overrides the setting (0 at embedded start-up: the in-memory queue
    died with the previous process, so every queued job must be sent again).
    """
    settings = settings or get_settings()
    stale = settings.stale_queued_seconds if stale_queued_seconds is None else stale_queued_seconds
    with session_scope() as session:
        resend = jobs.reap(
            session,
            max_retries=settings.max_retries,
            stale_queued_seconds=stale,
            confirm_seconds=settings.lost_worker_confirm_seconds,
        )
    for job_id, kind in resend:
        log.info("reaper: re-sending %s job %s", kind, job_id)
        dispatch(job_id, kind)
    return resend


class ReaperThread(threading.Thread):
    """Calls :func:`reap_and_redispatch` every ``interval`` seconds until ``stop()``."""

    def __init__(self, settings: Settings, interval: float | None = None) -> None:
        super().__init__(name="dpaat-reaper", daemon=True)
        self.settings = settings
        self.interval = float(interval or settings.reap_interval_seconds)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reap_and_redispatch(self.settings)
            except Exception:  # the database may be briefly away; try again next interval
                log.exception("reaper pass failed")

    def stop(self) -> None:
        self._stop_event.set()
