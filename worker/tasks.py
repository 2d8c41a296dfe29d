"""The Celery tasks: thin wrappers around ``worker.runner`` and ``worker.reaper``.

Nothing here imports torch at module level: the prefork parent process imports this module and
must never initialise CUDA (the children it forks could not use it). ``models`` is imported inside
the task, in the child.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

from celery import Task
from celery.signals import worker_process_init

from worker import predict, reaper, runner
from worker.celery_app import EVALUATE_TASK, PREDICT_TASK, REAP_TASK, TRAIN_TASK, celery_app

log = logging.getLogger(__name__)


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    """A forked child drops the parent's database connections, and starts importing torch in the
    background so that its first job does not wait seconds for it (the parent never imports it;
    importing inline here could exceed the pool's start-up timeout on a busy machine)."""
    from app.core.settings import get_settings
    from app.db.session import dispose_engines
    from app.services.images import enforce_pixel_limit

    dispose_engines()
    enforce_pixel_limit(get_settings().max_image_pixels)  # also for registered directories
    threading.Thread(
        target=importlib.import_module, args=("models.api",), name="preload-torch", daemon=True
    ).start()


@celery_app.task(name=TRAIN_TASK, bind=True)
def train_task(self: Task, job_id: str) -> str:
    """Run training job ``job_id`` (resuming from its checkpoint when it has one)."""
    return runner.run_train_job(job_id, runner.worker_id(self.request.id))


@celery_app.task(name=EVALUATE_TASK, bind=True)
def evaluate_task(self: Task, job_id: str) -> str:
    """Run evaluation job ``job_id``."""
    return runner.run_evaluate_job(job_id, runner.worker_id(self.request.id))


@celery_app.task(name=REAP_TASK)
def reap_task() -> int:
    """One reaper pass (scheduled by Celery beat); returns how many jobs were re-sent."""
    return len(reaper.reap_and_redispatch())


# Acknowledged on receipt: a prediction lost with its worker is answered 503 by the API at its
# timeout; redelivered after that (Redis: after the visibility timeout), it would be work for a
# client that is gone (the message also expires with the request's deadline).
@celery_app.task(name=PREDICT_TASK, acks_late=False, ignore_result=True)
def predict_task(payload: dict[str, Any]) -> str:
    """Answer one prediction request (batched with concurrent ones: ``worker.predict``)."""
    return predict.serve(payload)
