"""Robust predictions: the one service entry point, :meth:`PredictionService.predict`, that the API
route and the web pages call with sanitized images (``app.services.images.sanitize_image``).

Where the torch work runs (docs/decisions/predict-queue.md):
- full stack (a broker): the request goes by task name (``dpaat.predict``) to the predict queue;
  a ``dpaat worker --queues predict`` process batches it with concurrent requests for the same
  model and pushes the answer onto a Redis list that this process awaits (``BLPOP``, no polling, no
  database). The web process never imports torch.
- embedded default (no broker): the same batching code (``worker.predict.Batcher``) runs in this
  process; only the transport differs.

Nothing here imports torch. Radii are in 1/255 units.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from PIL import Image, ImageStat
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy.orm import Session

from app.core.settings import Settings
from app.services import models_registry
from app.services.errors import Invalid, Unavailable

DEFAULT_EPS = (0.5, 1.0, 2.0, 4.0, 8.0)
MIN_CAP, MAX_CAP = 1.0, 64.0  # eps_star search cap, 1/255 units
MAX_EPS = 64.0

# Warnings (documented in docs/prediction.md and the OpenAPI description of ``warnings``).
LOW_CONFIDENCE = 0.5  # top probability below this
MAX_ASPECT = 3.0  # HAM10000 photographs are 4:3; the model sees a square
UNIFORM_STD = 8.0  # grey-level standard deviation (0-255) below this: nothing to see
LESION_CONTRAST = 30  # grey levels darker than the median that count as lesion
MIN_LESION_FRACTION = 0.01  # lesion pixels below this fraction of the image
WARNINGS = {
    "low_confidence": f"the top probability is below {LOW_CONFIDENCE}",
    "near_uniform_image": "the image is nearly uniform: not a dermoscopy photograph",
    "extreme_aspect_ratio": f"width/height beyond {MAX_ASPECT}:1 (the model sees a square)",
    "tiny_lesion_area": f"under {MIN_LESION_FRACTION:.0%} of the image is darker than the skin",
    "flipped_above_cap": "an attack beyond the cap flips the prediction (see stable_at): the "
    "score only covers radii up to the cap",
}

# Batch sizes (images) of the histogram the workers fill.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


# ============================================================================ requests
@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to know of a model row (detached from any session, JSON-able)."""

    id: str
    sha256: str
    weights_uri: str  # resolved by each process against its own artifact store
    weights_format: str  # checkpoint | safetensors | onnx
    architecture: str
    classes: tuple[str, ...]
    image_size: int
    info: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{**data, "classes": tuple(data["classes"])})


@dataclass(frozen=True)
class PredictParams:
    """The attack budget of one request; requests with equal params can share a batch."""

    cap: float
    eps_list: tuple[float, ...]
    steps: int
    gradcam: bool

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "eps_list": list(self.eps_list)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PredictParams:
        return cls(**{**data, "eps_list": tuple(float(e) for e in data["eps_list"])})


def predict_params(
    settings: Settings,
    *,
    cap: float | None = None,
    steps: int | None = None,
    eps: Sequence[float] | None = None,
    gradcam: bool = False,
) -> PredictParams:
    """The request's parameters with the server's defaults, checked (``Invalid`` -> 422)."""
    cap = settings.predict_cap if cap is None else float(cap)
    if not math.isfinite(cap) or not MIN_CAP <= cap <= MAX_CAP:
        raise Invalid(
            f"cap must be between {MIN_CAP:g} and {MAX_CAP:g} (1/255 units), got {cap:g}: a "
            "smaller cap searches radii below one grey level, where a score means nothing"
        )
    eps_list = tuple(sorted({float(e) for e in eps})) if eps else DEFAULT_EPS
    if any(not math.isfinite(e) or not 0 < e <= MAX_EPS for e in eps_list):
        raise Invalid(f"eps values must be in (0, {MAX_EPS:g}] (1/255 units)")
    return PredictParams(cap, eps_list, int(steps or settings.predict_steps), bool(gradcam))


