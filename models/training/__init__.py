"""Adversarial training: DPAAT (a reconstruction of Li et al. 2024, see docs/dpaat.md) and its
baselines (standard, pgd_at, trades, amat_external, iaat_flip) in one resumable training loop."""

from models.training.checkpoint import CheckpointError, load_checkpoint, load_trained_model
from models.training.config import METHODS, TrainConfig
from models.training.hooks import TrainingHooks
from models.training.trainer import TrainResult, train

__all__ = [
    "METHODS",
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "TrainingHooks",
    "load_checkpoint",
    "load_trained_model",
    "train",
]
