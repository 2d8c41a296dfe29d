"""The Celery app and its configuration; the tasks live in ``worker.tasks``.

State lives in the database (``app.services.jobs``), so the broker only carries the message that
starts a task: JSON messages, no result backend (a prediction's answer goes back on a Redis list
that the API awaits: ``worker.predict``). A message delivered twice is harmless because a
task first claims its job with a conditional UPDATE.

Redis note: a message that is still unacknowledged after the broker's ``visibility_timeout``
(Redis default: one hour) is delivered again, and with ``task_acks_late`` a training task is only
acknowledged when it ends. Long training therefore gets redelivered to another worker, which finds
nothing to claim and acknowledges at once; a dead worker is detected by its expired lease (the
reaper), never by the visibility timeout.
"""

from __future__ import annotations

from typing import Any

import kombu.pools
from celery import Celery

from app.core.settings import Settings, get_settings

TRAIN_TASK = "dpaat.train"
EVALUATE_TASK = "dpaat.evaluate"
REAP_TASK = "dpaat.reap"
PREDICT_TASK = "dpaat.predict"
TASK_FOR_KIND = {"train": TRAIN_TASK, "evaluate": EVALUATE_TASK}

DEFAULT_QUEUE = "default"  # short work: the reaper
# Embedded mode: an in-process broker shared by the API's producer and the worker thread.
EMBEDDED_BROKER = "memory://localhost/"


def broker_url(settings: Settings) -> str:
    """The configured broker, or the in-process one of the embedded mode."""
    return settings.broker_url or EMBEDDED_BROKER


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration of a deployment."""
    transport: dict[str, Any] = {}
    if settings.embedded:
        transport["polling_interval"] = 0.05  # memory transport polls; default 1 s adds latency
    return {
        "broker_url": broker_url(settings),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        # JSON only: a pickled message would let whoever reaches the broker run code.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        # Long tasks: take one message at a time and acknowledge it when done, so an idle worker
        # gets the next job instead of a busy one holding it in its prefetch buffer.
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        # A worker lost mid-task (OOM, kill -9) is the reaper's business (lease expiry, retry
        # limit in the database): requeueing the message here would bypass the retry limit.
        "task_reject_on_worker_lost": False,
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {
            TRAIN_TASK: {"queue": settings.train_queue},
            EVALUATE_TASK: {"queue": settings.evaluate_queue},
            REAP_TASK: {"queue": DEFAULT_QUEUE},
            PREDICT_TASK: {"queue": settings.predict_queue},
        },
        "task_create_missing_queues": True,
        "beat_schedule": {
            "reap-jobs": {
                "task": REAP_TASK,
                "schedule": float(settings.reap_interval_seconds),
                # A reap that waited longer than one interval is superseded by the next one.
                "options": {"expires": float(settings.reap_interval_seconds)},
            }
        },
        # The in-memory scheduler: no schedule file to write in a read-only container.
        "beat_scheduler": "celery.beat:Scheduler",
        "worker_send_task_events": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def configure(app: Celery, settings: Settings) -> None:
    """(Re)apply ``settings`` to ``app`` (tests and the embedded runtime call it after changes)."""
    config = celery_config(settings)
    if app.conf.broker_url != config["broker_url"]:
        # Connections already pooled point at the old broker: drop them (Celery does the same
        # after a fork), so the next send opens one to the new broker. kombu keeps its pools in
        # a global registry keyed by broker: reset it too, or switching back to a broker used
        # before picks up its closed pool ("Acquire on closed pool") and every send fails.
        kombu.pools.reset()
        app._after_fork()
    app.conf.update(config)


celery_app = Celery("dpaat", include=["worker.tasks"])
configure(celery_app, get_settings())