def model_spec(session: Session, model_id: str, owner: str) -> ModelSpec:
    """The spec of ``model_id`` as ``owner`` sees it (``NotFound`` otherwise).

    Ends the session's transaction, which gives its connection back to the pool: a prediction
    then waits seconds for its answer, and 32 waiting requests holding a connection each would
    exhaust the pool and stall every other request (measured: GET /jobs/{id} p50 1.2 s)."""
    model = models_registry.get_model(session, model_id, owner)
    spec = ModelSpec(
        id=model.id,
        sha256=model.checkpoint_sha256,
        weights_uri=model.weights_uri,
        weights_format=model.weights_format,
        architecture=model.architecture,
        classes=tuple(model.classes),
        image_size=model.image_size,
        info=dict(model.info),
    )
    session.rollback()  # read only: nothing to keep
    return spec


# ============================================================================ warnings
def input_warnings(png: bytes) -> list[str]:
    """Warnings about the picture itself (a sanitized image): does it look like a dermoscopy
    photograph at all? Cheap checks on a 64x64 grey thumbnail."""
    with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
        grey = im.convert("L").resize((64, 64), Image.Resampling.BILINEAR)
    out = []
    if max(width, height) / min(width, height) > MAX_ASPECT:
        out.append("extreme_aspect_ratio")
    if ImageStat.Stat(grey).stddev[0] < UNIFORM_STD:
        out.append("near_uniform_image")
    hist = grey.histogram()
    total, seen, median = sum(hist), 0, 0
    for level, count in enumerate(hist):
        seen += count
        if seen * 2 >= total:
            median = level
            break
    dark = sum(hist[: max(0, median - LESION_CONTRAST)])
    if dark < MIN_LESION_FRACTION * total:
        out.append("tiny_lesion_area")
    return out


def finish(result: dict[str, Any], image_warnings: Iterable[str]) -> dict[str, Any]:
    """A worker's result with ``top_probability`` and every warning that applies."""
    probabilities: dict[str, float] = result["probabilities"]
    top = max(probabilities.values())
    warnings = list(image_warnings)
    if top < LOW_CONFIDENCE:
        warnings.insert(0, "low_confidence")
    rob = result["robustness"]
    if rob["eps_star"] is None and not all(rob["stable_at"].values()):
        warnings.append("flipped_above_cap")
    robustness = {k: rob[k] for k in ("eps_star", "stable_at", "score", "cap")}
    return {**result, "robustness": robustness, "top_probability": top, "warnings": warnings}


# ============================================================================ worker statistics
def reply_key(queue: str, request_id: str) -> str:
    return f"dpaat:predict:{queue}:reply:{request_id}"


def stats_key(queue: str) -> str:
    return f"dpaat:predict:{queue}:stats"


def bucket_of(images: int) -> str:
    return str(next((b for b in BATCH_BUCKETS if images <= b), "inf"))


