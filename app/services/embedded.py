"""The embedded runtime: the full deployment's Celery worker and reaper, inside the service process.

With no broker configured, ``dpaat serve`` starts this next to the API. The API sends tasks with
``app.services.dispatch`` exactly as in the full deployment; the Celery app then uses kombu's
in-memory transport, and a Celery ``WorkController`` (solo pool, one task at a time) consumes it
from a background thread. So the same task code, routing and serialisation run in both modes; only
the transport differs. The in-memory queue dies with the process: at start-up every queued job is
sent again, and jobs left running by a crash come back through the reaper once their lease expires.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)


class EmbeddedRuntime:
    """A Celery worker thread (all queues) and a reaper thread; ``start()`` / ``stop()``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if not self.settings.embedded:
            raise RuntimeError("the embedded runtime is for deployments without a broker")
        self._worker: Any = None
        self._worker_thread: threading.Thread | None = None
        self._reaper: Any = None

    def start(self) -> None:
        """Start consuming, then re-send the queued jobs a previous process left behind."""
        from celery.worker import WorkController

        from worker import hooks, reaper
        from worker.celery_app import DEFAULT_QUEUE, celery_app, configure

        hooks.SHUTDOWN.clear()
        configure(celery_app, self.settings)
        # The database is the source of truth and every queued job is re-sent below: messages an
        # earlier runtime of this process left on the in-memory transport (another database, in
        # tests) are dropped first, or the one solo worker would work through them before ours.
        celery_app.control.purge()
        queues = [self.settings.train_queue, self.settings.evaluate_queue, DEFAULT_QUEUE]
        self._worker = WorkController(
            app=celery_app,
            hostname=f"embedded@{socket.gethostname()}",
            pool="solo",
            concurrency=1,
            queues=sorted(set(queues)),
            include=["worker.tasks"],
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        self._worker_thread = threading.Thread(
            target=self._worker.start, name="dpaat-embedded-worker", daemon=True
        )
        self._worker_thread.start()
        resent = reaper.reap_and_redispatch(self.settings, stale_queued_seconds=0)
        if resent:
            log.info("embedded runtime: re-sent %d queued job(s)", len(resent))
        self._reaper = reaper.ReaperThread(self.settings)
        self._reaper.start()
        log.info("embedded runtime: worker and reaper started (queues %s)", ", ".join(queues))

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the running task to stop at its next step, then stop the worker and the reaper."""
        from worker import hooks

        hooks.SHUTDOWN.set()
        if self._reaper is not None:
            self._reaper.stop()
        if self._worker is not None:
            self._worker.stop(in_sighandler=False)
        if self._worker_thread is not None:
            self._worker_thread.join(timeout)
            if self._worker_thread.is_alive():
                log.warning("embedded worker did not stop within %.0f s", timeout)
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        if not self.running:
            # the flag is process-wide: left set, it would stop the next job this process runs
            # through worker hooks without a runtime (models.api callers, tests)
            hooks.SHUTDOWN.clear()

    @property
    def running(self) -> bool:
        return self._worker_thread is not None and self._worker_thread.is_alive()

    def __enter__(self) -> EmbeddedRuntime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
