"""Live Celery workers per queue, for readiness (issue 14). Asks the workers themselves over the
broker (``inspect().active_queues()``): a worker that was SIGKILLed does not answer. Celery is
imported on first use, as ``dispatch`` does, so the web process starts without it."""

from __future__ import annotations

import threading
import time
from typing import Any

_CACHE_SECONDS = 2.0
_lock = threading.Lock()
_cached: tuple[float, dict[str, int]] | None = None


def live_workers_per_queue(timeout: float = 1.0) -> dict[str, int]:
    """``{queue: number of live workers consuming it}`` (cached for two seconds: readiness is
    polled, and each ask waits ``timeout`` for the replies)."""
    global _cached
    with _lock:
        if _cached is not None and time.monotonic() - _cached[0] < _CACHE_SECONDS:
            return dict(_cached[1])
        from worker.celery_app import celery_app

        replies: dict[str, Any] = celery_app.control.inspect(timeout=timeout).active_queues() or {}
        counts: dict[str, int] = {}
        for queues in replies.values():
            for queue in queues or []:
                name = str(queue.get("name", ""))
                counts[name] = counts.get(name, 0) + 1
        _cached = (time.monotonic(), counts)
        return dict(counts)


def reset_cache() -> None:
    global _cached
    with _lock:
        _cached = None
