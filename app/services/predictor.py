"""Prediction in the web process: ``models.api`` is imported on the first prediction (never at
start), loaded models are kept in a bounded LRU cache, and one model serves one request at a time
(attacks switch the model's parameters to frozen and back, which is not safe to interleave).

Callers run :meth:`Predictor.predict` in a thread pool: it is CPU-bound torch work.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from app.services.errors import Invalid, Unavailable


@dataclass(frozen=True)
class ModelSpec:
    """What the predictor needs to know of a model row (detached from any session)."""

    id: str
    sha256: str
    weights_path: Path
    weights_format: str  # checkpoint | safetensors
    architecture: str
    classes: tuple[str, ...]
    image_size: int
    info: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def _load(spec: ModelSpec) -> Any:
    """A ``models.api.LoadedModel`` for the spec (imports torch)."""
    try:
        import models.api as ml
    except ImportError as e:  # the server was installed without the ML extra
        raise Unavailable(f"prediction is unavailable on this server: {e}") from e
    if not spec.weights_path.is_file():
        raise Unavailable(f"the weights of model {spec.id} are missing from the artifact store")
    info = None
    if spec.weights_format != "checkpoint":  # an uploaded safetensors model and its description
        info = {
            **spec.info,
            "arch": spec.architecture,
            "classes": list(spec.classes),
            "image_size": spec.image_size,
        }
    try:
        return ml.load_model(spec.weights_path, info=info)
    except ValueError as e:
        raise Invalid(f"model {spec.id} cannot be loaded: {e}") from e


class Predictor:
    """Loads models on demand and keeps the ``capacity`` most recently used ones."""

    def __init__(self, capacity: int = 4, concurrency: int = 2) -> None:
        self.capacity = capacity
        # Predictions computed at once (CPU-bound torch work; more than the cores only queues
        # inside the threads); the API awaits a token before taking a thread.
        self.limiter = anyio.CapacityLimiter(concurrency)
        self._cache: OrderedDict[tuple[str, str], tuple[Any, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self) -> list[str]:
        """Ids of the models in memory, least recently used first."""
        with self._lock:
            return [key[0] for key in self._cache]

    def _get(self, spec: ModelSpec) -> tuple[Any, threading.Lock]:
        key = (spec.id, spec.sha256)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            # Loading under the lock: two first requests for one model load it once.
            entry = (_load(spec), threading.Lock())
            self._cache[key] = entry
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return entry

    def predict(
        self,
        spec: ModelSpec,
        images: list[bytes],
        *,
        cap: float,
        eps_list: tuple[float, ...],
        steps: int,
        gradcam: bool,
    ) -> list[dict[str, Any]]:
        """``models.api.predict`` on sanitized image bytes (see its docstring for the fields)."""
        import models.api as ml

        loaded, lock = self._get(spec)
        with lock:
            return ml.predict(
                loaded, images, cap=cap, eps_list=eps_list, steps=steps, gradcam=gradcam
            )
