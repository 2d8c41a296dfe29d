"""Submitting jobs: check what a request refers to, commit the job row, then send its task.

The row is committed before the message is sent, so a worker never receives a job it cannot
find; a send that fails is left to the reaper (the job stays queued and is re-sent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from app.db.tables import Job
from app.services import datasets, job_params, jobs, models_registry, quotas
from app.services.errors import Conflict, Invalid

log = logging.getLogger(__name__)

Dispatcher = Callable[[str, str], None]


def _send(dispatcher: Dispatcher, job: Job) -> None:
    try:
        dispatcher(job.id, job.kind)
    except Exception:  # the job is safe in the database; the reaper re-sends it
        log.exception("job %s: could not send its task; the reaper will re-send it", job.id)


def submit_train(
    session: Session,
    dispatcher: Dispatcher,
    *,
    owner: str,
    params: dict[str, Any],
    idempotency_key: str | None,
    max_active_jobs: int = 0,
) -> tuple[Job, bool]:
    """Queue a training job (``params`` = a validated ``TrainJobRequest`` as JSON)."""
    if (job := _replayed(session, "train", owner, params, idempotency_key)) is not None:
        return job, False
    ds = (
        datasets.get_dataset(session, params["dataset_id"], owner)
        if params.get("dataset_id")
        else None
    )
    if params.get("init_model_id"):
        _check_init_model(session, owner, params, None if ds is None else list(ds.classes))
    if params.get("pretrained") == "imagenet":
        job_params.imagenet_weights(str((params.get("config") or {}).get("arch", "small_cnn")))
    if params.get("reference_model_id"):
        ref = models_registry.get_model(session, params["reference_model_id"], owner)
        if ref.weights_format != "checkpoint" or ref.training_method != "standard":
            raise Invalid("reference_model_id must name a 'standard' model trained by this service")
    return _submit(session, dispatcher, "train", owner, params, idempotency_key, max_active_jobs)


def _check_init_model(
    session: Session, owner: str, params: dict[str, Any], classes: list[str] | None
) -> None:
    """Fail fast: the model exists for this owner, can be fine-tuned, and has the dataset's
    classes (or the request replaces the head)."""
    model = models_registry.get_model(session, params["init_model_id"], owner)
    job_params.check_can_finetune(model)
    if classes is not None and list(model.classes) != classes and not params.get("replace_head"):
        raise Invalid(
            f"init_model_id: the dataset's classes {classes} differ from the model's "
            f"{list(model.classes)}; set replace_head: true to train a fresh final layer"
        )


def submit_evaluate(
    session: Session,
    dispatcher: Dispatcher,
    *,
    owner: str,
    params: dict[str, Any],
    idempotency_key: str | None,
    max_active_jobs: int = 0,
) -> tuple[Job, bool]:
    """Queue an evaluation job (``params`` = a validated ``EvaluateJobRequest`` as JSON)."""
    if (job := _replayed(session, "evaluate", owner, params, idempotency_key)) is not None:
        return job, False
    model = models_registry.get_model(session, params["model_id"], owner)
    if model.weights_format != "checkpoint" and not params.get("dataset_id"):
        # an uploaded model records no training data to fall back on
        raise Invalid("evaluating an uploaded model needs a dataset_id")
    if (
        not params.get("dataset_id")
        and model.dataset_id is None
        and _trained_on_a_dataset(session, model.job_id)
    ):
        # Refused now rather than failing in the worker (issue 14): the data is gone.
        raise Conflict(
            f"the dataset model {model.id} was trained on has been deleted; "
            "name a dataset_id to evaluate it on"
        )
    if params.get("dataset_id"):
        ds = datasets.get_dataset(session, params["dataset_id"], owner)
        if list(ds.classes) != list(model.classes):
            raise Invalid(
                f"the dataset's classes {ds.classes} differ from the model's {model.classes}"
            )
    return _submit(session, dispatcher, "evaluate", owner, params, idempotency_key, max_active_jobs)


def _trained_on_a_dataset(session: Session, job_id: str | None) -> bool:
    """Whether the training job of a model named a dataset (else it trained on generated data,
    which its checkpoint can regenerate)."""
    job = session.get(Job, job_id) if job_id else None
    return job is not None and bool((job.params or {}).get("dataset_id"))


def _replayed(
    session: Session, kind: str, owner: str, params: dict[str, Any], key: str | None
) -> Job | None:
    """A retried submit gets its job back before anything else is checked (the dataset it named
    may be gone by now; the answer must not change)."""
    if key is None:
        return None
    return jobs.existing_for_key(session, owner=owner, key=key, kind=kind, params=params)


def _submit(
    session: Session,
    dispatcher: Dispatcher,
    kind: str,
    owner: str,
    params: dict[str, Any],
    idempotency_key: str | None,
    max_active_jobs: int = 0,
) -> tuple[Job, bool]:
    # After the idempotent replay (a retry gets its job even at the limit), before the insert.
    quotas.check_active_jobs(session, owner, max_active_jobs)
    job, created = jobs.submit_job(
        session, owner=owner, kind=kind, params=params, idempotency_key=idempotency_key
    )
    if created:
        _send(dispatcher, job)
    return job, created
