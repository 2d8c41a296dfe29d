"""What every attack shares: eval mode (BatchNorm statistics untouched) and mode restore, no weight
gradients, a per-sample epsilon tensor, clamping to [0, 1], a seeded generator, and chunked
batching."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.attacks import layout

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> per-sample loss


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample (no reduction), computed in float32."""
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


def fast_layout(
    x: torch.Tensor, model: nn.Module, channels_last: bool | None = None, backward: bool = True
) -> torch.Tensor:
    """``x`` in the memory layout ``model`` runs fastest in (see :mod:`models.attacks.layout`).

    ``None`` uses the cached choice for this model, device, dtype and batch shape, measured by a
    short probe on the first call (or the layout ``DPAAT_ATTACK_LAYOUT`` forces); a bool forces
    channels-last or contiguous NCHW. Values are identical; only the strides differ.
    ``backward=False`` probes with forward passes only, under no_grad (black-box attacks).
    """
    if x.ndim != 4:
        return x
    if channels_last is None:
        channels_last = layout.prefers_channels_last(
            model, x, _probe_pass(model, backward), backward
        )
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` back in the layout of the caller's ``x`` (contiguous NCHW for a plain batch: code
    downstream, e.g. AutoAttack's, calls ``.view`` on it)."""
    if t.ndim != 4:
        return t
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _probe_pass(model: nn.Module, backward: bool) -> Callable[[torch.Tensor], None]:
    """One forward+backward w.r.t. the input as an attack step runs it (or one forward pass),
    with no effect on anything: eval mode and frozen weights (BatchNorm statistics untouched,
    modes restored), and the random number generator's state restored."""

    def run(x: torch.Tensor) -> None:
        devices = [x.device] if x.device.type == "cuda" else []
        with attack_mode(model), torch.random.fork_rng(devices):
            if not backward:
                with torch.no_grad():
                    model(x)
                return
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                torch.autograd.grad(model(x).float().sum(), x)

    return run


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


def input_grad(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gradient of the summed loss w.r.t. x, per-sample loss, logits) in one forward+backward."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, target)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, loss.detach(), logits.detach()


class Attack:
    """Base class: subclasses implement :meth:`perturb` on one chunk, with the model already in
    eval mode and frozen, and a per-sample ``eps`` tensor (n,) in pixel units.

    Randomised attacks pass ``seed``: the generator is re-created from it at every call, so the
    same call on the same inputs gives the same result (random numbers are drawn on the CPU, so
    also across devices). ``describe()`` lists the parameters that change the result.
    """

    name: ClassVar[str] = "attack"
    norm: str = "linf"

    def __init__(
        self, model: nn.Module, batch_size: int = 256, seed: int | None = None, **params: Any
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.batch_size = batch_size
        self.seed = seed
        self.params = params
        self.generator: torch.Generator | None = None

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for the report's threat model."""
        out: dict[str, Any] = {"name": self.name, "norm": self.norm, **self.params}
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,), radius ``eps``
        (a float or a per-sample tensor (N,), pixel units). The result has ``x``'s layout."""
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError("inputs must lie in [0, 1] (normalisation belongs inside the model)")
        eps_t = as_eps(eps, len(x), x)
        if len(x) == 0:
            return x.detach().clone()
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        chunks = []
        with attack_mode(self.model):
            for s in range(0, len(x), self.batch_size):
                xs, es = x[s : s + self.batch_size].detach(), eps_t[s : s + self.batch_size]
                adv = self.perturb(xs, y[s : s + self.batch_size], es).detach()
                if not bool((es > 0).all()):
                    # eps = 0 is the identity exactly, whatever the attack did numerically
                    adv = torch.where(view(es, xs) > 0, adv, xs)
                chunks.append(adv)
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return like_input(out, x)
