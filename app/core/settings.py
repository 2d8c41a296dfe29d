"""Service configuration: one pydantic-settings class, read from ``DPAAT_*`` environment variables.

``DATABASE_URL`` and ``BROKER_URL`` are also accepted without the prefix (docker-compose and most
hosting platforms set those names). No broker means the embedded mode: the same Celery tasks run
by a worker inside the service process.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/dpaat.db"


def default_data_roots() -> list[Path]:
    """The shared HAM10000 copy when present (DPAAT_DATA_ROOT, else ../shared/data/ham10000).

    Mirrors ``models.data.default_data_root`` without importing it: that module imports torch and
    the web process must start without it.
    """
    env = os.environ.get("DPAAT_DATA_ROOT")
    if env:
        if not Path(env).is_dir():
            raise NotADirectoryError(f"DPAAT_DATA_ROOT={env} is not a directory")
        return [Path(env).resolve()]
    candidates = [
        Path(__file__).resolve().parents[3] / "shared" / "data" / "ham10000",
        Path.cwd().parent / "shared" / "data" / "ham10000",
    ]
    return [c.resolve() for c in candidates if c.is_dir()][:1]


class Settings(BaseSettings):
    """Everything the API, the worker and the migrations need to know about the deployment."""

    model_config = SettingsConfigDict(env_prefix="DPAAT_", extra="ignore", populate_by_name=True)

    environment: Literal["development", "test", "production"] = "development"
    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("DPAAT_DATABASE_URL", "DATABASE_URL"),
    )
    # None -> embedded mode (tasks run by a worker thread inside the service process).
    broker_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DPAAT_BROKER_URL", "BROKER_URL")
    )
    artifact_dir: Path = Field(
        default=Path("./var/artifacts"),
        validation_alias=AliasChoices("DPAAT_ARTIFACT_DIR", "DPAAT_RESULT_DIR"),
    )
    # Issue 15: artifacts in S3-compatible object storage (docs/deployment.md). Unset: the
    # directory above. "s3://bucket/prefix": every artifact goes to the bucket; the processes then
    # share no filesystem. The endpoint (MinIO, Ceph...) and credentials also come from the standard
    # AWS names; left unset, boto3's own chain applies (~/.aws, an instance role).
    artifacts: str | None = Field(
        default=None, pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\\]*)?)?$"
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "DPAAT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
        ),
    )
    s3_region: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DPAAT_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    s3_access_key_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DPAAT_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DPAAT_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    )
    # The local read cache of each process on object storage (keyed by sha256, LRU beyond the
    # bound) and the local scratch folder where jobs work; neither is shared between hosts.
    cache_dir: Path = Path("./var/cache")
    cache_max_mb: int = Field(default=20480, gt=0)
    scratch_dir: Path = Path("./var/scratch")
    # Server directories an admin allows clients to register as datasets (nothing outside them).
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=default_data_roots)
    # ImageNet weights an admin placed for `pretrained: "imagenet"` (<dir>/<arch>.safetensors,
    # e.g. resnet18.safetensors, timm/resnet10t.safetensors); never downloaded. None: not offered.
    pretrained_dir: Path | None = None
    auto_migrate: bool = False  # apply Alembic migrations when the API starts
    # API keys: "auto" = on for the full stack (a non-SQLite database or a broker), off for the
    # embedded default. `dpaat serve`/`dpaat worker` refuse to run the full stack with auth off.
    auth: Literal["auto", "on", "off"] = "auto"

    # Per-owner quotas (0 = no limit): jobs queued, running or cancelling at once (429 beyond),
    # and megabytes of dataset archives + model weights uploaded in a rolling window.
    max_active_jobs: int = Field(default=16, ge=0)
    upload_quota_mb: int = Field(default=4096, ge=0)
    upload_quota_window_seconds: int = Field(default=3600, gt=0)

    # Upload limits (checked before the whole body is read).
    max_upload_mb: int = Field(default=512, gt=0)  # a dataset archive or a model's weights
    max_image_mb: int = Field(default=10, gt=0)  # one image for prediction
    max_batch_images: int = Field(default=16, gt=0)
    # Decompression-bomb limit, a hard error everywhere an image is decoded. Dermoscopy images
    # are at most ~24 Mpx (6000x4000, a camera-mounted dermatoscope; HAM10000 is 600x450): 25 Mpx
    # admits them and bounds one decoded RGB image to ~75 MB (Pillow's own default is 89 Mpx,
    # and only a warning below 179 Mpx).
    max_image_pixels: int = Field(default=25_000_000, gt=0)
    max_archive_entries: int = Field(default=50_000, gt=0)
    max_archive_extracted_mb: int = Field(default=4096, gt=0)
    # Issue 14: what training needs, checked at upload (with the split: every part non-empty).
    min_dataset_images: int = Field(default=6, ge=3)
    min_images_per_class: int = Field(default=2, ge=1)

    # Jobs.
    # Issue 14: a lost worker shows on its job within a lease plus a reap interval (~7 s), and
    # its job is re-queued one confirmation later, unless the worker beats again (a database
    # outage silences every heartbeat; a live worker beats within one once it is back).
    lease_seconds: int = Field(default=5, gt=0)
    heartbeat_seconds: int = Field(default=2, gt=0)
    lost_worker_confirm_seconds: float = Field(default=3.0, ge=0)
    max_retries: int = Field(default=3, ge=0)
    # A job queued this long without a worker is sent again (its message may have been lost).
    stale_queued_seconds: int = Field(default=300, gt=0)
    reap_interval_seconds: int = Field(default=2, gt=0)
    # Queues that must have a live worker for /health/ready to answer 200 (comma-separated,
    # e.g. "train,evaluate"); live workers per queue are reported either way (full stack).
    required_queues: str = ""
    train_queue: str = "train"
    evaluate_queue: str = "evaluate"

    # Prediction and streaming.
    predictor_cache_size: int = Field(default=4, gt=0)  # loaded models kept in memory (count)
    predict_cap: float = Field(default=16.0, ge=1, le=64)  # eps_star search cap, 1/255 units
    predict_steps: int = Field(default=10, gt=0, le=100)
    # --- predictions on the workers (issue 12; docs/decisions/predict-queue.md)
    predict_queue: str = "predict"
    predictor_cache_mb: int = Field(default=2048, gt=0)  # loaded models kept in memory (bytes)
    # A prediction not answered within this is answered 503 + Retry-After (no worker, overload).
    predict_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Requests waiting on the predict queue beyond which new ones get 503 at once (0: no bound).
    predict_max_queue: int = Field(default=256, ge=0)
    # Micro-batching in the worker: after the first request, wait at most this long for more
    # requests to the same model, and never put more than this many images in one batch.
    predict_batch_window_ms: float = Field(default=5.0, ge=0, le=1000)
    # 8: on a CPU the cost per image is lowest at 4-8 images (each image is replicated once per
    # radius, ~13 rows; larger batches are memory-bound: docs/benchmarks.md); raise it on a GPU.
    predict_batch_max_images: int = Field(default=8, gt=0, le=1024)
    sse_poll_seconds: float = Field(default=1.0, ge=0.01)  # DB poll rate of the progress stream
    sse_max_seconds: float = Field(default=3600.0, gt=0)  # a stream ends after this at the latest

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        """Accept a JSON list or an ``os.pathsep``-separated string from the environment."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [p for p in text.split(os.pathsep) if p]
        return value

    @field_validator("data_roots")
    @classmethod
    def _roots_absolute(cls, roots: list[Path]) -> list[Path]:
        resolved = [Path(r).expanduser().resolve() for r in roots]
        if any(r == Path(r.anchor) for r in resolved):
            raise ValueError("a filesystem root cannot be a data root: name the dataset folders")
        return resolved

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        # Outside development the artifact store must be an explicit, absolute location: a
        # relative default silently depends on the working directory of each process.
        if self.environment == "production":
            if self.object_storage:
                dirs = ("cache_dir", "scratch_dir")
                relative = [n for n in dirs if not getattr(self, n).is_absolute()]
                if relative:
                    names = ", ".join(f"DPAAT_{n.upper()}" for n in relative)
                    raise ValueError(f"{names} must be absolute paths in production")
            elif not self.artifact_dir.is_absolute():
                raise ValueError("DPAAT_ARTIFACT_DIR must be an absolute path in production")
        return self

    @property
    def object_storage(self) -> bool:
        """Artifacts in S3-compatible object storage (``DPAAT_ARTIFACTS=s3://...``)."""
        return bool(self.artifacts)

    @property
    def full_stack(self) -> bool:
        """A shared deployment: a database server (not SQLite) or a broker."""
        return not self.database_url.startswith("sqlite") or not self.embedded

    @property
    def auth_enabled(self) -> bool:
        """Whether requests must carry an API key (``auth`` resolved for this deployment)."""
        return self.auth == "on" or (self.auth == "auto" and self.full_stack)

    @property
    def embedded(self) -> bool:
        """True when no broker is configured (tasks run inside the service process)."""
        return not self.broker_url

    def queue_for(self, kind: str) -> str:
        """The Celery queue of a job kind."""
        return {
            "train": self.train_queue,
            "evaluate": self.evaluate_queue,
            "predict": self.predict_queue,
        }[kind]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()
