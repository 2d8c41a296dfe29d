"""DPAAT's state and update rules as small functions on tensors.

This is the project's reconstruction of "Dynamic Perturbation-Adaptive Adversarial Training"
(Li et al. 2024, arXiv:2403.06798; only the abstract is public), specified in docs/dpaat.md:
one L-infinity radius per training sample, a loss threshold ``tau`` recomputed every epoch from
the clean losses of correctly classified samples (median + z * 1.4826 * MAD), and per-sample
expand / shrink-to-boundary rules. Radii here are in 1/255 units unless a name says pixels.
For the ablations, tau may also come from mean + z * std or a quantile of the losses, and may be
refreshed after every batch (``TrainConfig.tau_statistic`` / ``tau_update``).

The training step that uses these pieces lives in :mod:`models.training.methods`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.attacks.base import fast_layout, per_sample_ce, view

MAD_SCALE = 1.4826  # makes the MAD a consistent estimate of the standard deviation of a normal
HIST_BINS = 8

# criterion(per-sample loss, logits, labels) -> bool (N,): "this input breaks the sample"
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def initial_tau(num_classes: int) -> float:
    """tau before the first collection: the loss of a uniform prediction, ln K."""
    return math.log(num_classes)


def median(t: torch.Tensor) -> torch.Tensor:
    """The median (mean of the two middle values for an even count, unlike ``Tensor.median``)."""
    return torch.quantile(t, 0.5)


def robust_threshold(losses: torch.Tensor, z: float) -> float:
    """median(L) + z * 1.4826 * MAD(L): where a loss leaves the distribution of ``losses``."""
    values = losses.detach().double().flatten().cpu()
    if values.numel() == 0:
        raise ValueError("robust_threshold needs at least one loss")
    med = median(values)
    mad = median((values - med).abs())
    return float(med + z * MAD_SCALE * mad)


def mean_std_threshold(losses: torch.Tensor, z: float) -> float:
    """mean(L) + z * std(L), std with divisor n (a single loss gives its own value): the
    non-robust counterpart of :func:`robust_threshold` (the same value for normal losses)."""
    values = losses.detach().double().flatten().cpu()
    if values.numel() == 0:
        raise ValueError("mean_std_threshold needs at least one loss")
    return float(values.mean() + z * values.std(correction=0))


def quantile_threshold(losses: torch.Tensor, q: float) -> float:
    """The q-th quantile of L (linear interpolation): a fixed share 1 - q of the collected losses
    lies above tau, whatever their spread."""
    values = losses.detach().double().flatten().cpu()
    if values.numel() == 0:
        raise ValueError("quantile_threshold needs at least one loss")
    return float(torch.quantile(values, q))


def threshold(
    losses: torch.Tensor, z: float, statistic: str = "median_mad", quantile: float = 0.9
) -> float:
    """tau from collected losses with the configured statistic (``TAU_STATISTICS``)."""
    if statistic == "median_mad":
        return robust_threshold(losses, z)
    if statistic == "mean_std":
        return mean_std_threshold(losses, z)
    if statistic == "quantile":
        return quantile_threshold(losses, quantile)
    raise ValueError(f"unknown tau statistic {statistic!r}")


def next_tau(
    old: float,
    losses: torch.Tensor,
    z: float,
    momentum: float = 0.0,
    statistic: str = "median_mad",
    quantile: float = 0.9,
) -> float:
    """End-of-epoch update: the threshold of this epoch's losses, smoothed as
    ``m * old + (1 - m) * new``. With no loss collected (nothing classified correctly) tau stays."""
    if losses.numel() == 0:
        return old
    return momentum * old + (1.0 - momentum) * threshold(losses, z, statistic, quantile)


def update_radii(
    eps: torch.Tensor,
    clean_correct: torch.Tensor,
    broken: torch.Tensor,
    dist: torch.Tensor,
    delta: float,
    eps_min: float,
    eps_max: float,
) -> torch.Tensor:
    """DPAAT's per-sample rule.

    - clean-correct and not broken: ``min(eps + delta, eps_max)`` (expand);
    - clean-correct and broken: ``max(eps_min, (eps + dist) / 2)`` (shrink half-way to the
      criterion boundary);
    - clean-misclassified: unchanged.
    """
    expand = (eps + delta).clamp(max=eps_max)
    shrink = ((eps + dist) / 2).clamp(min=eps_min)
    new = torch.where(broken, shrink, expand)
    return torch.where(clean_correct, new, eps).clamp(eps_min, eps_max)


def flip_radii(
    eps: torch.Tensor, broken: torch.Tensor, delta: float, eps_min: float, eps_max: float
) -> torch.Tensor:
    """``iaat_flip``'s rule: shrink by delta when the attack flipped the prediction, else grow."""
    return torch.where(broken, eps - delta, eps + delta).clamp(eps_min, eps_max)


