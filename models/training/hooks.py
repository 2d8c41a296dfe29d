"""Callbacks of the training loop: progress reporting and cooperative cancellation."""

from __future__ import annotations

from typing import Any


class TrainingHooks:
    """No-op callbacks; subclass and override what you need.

    ``epoch`` is 1-based (the epoch being trained, 1..epochs); ``step`` counts the steps done in
    that epoch (1..steps_per_epoch).
    """

    def on_step(
        self, epoch: int, step: int, steps_per_epoch: int, metrics: dict[str, float]
    ) -> None:
        """After every optimizer step; ``metrics`` are running means over the epoch so far."""

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """After the epoch's checkpoint is written; ``record`` is its history entry."""

    def should_stop(self) -> bool:
        """Checked before every step; True stops training, keeping the last completed epoch."""
        return False


class StopOnly(TrainingHooks):
    """Forwards only the stop request of another hooks object (for nested runs, e.g. a reference
    model, whose progress must not be reported as the main run's)."""

    def __init__(self, inner: TrainingHooks) -> None:
        self.inner = inner

    def should_stop(self) -> bool:
        return self.inner.should_stop()
