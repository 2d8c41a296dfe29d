"""The database schema (SQLAlchemy 2 typed ORM). Alembic migrations in ``migrations/`` must match
it exactly; ``tests/test_migrations.py`` fails when they drift apart.

Ids are UUID hex strings generated here, so a job id can travel in a Celery message before anything
else is known. Every row a client can see carries its ``owner``; another owner gets 404.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names: Alembic can only alter or drop what it can name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    """A new row id (32 hex characters)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware in UTC.

    Postgres keeps the zone (``timestamptz``); SQLite stores naive text, so naive values read back
    are UTC by construction (everything written goes through this type).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use timezone-aware UTC values")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    """The states of a job (see ``app.services.jobs`` for the transitions)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancel_requested = "cancel_requested"
    cancelled = "cancelled"

    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
# Jobs that still hold (or will hold) a worker: their inputs must not be deleted.
ACTIVE_STATUSES = frozenset({JobStatus.queued, JobStatus.running, JobStatus.cancel_requested})


class JobKind(enum.StrEnum):
    train = "train"
    evaluate = "evaluate"


def _in_list(column: str, values: list[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Dataset(Base):
    """A labelled image collection: an uploaded archive extracted into the artifact store, or a
    server directory under one of the admin-configured data roots."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))  # upload | registered
    # ham10000 | isic2019 | isic2020 | class_folders
    layout: Mapped[str] = mapped_column(String(16))
    # upload: an artifact URI of the extracted directory; registered: an absolute server path.
    root: Mapped[str] = mapped_column(String(1000))
    manifest_uri: Mapped[str] = mapped_column(String(1000))  # the split every run reuses
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list[str]] = mapped_column(JSON)
    class_counts: Mapped[dict[str, Any]] = mapped_column()
    num_samples: Mapped[int] = mapped_column(Integer)
    has_masks: Mapped[bool] = mapped_column()
    archive_sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (CheckConstraint(_in_list("source", ["upload", "registered"]), name="source"),)


class Job(Base):
    """A training or evaluation job; ``status`` moves only through ``app.services.jobs``."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued, index=True)
    params: Mapped[dict[str, Any]] = mapped_column()
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    # Not a foreign key: models reference their training job, and models are never deleted.
    model_id: Mapped[str | None] = mapped_column(String(32), index=True)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    retries: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime] = mapped_column(default=utcnow)  # last (re)send to the queue
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    epochs: Mapped[list[JobEpoch]] = relationship(
        back_populates="job", order_by="JobEpoch.epoch", cascade="all, delete-orphan"
    )

    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        CheckConstraint(_in_list("status", [s.value for s in JobStatus]), name="status"),
        CheckConstraint(_in_list("kind", [k.value for k in JobKind]), name="kind"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )


class JobEpoch(Base):
    """One epoch's metrics of a training job (loss, accuracies, and DPAAT's tau / eps histogram)."""

    __tablename__ = "job_epochs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="epochs")

    __table_args__ = (UniqueConstraint("job_id", "epoch"),)


class Model(Base):
    """A classifier that can be evaluated and used for prediction: trained here or uploaded."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))  # trained | uploaded
    weights_format: Mapped[str] = mapped_column(String(16))  # checkpoint | safetensors
    architecture: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list[str]] = mapped_column(JSON)
    image_size: Mapped[int] = mapped_column(Integer)
    training_method: Mapped[str | None] = mapped_column(String(32))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    weights_uri: Mapped[str] = mapped_column(String(1000))
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), unique=True
    )
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (CheckConstraint(_in_list("source", ["trained", "uploaded"]), name="source"),)


class Artifact(Base):
    """A file in the artifact store, recorded by URI, size and sha256."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    uri: Mapped[str] = mapped_column(String(1000))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # checkpoint | weights | report_json | report_md | report_plot | manifest | archive | other
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    model_id: Mapped[str | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """A robustness report of a model on a dataset (the report contract of docs/dpaat.md)."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), unique=True
    )
    report: Mapped[dict[str, Any]] = mapped_column()
    verdict: Mapped[str] = mapped_column(String(16))  # pass | warn | fail
    report_md_uri: Mapped[str | None] = mapped_column(String(1000))
    plot_uri: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Audit(Base):
    """A CI audit: an evaluation job plus thresholds (and optionally a baseline audit to compare
    with). ``result`` holds the threshold and regression results, computed once when the job has
    finished and never recomputed, so re-reading an audit always gives the same answer."""

    __tablename__ = "audits"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), unique=True
    )
    request: Mapped[dict[str, Any]] = mapped_column()  # the request body, for idempotent replays
    thresholds: Mapped[list[Any]] = mapped_column(JSON)
    # {"requested": {...}, "audit_id": <resolved baseline audit>, "max_drop": 0.02} or null
    baseline: Mapped[dict[str, Any] | None] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(16), default="pending")  # see AUDIT_OUTCOMES
    passed: Mapped[bool | None] = mapped_column()
    result: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        CheckConstraint(
            _in_list("outcome", ["pending", "passed", "failed", "error"]), name="outcome"
        ),
    )


class ApiKey(Base):
    """An API key: the client holds ``dpk_<key_id>_<secret>``; only the secret's sha256 is kept.

    Revoked keys stay (``revoked_at`` set) so ``dpaat keys list`` shows who had access when.
    """

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class UploadUsage(Base):
    """Bytes an owner uploaded (dataset archives, model weights), one row per stored upload: the
    ledger of the rolling upload quota. Rows older than the window are deleted as new ones come."""

    __tablename__ = "upload_usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_upload_usage_owner_created_at", "owner", "created_at"),)


class UiSession(Base):
    """A signed-in browser of the web dashboard (``/ui``). The cookie holds a random token; only
    its sha256 is kept. ``key_id`` ties the session to the API key it was opened with, so revoking
    the key ends the session (None: authentication off, the local owner)."""

    __tablename__ = "ui_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(32))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
