"""How an epoch's batches are drawn: order, class balance, augmentation, and the seeds behind them.

Every random choice of epoch ``e`` comes from a generator seeded by ``(seed, e, stream)``, never
from a generator carried across epochs, so a run resumed at epoch ``e`` draws exactly what an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib

import torch

STREAMS = ("order", "augment", "attack", "global")


def derived_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one epoch and one kind of randomness (stable across processes)."""
    digest = hashlib.sha256(f"dpaat:{seed}:{epoch}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """A CPU generator for ``stream`` of ``epoch`` (CPU so runs are reproducible across devices)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}")
    return torch.Generator().manual_seed(derived_seed(seed, epoch, stream))


def epoch_order(labels: torch.Tensor, gen: torch.Generator, balanced: bool = False) -> torch.Tensor:
    """Indices of one epoch: a permutation, or (``balanced``) as many draws with replacement,
    each class equally likely."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=gen)
    counts = torch.bincount(labels).double()
    weights = 1.0 / counts[labels]
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of ``order``; a last batch of one sample is merged into the previous
    one (BatchNorm cannot train on a single sample)."""
    parts = list(order.split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


def class_weights(labels: torch.Tensor, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency CE weights ``n / (K * n_c)`` (mean weight 1 over the samples); a class
    absent from training gets weight 0. With ``power`` p they are raised to p and rescaled to the
    same mean: p = 0.5, the square root, is a milder correction than p = 1."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    w = torch.where(
        counts > 0, len(labels) / (num_classes * counts.clamp_min(1)), torch.zeros_like(counts)
    )
    tempered = w**power
    return (tempered * (w * counts).sum() / (tempered * counts).sum()).float()


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random symmetry of the square per image: one of 4 rotations by 90 degrees, mirrored or
    not (non-square images: 0 or 180 degrees only). Works on uint8 or float batches (N, C, H, W)."""
    n = len(images)
    rotations = torch.randint(0, 4, (n,), generator=gen)
    if images.shape[-1] != images.shape[-2]:
        rotations = rotations // 2 * 2
    flips = torch.randint(0, 2, (n,), generator=gen)
    codes = rotations * 2 + flips
    out = images.clone()
    for code in codes.unique().tolist():
        sel = (codes == code).nonzero().squeeze(1).to(images.device)
        part = images.index_select(0, sel)
        if code % 2:
            part = part.flip(-1)
        if code // 2:
            part = torch.rot90(part, code // 2, dims=(-2, -1))
        out[sel] = part
    return out
