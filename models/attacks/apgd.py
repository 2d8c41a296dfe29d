"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): the gradient components of AutoAttack, written from the paper.

APGD is PGD without a step-size parameter: the step starts at 2 eps and is halved, per sample, at
checkpoints w_j = ceil(p_j N) (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when (1) the loss rose in fewer than rho = 75 % of
the steps since the last checkpoint, or (2) the step was not halved at the last checkpoint and the
best loss has not improved since; after a halving the iterate restarts from the best point found.
Steps carry momentum 0.75:
z = P(x_k + eta sign(g)),  x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1})).

Losses: cross-entropy (``apgd-ce``), the difference of logits ratio DLR (``apgd-dlr``, invariant to
the scale of the logits) and its targeted version (``apgd-t``, one run per target class, the
``n_target_classes`` most likely classes after the prediction). As in AutoAttack, only samples the
model classifies correctly are attacked, each restart or target only attacks those not yet fooled,
and a sample's result is an iterate that fools the model when one was found, else its highest-loss
iterate.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from models.attacks.base import (
    Attack,
    LossFn,
    fast_layout,
    input_grad,
    like_input,
    per_sample_ce,
    view,
)
from models.attacks.pgd import NORMS, l2_norm, project, random_start

_DLR_EPS = 1e-12


