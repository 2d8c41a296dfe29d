"""What every attack shares: eval mode (BatchNorm statistics untouched) and mode restore, no weight
gradients, a per-sample epsilon tensor, clamping to [0, 1], and chunked batching."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> per-sample loss


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def as_eps(eps: float | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """A per-sample radius tensor (n,) on ``like``'s device, whatever the caller gave."""
    t = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"eps must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError("eps must be finite and >= 0")
    return t


def view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (n,) tensor over an image batch (n, C, H, W)."""
    return t.view(-1, *([1] * (x.ndim - 1)))


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration of an attack; both restored after.

    Freezing the parameters means autograd computes input gradients only (no weight gradients),
    which is most of what makes an attack step cheaper than a training step.
    """
    was_training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)


def input_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(gradient of the summed loss w.r.t. x, per-sample loss, logits) in one forward+backward."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, loss.detach(), logits.detach()


class Attack:
    """Base class: subclasses implement :meth:`perturb` on one chunk, with the model already in
    eval mode and frozen, and a per-sample ``eps`` tensor (n,) in pixel units."""

    name: ClassVar[str] = "attack"
    norm: str = "linf"

    def __init__(self, model: nn.Module, batch_size: int = 256, **params: Any) -> None:
        self.model = model
        self.batch_size = batch_size
        self.params = params

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for the report's threat model."""
        return {"name": self.name, "norm": self.norm, **self.params}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        eps_t = as_eps(eps, len(x), x)
        out = torch.empty_like(x)
        with attack_mode(self.model):
            for s in range(0, len(x), self.batch_size):
                sl = slice(s, s + self.batch_size)
                xs, es = x[sl].detach(), eps_t[sl]
                adv = self.perturb(xs, y[sl], es)
                # eps = 0 is the identity exactly, whatever the attack did numerically
                out[sl] = torch.where(view(es, xs) > 0, adv, xs).detach()
        return out