class LocalStats:
    """Batch statistics kept in this process (the embedded worker); ``RedisStats`` in
    ``worker.predict`` writes the same fields to Redis for the worker processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, float] = {}

    def record(self, requests: int, images: int, seconds: float) -> None:
        with self._lock:
            for name, value in (
                ("batches", 1),
                ("requests", requests),
                ("images", images),
                ("seconds", seconds),
                (f"le_{bucket_of(images)}", 1),
            ):
                self._data[name] = self._data.get(name, 0) + value

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._data)


def _decode_stats(raw: dict[Any, Any]) -> dict[str, float]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()}


# ============================================================================ the service
class PredictionService:
    """Predict sanitized images with a model: on the workers (full stack) or in this process
    (embedded), with the same answer, the same timeout and the same metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.queue = settings.predict_queue
        self._batcher: Any = None  # the embedded worker (worker.predict.Batcher)
        self._batcher_lock = threading.Lock()
        self._local_stats = LocalStats()
        self._redis: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._sync_redis: Any = None
        self._snapshot: dict[str, float] = {}
        self._depth = 0.0
        registry = registry or CollectorRegistry()
        self.latency = Histogram(
            "dpaat_predict_duration_seconds",
            "Prediction requests: time from the sanitized images to the answer.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.outcomes = Counter(
            "dpaat_predict_requests",
            "Prediction requests by outcome (ok, timeout, overloaded, error).",
            ["outcome"],
            registry=registry,
        )
        registry.register(self)  # a collector: collect() below

    # ------------------------------------------------------------------ entry point
    async def predict(
        self, spec: ModelSpec, images: list[bytes], params: PredictParams
    ) -> list[dict[str, Any]]:
        """One result per image, in order: ``class``, ``probabilities``, ``top_probability``,
        ``robustness`` (eps_star, stable_at, score, cap), ``gradcam_png`` (base64 or None) and
        ``warnings``. 503 (``Unavailable`` with retry_after) when no answer comes in time."""
        if not images:
            return []
        start = time.perf_counter()
        outcome = "error"
        try:
            image_warnings = await anyio.to_thread.run_sync(
                lambda: [input_warnings(b) for b in images]
            )
            if self.settings.embedded:
                results = await self._in_process(spec, images, params)
            else:
                results = await self._on_workers(spec, images, params)
            outcome = "ok"
            return [finish(r, w) for r, w in zip(results, image_warnings, strict=True)]
        except Unavailable as e:
            outcome = "overloaded" if "queue is full" in e.message else "timeout"
            raise
        finally:
            self.outcomes.labels(outcome).inc()
            if outcome == "ok":
                self.latency.observe(time.perf_counter() - start)

    def _timeout_error(self) -> Unavailable:
        t = self.settings.predict_timeout_seconds
        return Unavailable(
            f"no prediction worker answered within {t:g} s (none running, or all busy); "
            "try again later",
            retry_after=math.ceil(min(t, 30)),
        )

    # ------------------------------------------------------------------ embedded
    def cached(self) -> list[str]:
        """sha256 of the models loaded in this process (embedded mode; else empty)."""
        return [] if self._batcher is None else list(self._batcher.cache.cached())

    def batcher(self) -> Any:
        """The in-process worker (embedded mode), started on the first prediction."""
        with self._batcher_lock:
            if self._batcher is None:
                from app.services.storage import open_store
                from worker.predict import Batcher, ModelCache

                self._batcher = Batcher(
                    ModelCache(
                        open_store(self.settings),
                        self.settings.predictor_cache_size,
                        self.settings.predictor_cache_mb << 20,
                    ),
                    window_ms=self.settings.predict_batch_window_ms,
                    max_images=self.settings.predict_batch_max_images,
                    record=self._local_stats.record,
                )
            return self._batcher

    async def _in_process(
        self, spec: ModelSpec, images: list[bytes], params: PredictParams
    ) -> list[dict[str, Any]]:
        batcher = await anyio.to_thread.run_sync(self.batcher)  # the first one imports torch
        future = batcher.submit(spec, images, params)
        try:
            results: list[dict[str, Any]] = await asyncio.wait_for(
                asyncio.wrap_future(future), self.settings.predict_timeout_seconds
            )
        except TimeoutError:
            raise self._timeout_error() from None
        return results

    # ------------------------------------------------------------------ full stack
    async def _client(self) -> Any:
        """An asyncio Redis client on the broker, one per event loop."""
        loop = asyncio.get_running_loop()
        if self._redis is None or self._redis[0] is not loop:
            import redis.asyncio as aioredis

            url = self.settings.broker_url or ""
            if not url.startswith(("redis://", "rediss://")):
                raise Unavailable("predictions on workers need a Redis broker (BROKER_URL)")
            # BLPOP blocks up to the prediction timeout: the socket must wait longer than that.
            timeout = self.settings.predict_timeout_seconds + 10
            client = aioredis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=timeout)
            self._redis = (loop, client)
        return self._redis[1]

    def _send(self, payload: dict[str, Any]) -> None:
        from worker.celery_app import PREDICT_TASK, celery_app

        celery_app.send_task(
            PREDICT_TASK,
            args=[payload],
            queue=self.queue,
            # A message still queued when its client has been answered 503 is dropped unread.
            expires=self.settings.predict_timeout_seconds,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        )

    async def _on_workers(
        self, spec: ModelSpec, images: list[bytes], params: PredictParams
    ) -> list[dict[str, Any]]:
        import base64

        from redis.exceptions import RedisError

        timeout = self.settings.predict_timeout_seconds
        key = reply_key(self.queue, uuid.uuid4().hex)
        payload = {
            "reply_to": key,
            "deadline": time.time() + timeout,
            "model": spec.to_json(),
            "params": params.to_json(),
            "images": [base64.b64encode(b).decode() for b in images],
        }
        client = await self._client()
        try:
            limit = self.settings.predict_max_queue
            if limit and await client.llen(self.queue) >= limit:
                raise Unavailable(
                    f"the prediction queue is full ({limit} requests waiting); try again later",
                    retry_after=5,
                )
            await anyio.to_thread.run_sync(self._send, payload)
            got = await client.blpop([key], timeout=timeout)
        except (RedisError, OSError) as e:
            raise Unavailable(f"the broker is unavailable: {type(e).__name__}") from None
        except Exception as e:  # kombu's errors when sending (OperationalError and others)
            if isinstance(e, Unavailable):
                raise
            raise Unavailable(f"the broker is unavailable: {type(e).__name__}: {e}") from None
        if got is None:
            raise self._timeout_error()
        reply = json.loads(got[1])
        if "error" in reply:
            kind, message = reply["error"]["kind"], reply["error"]["message"]
            if kind == "invalid":
                raise Invalid(message)
            if kind == "unavailable":
                raise Unavailable(message)
            raise RuntimeError(f"prediction failed on the worker: {message}")
        results: list[dict[str, Any]] = reply["results"]
        return results

    # ------------------------------------------------------------------ metrics
    def refresh_metrics(self) -> None:
        """Read queue depth and batch statistics (blocking: call from a thread)."""
        if self.settings.embedded:
            self._snapshot = self._local_stats.snapshot()
            self._depth = float(self._batcher.pending() if self._batcher is not None else 0)
            return
        try:
            if self._sync_redis is None:
                import redis

                self._sync_redis = redis.Redis.from_url(
                    self.settings.broker_url or "", socket_timeout=3, socket_connect_timeout=3
                )
            pipe = self._sync_redis.pipeline()
            pipe.llen(self.queue)
            pipe.hgetall(stats_key(self.queue))
            depth, raw = pipe.execute()
            self._depth, self._snapshot = float(depth), _decode_stats(raw)
        except Exception:  # metrics answer even when Redis does not (last values stay)
            return

    def collect(self) -> Iterable[Any]:
        """Prometheus collector: the figures read by :meth:`refresh_metrics`."""
        depth = GaugeMetricFamily(
            "dpaat_predict_queue_depth", "Prediction requests waiting for a worker."
        )
        depth.add_metric([], self._depth)
        yield depth
        s = self._snapshot
        cumulative, buckets = 0.0, []
        for b in BATCH_BUCKETS:
            cumulative += s.get(f"le_{b}", 0.0)
            buckets.append((str(float(b)), cumulative))
        buckets.append(("+Inf", cumulative + s.get("le_inf", 0.0)))
        sizes = HistogramMetricFamily(
            "dpaat_predict_batch_images",
            "Images per batch computed by the prediction workers (the count is the number of "
            "batches).",
        )
        sizes.add_metric([], buckets, sum_value=s.get("images", 0.0))
        yield sizes
        requests = GaugeMetricFamily(
            "dpaat_predict_batched_requests",
            "Prediction requests the workers have served in batches (all workers).",
        )
        requests.add_metric([], s.get("requests", 0.0))
        yield requests
        seconds = GaugeMetricFamily(
            "dpaat_predict_batch_seconds", "Time the workers spent computing batches."
        )
        seconds.add_metric([], s.get("seconds", 0.0))
        yield seconds

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis[1].aclose()
            self._redis = None
        if self._batcher is not None:
            self._batcher.stop()