def loss_above(tau: float) -> Criterion:
    """DPAAT's criterion: the sample's CE exceeds tau."""

    def criterion(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss > tau

    return criterion


def misclassified(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``iaat_flip``'s criterion: the prediction is wrong."""
    return logits.argmax(1) != y


class FirstBreak:
    """A ``pgd_steps`` observer: which samples had an iterate meeting the criterion, the
    perturbation of the first such iterate, and the logits of the last iterate seen."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, criterion: Criterion) -> None:
        self.x, self.y, self.criterion = x, y, criterion
        self.broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.first = torch.zeros_like(x)
        self.first_loss = torch.zeros(len(x), device=x.device)  # the loss at ``first``
        self.last_logits: torch.Tensor | None = None

    def __call__(
        self, step: int, x_adv: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor
    ) -> None:
        hit = self.criterion(loss, logits, self.y) & ~self.broken
        # torch.where instead of boolean indexing: no host synchronisation inside the attack loop
        self.first = torch.where(view(hit, self.x), x_adv - self.x, self.first)
        self.first_loss = torch.where(hit, loss.detach().to(self.first_loss.dtype), self.first_loss)
        self.broken |= hit
        self.last_logits = logits


@torch.no_grad()
def boundary_fraction(
    model: nn.Module,
    x: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    criterion: Criterion,
    steps: int,
) -> torch.Tensor:
    """The smallest fraction s in (0, 1] of ``p`` with ``x + s p`` still meeting the criterion.

    ``steps`` forward-only bisection steps, all samples at once; ``x + p`` is assumed to meet it.
    Returns the upper end of the final bracket, so ``x + s p`` does meet it and s is within
    2^-steps of the boundary. The caller puts the model in eval mode.
    """
    x, p = fast_layout(x, model), fast_layout(p, model)  # the attack loop's layout, per model
    lo = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    hi = torch.ones_like(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        logits = model((x + view(mid, x) * p).clamp(0.0, 1.0))
        hit = criterion(per_sample_ce(logits, y), logits, y)
        hi = torch.where(hit, mid, hi)
        lo = torch.where(hit, lo, mid)
    return hi


@torch.no_grad()
def boundary_fraction_secant(
    model: nn.Module,
    x: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    tau: float,
    steps: int,
    loss_start: torch.Tensor,
    loss_end: torch.Tensor,
) -> torch.Tensor:
    """A cheaper :func:`boundary_fraction` for the loss criterion ``CE > tau`` (option
    ``boundary_search = "secant"``; the spec's bisection stays the default, docs/decisions/
    training.md): ``steps`` forward probes of regula falsi on f(s) = g(CE(x + s p)) - g(tau),
    g(L) = log(e^L - 1), instead of
    bisection's halving, starting from the losses already known at both ends: ``loss_end`` at
    x + p (the attack's observer) and ``loss_start``, an estimate of the clean loss (the training
    forward's). Each probe sits 1/32 of the bracket (the resolution of 5 bisection steps) past
    where the line through the bracket's ends crosses tau, so that an accurate line makes the probe
    the new upper end, and at least 1/32 of the bracket from either end. Only the probes decide:
    like the bisection it returns the upper end of the final bracket, a fraction at which x + s p
    does meet the criterion. The caller puts the model in eval mode.
    """
    x, p = fast_layout(x, model), fast_layout(p, model)
    lo = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    hi = torch.ones_like(lo)

    def f(loss: torch.Tensor) -> torch.Tensor:
        # log(e^L - 1) is the log-sum-exp of the other classes' logit margins over the label's:
        # nearly linear along a short segment where the CE itself is convex (the chord of a convex
        # function always lands short of the crossing), with the same crossing as L - tau
        return _log_expm1(loss.to(lo.dtype)) - _log_expm1(torch.tensor(tau, dtype=lo.dtype))

    f_lo, f_hi = f(loss_start), f(loss_end)
    for _ in range(steps):
        # f_hi > 0 >= f_lo normally; an estimated f_lo > 0 gives a negative root -> 1/32
        root = -f_lo / (f_hi - f_lo).clamp_min(1e-12)
        frac = (root + 1 / 32).clamp(1 / 32, 31 / 32)
        mid = lo + frac * (hi - lo)
        loss = per_sample_ce(model((x + view(mid, x) * p).clamp(0.0, 1.0)), y)
        hit, f_mid = loss > tau, f(loss)
        hi, f_hi = torch.where(hit, mid, hi), torch.where(hit, f_mid, f_hi)
        lo, f_lo = torch.where(hit, lo, mid), torch.where(hit, f_lo, f_mid)
    return hi


def _log_expm1(v: torch.Tensor) -> torch.Tensor:
    """log(e^v - 1) for v >= 0, finite at 0 and stable for large v."""
    v = v.clamp_min(1e-12)
    return torch.where(v > 20, v, torch.log(torch.expm1(v.clamp_max(20))))


def scatter_first(target: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``target[idx] = values`` where, for an index repeated in ``idx`` (a sampler drawing with
    replacement), its first occurrence wins: deterministic on every device."""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    positions = torch.arange(len(idx), device=idx.device)
    first = torch.full((len(uniq),), len(idx), device=idx.device, dtype=positions.dtype)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    target[uniq] = values[first].to(target.dtype)


def eps_histogram(
    eps: torch.Tensor, eps_min: float, eps_max: float, bins: int = HIST_BINS
) -> dict[str, list]:
    """Counts of radii in ``bins`` equal bins from eps_min to eps_max (1/255 units; fixed edges for
    the whole run so epochs compare). The last bin includes eps_max."""
    edges = torch.linspace(eps_min, eps_max, bins + 1, dtype=torch.float64)
    which = torch.bucketize(eps.double().cpu(), edges[1:-1], right=True)
    counts = torch.bincount(which, minlength=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


@dataclass
class AdaptiveEpsState:
    """What a per-sample-radius method carries across epochs (saved in every checkpoint).

    ``eps`` is one radius per training sample in 1/255 units; ``tau_history`` holds the initial tau
    and every later one. The per-epoch collection and counters are reset at each epoch end, which
    is where checkpoints are taken, so they are not saved.
    """

    eps: torch.Tensor
    tau: float | None
    tau_history: list[float] = field(default_factory=list)
    collected: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0
    broken: int = 0

    @classmethod
    def create(
        cls, n: int, delta: float, eps_min: float, eps_max: float, tau: float | None
    ) -> AdaptiveEpsState:
        eps = torch.full((n,), float(min(max(delta, eps_min), eps_max)), dtype=torch.float32)
        return cls(eps=eps, tau=tau, tau_history=[] if tau is None else [tau])

    def record_batch(self, broken: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        """Count a batch's broken samples and keep the losses to collect (CPU copies)."""
        self.seen += len(broken)
        self.broken += int(broken.sum())
        if losses is not None:
            self.collected.append(losses.detach().float().cpu())

    def collected_losses(self) -> torch.Tensor:
        return torch.cat(self.collected) if self.collected else torch.zeros(0)

    def reset_epoch(self) -> None:
        self.collected, self.seen, self.broken = [], 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"eps": self.eps.clone(), "tau": self.tau, "tau_history": list(self.tau_history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        eps = state["eps"]
        if not isinstance(eps, torch.Tensor) or eps.shape != self.eps.shape:
            raise ValueError(
                f"saved per-sample radii have shape {getattr(eps, 'shape', None)}, "
                f"the training set needs {tuple(self.eps.shape)}"
            )
        self.eps = eps.detach().to(torch.float32).cpu().clone()
        self.tau = None if state["tau"] is None else float(state["tau"])
        self.tau_history = [float(t) for t in state["tau_history"]]
        self.reset_epoch()
