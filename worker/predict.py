"""Predictions in a worker: a bounded cache of loaded models and a micro-batching loop.

``Batcher.submit`` queues a request and returns a future. One thread takes the first waiting
request, waits at most ``window_ms`` for more (never past ``max_images`` images), groups what it
has by model and attack budget, and runs ``models.api.predict`` once per group: the eps* search of
16 images is one batched PGD run, not 16. The robustness search draws one random start pattern
for every image, so an image's answer does not depend on the images batched with it. One thread
per process computes: attacks switch a model's parameters to frozen and back, which is not safe
to interleave, and a second batch would only compete for the same cores.

Used by the ``dpaat.predict`` Celery task (``worker.tasks``: ``serve`` below) and, in the
embedded default, by ``app.services.prediction`` in the API process. torch is imported on first
use, in the batching thread.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.services.errors import Invalid, ServiceError, Unavailable
from app.services.prediction import ModelSpec, PredictParams, bucket_of, stats_key
from app.services.storage import ArtifactMissing, ArtifactStore, Storage, open_store

log = logging.getLogger(__name__)


# ============================================================================ model cache
class ModelCache:
    """Loaded models keyed by the weights' sha256, least recently used evicted first once there
    are more than ``max_models`` or their tensors take more than ``max_bytes`` (the model just
    loaded always stays)."""

    def __init__(self, store: Storage | Path, max_models: int, max_bytes: int) -> None:
        self.store = ArtifactStore(store) if isinstance(store, Path) else store
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._models: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times weights were read (a warm prediction reads none)

    def cached(self) -> list[str]:
        """sha256 of the models in memory, least recently used first."""
        with self._lock:
            return list(self._models)

    def bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._models.values())

    def get(self, spec: ModelSpec) -> Any:
        with self._lock:
            if spec.sha256 in self._models:
                self._models.move_to_end(spec.sha256)
                return self._models[spec.sha256][0]
        loaded = self._load(spec)
        model = loaded.model
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        with self._lock:
            self.loads += 1
            self._models[spec.sha256] = (loaded, size)
            while len(self._models) > 1 and (
                len(self._models) > self.max_models
                or sum(n for _, n in self._models.values()) > self.max_bytes
            ):
                self._models.popitem(last=False)
        return loaded

    def _load(self, spec: ModelSpec) -> Any:
        try:
            import models.api as ml
        except ImportError as e:  # installed without the ML extra
            raise Unavailable(f"prediction is unavailable on this worker: {e}") from e
        try:  # on object storage: from this host's cache, downloaded once
            path = self.store.local_path(spec.weights_uri, spec.sha256)
        except ArtifactMissing as e:
            raise Unavailable(
                f"the weights of model {spec.id} are missing from the artifact store"
            ) from e
        info = None
        if spec.weights_format != "checkpoint":  # an uploaded model (safetensors or ONNX)
            info = {
                **spec.info,
                "arch": spec.architecture,
                "classes": list(spec.classes),
                "image_size": spec.image_size,
            }
        try:
            loaded = ml.load_model(path, info=info)
        except ValueError as e:
            raise Invalid(f"model {spec.id} cannot be loaded: {e}") from e
        if loaded.sha256 != spec.sha256:
            raise Invalid(f"the weights of model {spec.id} do not match their recorded sha256")
        return loaded


# ============================================================================ batching
@dataclass
class _Request:
    spec: ModelSpec
    images: list[bytes]
    params: PredictParams
    future: Future[list[dict[str, Any]]] = field(default_factory=Future)

    @property
    def group(self) -> tuple[str, PredictParams]:
        return (self.spec.sha256, self.params)


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    png = result.get("gradcam_png")
    return {**result, "gradcam_png": base64.b64encode(png).decode() if png else None}


class Batcher:
    """Groups concurrent requests into batches (see the module docstring)."""

    def __init__(
        self,
        cache: ModelCache,
        *,
        window_ms: float,
        max_images: int,
        record: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.cache = cache
        self.window = window_ms / 1000.0
        self.max_images = max_images
        self.record = record
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._carry: deque[_Request] = deque()  # taken but left for the next batch (over size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches: list[int] = []  # requests per batch, for tests (bounded below)

    def pending(self) -> int:
        return self._queue.qsize() + len(self._carry)

    def submit(
        self, spec: ModelSpec, images: list[bytes], params: PredictParams
    ) -> Future[list[dict[str, Any]]]:
        """Queue a request; the future gives one JSON-able result per image, or raises."""
        request = _Request(spec, images, params)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="dpaat-predict-batcher", daemon=True
                )
                self._thread.start()
        self._queue.put(request)
        return request.future

    def stop(self) -> None:
        self._queue.put(None)

    def _next(self, timeout: float | None) -> _Request | None:
        if self._carry:
            return self._carry.popleft()
        return self._queue.get(timeout=timeout)

    def _take(self) -> list[_Request] | None:
        """The next batch: the first request, then whatever arrives within the window."""
        first = self._next(None)
        if first is None:
            return None
        batch, images = [first], len(first.images)
        deadline = time.monotonic() + self.window
        while images < self.max_images:
            try:
                item = self._next(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:  # stop after this batch
                self._queue.put(None)
                break
            if images + len(item.images) > self.max_images:
                self._carry.append(item)
                break
            batch.append(item)
            images += len(item.images)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            groups: dict[tuple[str, PredictParams], list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.group, []).append(request)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[_Request]) -> None:
        import models.api as ml

        start = time.perf_counter()
        images = [image for r in group for image in r.images]
        params = group[0].params
        try:
            loaded = self.cache.get(group[0].spec)
            results = ml.predict(
                loaded,
                images,
                cap=params.cap,
                eps_list=params.eps_list,
                steps=params.steps,
                gradcam=params.gradcam,
            )
        except Exception as e:
            if len(group) > 1 and not isinstance(e, ServiceError):
                # One request's fault must not fail the others: answer each on its own.
                for request in group:
                    self._run([request])
                return
            for request in group:
                request.future.set_exception(e)
            return
        seconds = time.perf_counter() - start
        self.batches = [*self.batches[-999:], len(group)]
        if self.record is not None:
            try:
                self.record(len(group), len(images), seconds)
            except Exception as e:  # statistics never fail a prediction
                log.warning("could not record prediction batch statistics: %s", e)
        offset = 0
        for request in group:
            n = len(request.images)
            request.future.set_result([_jsonable(r) for r in results[offset : offset + n]])
            offset += n


# ============================================================================ the Celery side
class RedisStats:
    """Batch statistics of every worker, summed in one Redis hash (read by the API's /metrics)."""

    def __init__(self, client: Any, queue_name: str) -> None:
        self.client = client
        self.key = stats_key(queue_name)

    def record(self, requests: int, images: int, seconds: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.key, "batches", 1)
        pipe.hincrby(self.key, "requests", requests)
        pipe.hincrby(self.key, "images", images)
        pipe.hincrbyfloat(self.key, "seconds", seconds)
        pipe.hincrby(self.key, f"le_{bucket_of(images)}", 1)
        pipe.execute()


_process: tuple[Batcher, Any] | None = None
_process_lock = threading.Lock()
REPLY_TTL_SECONDS = 120  # an answer nobody collected (the client gave up) disappears


def process_batcher() -> tuple[Batcher, Any]:
    """This worker process's batcher and Redis client (made on the first task)."""
    global _process
    with _process_lock:
        if _process is None:
            import redis

            from app.core.settings import get_settings
            from app.services.images import enforce_pixel_limit

            settings = get_settings()
            enforce_pixel_limit(settings.max_image_pixels)
            client = redis.Redis.from_url(settings.broker_url or "")
            batcher = Batcher(
                ModelCache(
                    open_store(settings),
                    settings.predictor_cache_size,
                    settings.predictor_cache_mb << 20,
                ),
                window_ms=settings.predict_batch_window_ms,
                max_images=settings.predict_batch_max_images,
                record=RedisStats(client, settings.predict_queue).record,
            )
            _process = (batcher, client)
        return _process


def serve(payload: dict[str, Any]) -> str:
    """Answer one ``dpaat.predict`` message: compute (batched) and push the reply to the list
    the API awaits. Returns what happened, for the log."""
    import json

    remaining = float(payload["deadline"]) - time.time()
    if remaining <= 0:
        return "expired"  # the client has already been answered 503
    batcher, client = process_batcher()
    future = batcher.submit(
        ModelSpec.from_json(payload["model"]),
        [base64.b64decode(s) for s in payload["images"]],
        PredictParams.from_json(payload["params"]),
    )
    try:
        reply: dict[str, Any] = {"results": future.result(timeout=remaining)}
    except FutureTimeout:
        return "expired"
    except Invalid as e:
        reply = {"error": {"kind": "invalid", "message": e.message}}
    except Unavailable as e:
        reply = {"error": {"kind": "unavailable", "message": e.message}}
    except Exception as e:
        log.exception("prediction failed")
        reply = {"error": {"kind": "internal", "message": f"{type(e).__name__}: {e}"}}
    key = payload["reply_to"]
    pipe = client.pipeline(transaction=False)
    pipe.rpush(key, json.dumps(reply))
    pipe.expire(key, REPLY_TTL_SECONDS)
    pipe.execute()
    return "error" if "error" in reply else "ok"
