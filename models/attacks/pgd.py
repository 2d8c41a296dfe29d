"""Projected gradient descent with a per-sample radius (L-infinity and L2), and FGSM.

``pgd_steps`` is the one PGD loop of the project: evaluation attacks, the training methods
(``pgd_at``, ``trades``, ``dpaat``...) and the robustness score all call it. An optional
``observer`` sees every iterate and its per-sample loss, which is how DPAAT records the first
iterate that crosses its criterion without a second pass.
"""

from __future__ import annotations

from collections.abc import Callable
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

# observer(step, x_adv, per_sample_loss, logits): step 0 is the start point, step k the k-th iterate
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

NORMS = ("linf", "l2")


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of a batch."""
    return t.flatten(1).norm(dim=1)


def project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project a perturbation onto the per-sample ball of radius ``eps``."""
    if norm == "linf":
        e = view(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e)
    factor = torch.clamp(eps / l2_norm(delta).clamp_min(1e-12), max=1.0)
    return delta * view(factor, delta)


def _draw(
    kind: str, shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``uniform`` numbers in [-1, 1), ``unit`` ones in [0, 1) or ``normal`` ones. With a (CPU)
    generator they are drawn on the CPU, so seeded runs are reproducible across devices."""
    device = like.device if generator is None else torch.device("cpu")
    t = torch.empty(shape, dtype=like.dtype, device=device)
    if kind == "normal":
        t.normal_(generator=generator)
    else:
        t.uniform_(-1.0 if kind == "uniform" else 0.0, 1.0, generator=generator)
    return t.to(like.device)


def active_rows(eps: torch.Tensor) -> torch.Tensor:
    """The samples to attack: a radius of 0 costs nothing (the answer is the input itself). An
    evaluation's cascade gives the samples that an earlier attack already broke radius 0."""
    return (eps > 0).nonzero().squeeze(1)


def random_start(
    x: torch.Tensor, eps: torch.Tensor, norm: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniform random point of the ball: the L-infinity cube, or the volume of the L2 ball."""
    if norm == "linf":
        return _draw("uniform", tuple(x.shape), x, generator).mul_(view(eps, x))
    g = _draw("normal", tuple(x.shape), x, generator)
    r = _draw("unit", (len(x),), x, generator) ** (1.0 / g[0].numel())
    return g / view(l2_norm(g).clamp_min(1e-12), g) * view(r * eps, x)


def pgd_steps(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    eps: torch.Tensor,
    steps: int,
    alpha: torch.Tensor,
    norm: str = "linf",
    init: torch.Tensor | None = None,
    loss_fn: LossFn = per_sample_ce,
    observer: Observer | None = None,
    observe_last: bool = False,
    channels_last: bool | None = None,
) -> torch.Tensor:
    """Run ``steps`` ascent steps from ``x + init`` (or ``x``) inside the per-sample ball.

    The model must already be in attack mode (see :func:`models.attacks.base.attack_mode`).
    ``observe_last`` adds one forward pass (no backward) so the observer also sees the last iterate.
    ``channels_last`` forces the memory layout of the iterates; None (default) uses the one
    measured fastest for ``model`` (see :func:`models.attacks.base.fast_layout`). The observer
    sees the iterates in that layout; the result comes back in ``x``'s layout.
    """
    x_in = x.detach()
    x = fast_layout(x_in, model, channels_last)
    if norm == "linf":
        # the ball and [0, 1] intersected once: each step is then sign, multiply-add and clamp
        e = view(eps, x)
        lo, hi = (x - e).clamp_(min=0.0), (x + e).clamp_(max=1.0)
        start = x if init is None else x + fast_layout(init, model, channels_last)
        x_adv = start.clamp(min=lo, max=hi)
    elif norm == "l2":
        delta = torch.zeros_like(x) if init is None else project(init, eps, norm)
        x_adv = (x + delta).clamp_(0.0, 1.0)
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    a = view(alpha, x)
    loss = torch.empty(0)
    for k in range(steps):
        grad, loss, logits = input_grad(model, x_adv, target, loss_fn)
        if observer is not None:
            observer(k, x_adv, loss, logits)
        # a fresh tensor every step (never in place): an observer may keep the iterate it was shown
        if norm == "linf":
            x_adv = torch.addcmul(x_adv, a, grad.sign_()).clamp_(min=lo, max=hi)
        else:
            step = grad.mul_(a / view(l2_norm(grad).clamp_min(1e-12), grad))
            x_adv = (x + project(x_adv + step - x, eps, norm)).clamp_(0.0, 1.0)
    if observer is not None and observe_last:
        with torch.no_grad():
            logits = model(x_adv)
            observer(steps, x_adv, loss_fn(logits, target), logits)
    return like_input(x_adv.detach(), x_in)


class PGD(Attack):
    """PGD (Madry et al. 2018): ``steps`` steps of size ``alpha_factor * eps / steps`` from a
    uniform random start; with ``restarts`` > 1 each sample keeps the restart that fooled the model,
    else the one with the highest loss."""

    name: ClassVar[str] = "pgd"

    def __init__(
        self,
        model: nn.Module,
        steps: int = 20,
        alpha_factor: float = 2.5,
        restarts: int = 1,
        norm: str = "linf",
        random_init: bool = True,
        seed: int | None = 0,
        batch_size: int = 256,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        if alpha_factor <= 0:
            raise ValueError("alpha_factor must be > 0")
        super().__init__(
            model,
            batch_size,
            seed if random_init else None,
            steps=steps,
            alpha_factor=alpha_factor,
            restarts=restarts,
            random_init=random_init,
        )
        self.norm = norm
        self.steps, self.alpha_factor, self.restarts = steps, alpha_factor, restarts
        self.random_init = random_init

    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        rows = active_rows(eps)
        out = x.clone()
        if rows.numel() == 0:
            return out
        full_x = x
        x, y, eps = x[rows], y[rows], eps[rows]
        alpha = self.alpha_factor * eps / self.steps
        best: torch.Tensor | None = None
        best_loss = best_fooled = torch.empty(0)
        for _ in range(self.restarts):
            init = None
            if self.random_init:  # drawn for the whole chunk, then the attacked rows taken
                unit = random_start(full_x, out.new_ones(len(full_x)), self.norm, self.generator)
                init = unit[rows] * view(eps, x)  # linear in the radius for both norms
            adv = pgd_steps(self.model, x, y, eps, self.steps, alpha, self.norm, init)
            if self.restarts == 1:
                out[rows] = adv
                return out
            with torch.no_grad():
                logits = self.model(adv)
            loss, fooled = per_sample_ce(logits, y), logits.argmax(1) != y
            if best is None:
                best, best_loss, best_fooled = adv, loss, fooled
                continue
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(view(better, x), adv, best)
            best_loss = torch.where(better, loss, best_loss)
            best_fooled = best_fooled | fooled
        assert best is not None
        out[rows] = best
        return out


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps (L-infinity)."""

    name: ClassVar[str] = "fgsm"

    def __init__(self, model: nn.Module, batch_size: int = 256) -> None:
        super().__init__(model, batch_size)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        rows, out = active_rows(eps), x.clone()
        if rows.numel():
            out[rows] = pgd_steps(self.model, x[rows], y[rows], eps[rows], 1, eps[rows])
        return out