def checkpoints(steps: int) -> list[int]:
    """The iterations (0 < w < steps) after which APGD decides whether to halve the step."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({w for q in p[1:] if 0 < (w := math.ceil(q * steps - 1e-9)) < steps})


def _other_max(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The largest logit of a class other than ``y``."""
    return z.scatter(1, y[:, None], -math.inf).amax(1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): positive once the sample is fooled."""
    z = logits.float()
    top = z.topk(3, dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    return -(z_y - _other_max(z, y)) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Targeted DLR = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), pushing towards class ``t``."""
    z = logits.float()
    top = z.topk(4, dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, t[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS)


def halve_step(
    n_up: torch.Tensor,
    since_mark: int,
    rho: float,
    halved_at_mark: torch.Tensor,
    best_loss: torch.Tensor,
    best_at_mark: torch.Tensor,
) -> torch.Tensor:
    """Croce & Hein's rule at a checkpoint, per sample: halve the step when (1) the loss rose in
    fewer than ``rho`` of the ``since_mark`` steps since the last checkpoint, OR (2) the step was
    not halved at the last checkpoint and the best loss has not improved since."""
    oscillating = n_up < rho * since_mark
    stalled = ~halved_at_mark & (best_loss <= best_at_mark)
    return oscillating | stalled


def apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
    steps: int,
    loss_fn: LossFn,
    init: torch.Tensor,
    norm: str = "linf",
    rho: float = 0.75,
    momentum: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from ``x + init``: (highest-loss iterate, its loss, fooled, a fooling iterate).

    ``steps`` gradient steps (``steps`` backward passes, ``steps + 1`` forward passes). The model
    must be in attack mode. The fooling iterate is meaningful where ``fooled`` is true.
    """
    x_in = x
    x = fast_layout(x, model)
    if norm == "linf":
        e = view(eps, x)
        lo, hi = (x - e).clamp_(min=0.0), (x + e).clamp_(max=1.0)

        def proj(t: torch.Tensor) -> torch.Tensor:
            return t.clamp_(min=lo, max=hi)

    else:

        def proj(t: torch.Tensor) -> torch.Tensor:
            return (x + project(t - x, eps, "l2")).clamp_(0.0, 1.0)

    def direction(g: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return g.sign()
        return g / view(l2_norm(g).clamp_min(1e-12), g)

    x_k = proj(x + fast_layout(init, model))
    grad, loss, logits = input_grad(model, x_k, y, loss_fn)
    fooled = logits.argmax(1) != y
    x_fool = x_k
    x_best, grad_best, best_loss = x_k, grad, loss
    x_prev, prev_loss = x_k, loss
    eta = 2.0 * eps
    marks = set(checkpoints(steps))
    last_mark = 0
    n_up = torch.zeros_like(loss)
    best_at_mark = best_loss
    halved_at_mark = torch.zeros_like(fooled)
    for k in range(steps):
        z = proj(x_k + view(eta, x) * direction(grad))
        if k == 0:
            x_new = z
        else:
            x_new = proj(x_k + momentum * (z - x_k) + (1.0 - momentum) * (x_k - x_prev))
        x_prev, x_k = x_k, x_new
        if k + 1 < steps:
            grad, loss, logits = input_grad(model, x_k, y, loss_fn)
        else:  # the last iterate only needs its loss
            with torch.no_grad():
                logits = model(x_k)
                loss = loss_fn(logits, y)
        now_fooled = logits.argmax(1) != y
        x_fool = torch.where(view(now_fooled, x), x_k, x_fool)
        fooled = fooled | now_fooled
        n_up = n_up + (loss > prev_loss).to(n_up.dtype)
        prev_loss = loss
        better = loss > best_loss
        x_best = torch.where(view(better, x), x_k, x_best)
        grad_best = torch.where(view(better, x), grad, grad_best)
        best_loss = torch.where(better, loss, best_loss)
        if k + 1 in marks:
            since = k + 1 - last_mark
            halve = halve_step(n_up, since, rho, halved_at_mark, best_loss, best_at_mark)
            eta = torch.where(halve, eta / 2, eta)
            # restart from the best point, without momentum
            x_k = torch.where(view(halve, x), x_best, x_k)
            x_prev = torch.where(view(halve, x), x_best, x_prev)
            grad = torch.where(view(halve, x), grad_best, grad)
            prev_loss = torch.where(halve, best_loss, prev_loss)
            halved_at_mark, best_at_mark = halve, best_loss
            n_up = torch.zeros_like(n_up)
            last_mark = k + 1
    return like_input(x_best, x_in), best_loss, fooled, like_input(x_fool, x_in)


class APGD(Attack):
    """APGD with a per-sample radius; see the module docstring. Use the subclasses."""

    name: ClassVar[str] = "apgd"
    loss: ClassVar[str] = "ce"
    min_classes: ClassVar[int] = 2

    def __init__(
        self,
        model: nn.Module,
        steps: int = 100,
        restarts: int = 1,
        norm: str = "linf",
        rho: float = 0.75,
        momentum: float = 0.75,
        seed: int | None = 0,
        batch_size: int = 256,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        if not 0 < rho <= 1 or not 0 < momentum <= 1:
            raise ValueError("rho and momentum must lie in (0, 1]")
        super().__init__(
            model, batch_size, seed, steps=steps, restarts=restarts, rho=rho, momentum=momentum
        )
        self.norm = norm
        self.steps, self.restarts, self.rho, self.momentum = steps, restarts, rho, momentum

    def _targets(self, logits: torch.Tensor) -> list[torch.Tensor | None]:
        """One entry per series of runs: None for an untargeted attack."""
        return [None]

    def _loss(self, target: torch.Tensor | None) -> LossFn:
        if self.loss == "dlr":
            return dlr_loss
        return per_sample_ce

    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(fast_layout(x, self.model))
        k = logits.shape[1]
        if k < self.min_classes:
            raise ValueError(f"{self.name} needs at least {self.min_classes} classes, got {k}")
        out = x.clone()
        out_loss = torch.full((len(x),), -math.inf, device=x.device)
        done = logits.argmax(1) != y  # misclassified already: the clean input is the answer
        done |= eps == 0
        for target in self._targets(logits):
            for _ in range(self.restarts):
                idx = (~done).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return out
                xi, yi, ei = x[idx], y[idx], eps[idx]
                loss_fn = self._loss(None if target is None else target[idx])
                # drawn for the whole chunk: a sample's start does not depend on which others
                # are still attacked (the cascade gives the same per-sample result)
                unit = random_start(x, torch.ones_like(eps), self.norm, self.generator)
                init = unit[idx] * view(ei, xi)
                x_best, best_loss, fooled, x_fool = apgd_run(
                    self.model,
                    xi,
                    yi,
                    ei,
                    self.steps,
                    loss_fn,
                    init,
                    self.norm,
                    self.rho,
                    self.momentum,
                )
                cand = torch.where(view(fooled, xi), x_fool, x_best)
                keep = fooled | (best_loss > out_loss[idx])
                out[idx] = torch.where(view(keep, xi), cand, out[idx])
                out_loss[idx] = torch.where(keep, best_loss, out_loss[idx])
                done[idx] = fooled
        return out


class APGDCE(APGD):
    """APGD on the cross-entropy loss."""

    name: ClassVar[str] = "apgd-ce"
    loss: ClassVar[str] = "ce"


class APGDDLR(APGD):
    """APGD on the DLR loss (needs at least 3 classes)."""

    name: ClassVar[str] = "apgd-dlr"
    loss: ClassVar[str] = "dlr"
    min_classes: ClassVar[int] = 3


class APGDT(APGD):
    """Targeted APGD on the targeted DLR loss (needs at least 4 classes): for each of the
    ``n_target_classes`` classes ranked 2nd, 3rd... by the clean logits, ``restarts`` runs pushing
    towards it. ``n_target_classes`` None means min(K - 1, 9) (AutoAttack's 9 on 10 classes); a
    larger value than K - 1 is capped at K - 1."""

    name: ClassVar[str] = "apgd-t"
    loss: ClassVar[str] = "dlr-targeted"
    min_classes: ClassVar[int] = 4

    def __init__(
        self,
        model: nn.Module,
        steps: int = 100,
        restarts: int = 1,
        n_target_classes: int | None = None,
        norm: str = "linf",
        rho: float = 0.75,
        momentum: float = 0.75,
        seed: int | None = 0,
        batch_size: int = 256,
    ) -> None:
        if n_target_classes is not None and n_target_classes < 1:
            raise ValueError("n_target_classes must be >= 1")
        super().__init__(model, steps, restarts, norm, rho, momentum, seed, batch_size)
        self.n_target_classes = n_target_classes
        self.params["n_target_classes"] = n_target_classes

    def target_classes(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """The target of each sample for each series of runs: the classes ranked 2nd, 3rd... by
        ``logits`` (N, K)."""
        k = logits.shape[1]
        n = min(k - 1, 9 if self.n_target_classes is None else self.n_target_classes)
        order = logits.argsort(dim=1, descending=True)
        return [order[:, r + 1] for r in range(n)]

    def _targets(self, logits: torch.Tensor) -> list[torch.Tensor | None]:
        return list(self.target_classes(logits))

    def _loss(self, target: torch.Tensor | None) -> LossFn:
        assert target is not None
        t = target

        def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return targeted_dlr_loss(logits, y, t)

        return loss
