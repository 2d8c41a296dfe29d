"""Send a job's Celery task by name. The API calls ``dispatch`` after committing the job row.

The database is the source of truth: a send that fails (broker down) is logged and left to the
reaper, which re-sends queued jobs that never started. The client still gets its job id, and a
message that arrives twice is harmless (the task's claim is a conditional UPDATE).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Keep a request from hanging on a dead broker: a few quick retries, then the reaper's turn.
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}


def dispatch(job_id: str, kind: str) -> None:
    """Send ``dpaat.train`` / ``dpaat.evaluate`` for ``job_id`` to the queue of its kind."""
    from worker.celery_app import TASK_FOR_KIND, celery_app

    try:
        task = TASK_FOR_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}") from None
    try:
        celery_app.send_task(task, args=[job_id], retry=True, retry_policy=_RETRY_POLICY)
    except Exception as e:  # broker errors vary by transport; the reaper re-sends the job
        log.warning(
            "could not send %s for job %s (the reaper will re-send it): %s", task, job_id, e
        )
