"""Training methods: how one batch becomes a loss, and what a method remembers across epochs.

Every method runs inside the same trainer loop (:mod:`models.training.trainer`). Adversarial
examples are generated in eval mode with frozen weights (``attack_mode``) by the project's one PGD
loop, ``models.attacks.pgd_steps``, with step ``2.5 * eps / K`` and, except for TRADES, a uniform
random start drawn from the epoch's seeded generator. The training forward then runs in train mode.

- ``standard``: clean CE.
- ``pgd_at`` (Madry et al. 2018): eps = eps_max for every sample; adversarial-only loss unless
  ``pgd_at_beta`` < 1 (then the mixed loss).
- ``trades`` (Zhang et al. 2019): CE(f(x)) + trades_beta * KL(f(x) || f(x_adv)); the attack
  maximises that KL from ``x + 0.001 * N(0, 1)``.
- ``dpaat``: per-sample radii and a self-computed loss threshold (docs/dpaat.md, a reconstruction).
- ``amat_external``: DPAAT with tau fixed from a separately trained reference model.
- ``iaat_flip``: per-sample radii, "broken" = adversarial prediction wrong, eps +/- delta.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.attacks import attack_mode, per_sample_ce, pgd_steps, random_start
from models.attacks.base import fast_layout
from models.training import dpaat
from models.training.config import TrainConfig

ALPHA_FACTOR = 2.5  # PGD step = 2.5 * eps / K (Madry et al.; the spec's choice for every method)
TRADES_INIT_STD = 0.001


@dataclass
class BatchResult:
    """The loss to back-propagate and counts for the epoch's running metrics."""

    loss: torch.Tensor
    n: int
    clean_correct: int | None = None  # None when the method never classified the clean batch
    adv_correct: int | None = None


def weighted_ce(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, weight=weight)


def correct(logits: torch.Tensor | None, y: torch.Tensor) -> int | None:
    return None if logits is None else int((logits.argmax(1) == y).sum())


def mixed_loss(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(1 - beta) CE(f(x)) + beta CE(f(x_adv))`` in the model's current (train) mode; a term
    with zero weight is not computed. Returns (loss, clean logits, adversarial logits)."""
    clean = model(x) if beta < 1 else None
    adv = model(x_adv) if beta > 0 else None
    loss = x.new_zeros(())
    if clean is not None:
        loss = loss + (1 - beta) * weighted_ce(clean, y, weight)
    if adv is not None:
        loss = loss + beta * weighted_ce(adv, y, weight)
    return loss, clean, adv


Buffers = list[tuple[nn.Module, str, torch.Tensor]]


def buffers_snapshot(model: nn.Module) -> Buffers:
    """Copies of the buffers (BatchNorm running statistics): what eval mode computes with."""
    return [
        (m, name, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]


@contextmanager
def buffers_restored(saved: Buffers) -> Iterator[None]:
    """Run with the buffers of ``saved`` in place, then put the current ones back: the training
    forward's update of the running statistics is kept, not undone. The tensors are swapped, not
    copied into: autograd has saved the current ones for the backward pass."""
    current = [(m, name, m._buffers[name]) for m, name, _ in saved]  # none of them is None
    for m, name, b in saved:
        m._buffers[name] = b
    try:
        yield
    finally:
        for m, name, old in current:
            m._buffers[name] = old


class Method:
    """Base class. ``batch`` is called with the model in train mode; the trainer does the
    backward pass and the optimizer step."""

    name: ClassVar[str] = "method"

    def __init__(
        self, cfg: TrainConfig, num_train: int, num_classes: int, class_weight: torch.Tensor | None
    ) -> None:
        self.cfg = cfg
        self.num_train = num_train
        self.num_classes = num_classes
        self.class_weight = class_weight

    def batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        gen: torch.Generator,
    ) -> BatchResult:
        raise NotImplementedError

    def end_epoch(self) -> dict[str, Any]:
        """Update end-of-epoch state; returns the method's fields of the epoch's history entry."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def radius(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """eps_max for every sample, in pixel units."""
        return torch.full((n,), self.cfg.eps_max / 255.0, device=like.device, dtype=like.dtype)


class Standard(Method):
    name = "standard"

    def batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        gen: torch.Generator,
    ) -> BatchResult:
        logits = model(x)
        return BatchResult(weighted_ce(logits, y, self.class_weight), len(x), correct(logits, y))


class PGDAT(Method):
    name = "pgd_at"

    def batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        gen: torch.Generator,
    ) -> BatchResult:
        eps = self.radius(len(x), x)
        k = self.cfg.pgd_steps
        with attack_mode(model):
            init = random_start(x, eps, "linf", gen)
            x_adv = pgd_steps(model, x, y, eps, k, ALPHA_FACTOR * eps / k, init=init)
        loss, clean, adv = mixed_loss(model, x, x_adv, y, self.cfg.pgd_at_beta, self.class_weight)
        return BatchResult(loss, len(x), correct(clean, y), correct(adv, y))


def kl_per_sample(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) per sample: the TRADES attack's objective."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_q, target_probs, reduction="none").sum(1)


class TRADES(Method):
    name = "trades"

    def batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        gen: torch.Generator,
    ) -> BatchResult:
        eps = self.radius(len(x), x)
        k = self.cfg.pgd_steps
        with attack_mode(model):
            with torch.no_grad():
                p_clean = F.softmax(model(x).float(), dim=1)
            init = TRADES_INIT_STD * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            x_adv = pgd_steps(
                model, x, p_clean, eps, k, ALPHA_FACTOR * eps / k, init=init, loss_fn=kl_per_sample
            )
        clean = model(x)
        adv = model(x_adv)
        robust = F.kl_div(
            F.log_softmax(adv.float(), dim=1),
            F.softmax(clean.float(), dim=1),
            reduction="batchmean",
        )
        loss = weighted_ce(clean, y, self.class_weight) + self.cfg.trades_beta * robust
        return BatchResult(loss, len(x), correct(clean, y), correct(adv, y))


class DPAAT(Method):
    """Per-sample radii; loss criterion tau recomputed every epoch from collected clean losses."""

    name = "dpaat"
    updates_tau: ClassVar[bool] = True

    def __init__(
        self,
        cfg: TrainConfig,
        num_train: int,
        num_classes: int,
        class_weight: torch.Tensor | None,
        tau: float | None = None,
    ) -> None:
        super().__init__(cfg, num_train, num_classes, class_weight)
        start = dpaat.initial_tau(num_classes) if tau is None else tau
        self.state = dpaat.AdaptiveEpsState.create(
            num_train, cfg.step_delta, cfg.eps_min, cfg.eps_max, self.initial_tau(start)
        )
        self.batch_taus: list[float] = []  # tau_update = "batch": the tau each batch used

    def initial_tau(self, tau: float) -> float | None:
        return tau

    def criterion(self) -> dpaat.Criterion:
        assert self.state.tau is not None
        return dpaat.loss_above(self.state.tau)

    def batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        gen: torch.Generator,
    ) -> BatchResult:
        cfg, k = self.cfg, self.cfg.pgd_steps
        eps_now = self.state.eps[idx]  # 1/255 units, CPU
        eps = eps_now.to(device=x.device, dtype=x.dtype) / 255.0
        criterion = self.criterion()
        observer = dpaat.FirstBreak(x, y, criterion)
        with attack_mode(model):
            init = random_start(x, eps, "linf", gen)
            alpha = ALPHA_FACTOR * eps / k
            x_adv = pgd_steps(
                model, x, y, eps, k, alpha, init=init, observer=observer, observe_last=True
            )
        attacked = buffers_snapshot(model)  # the eval-mode function the attack saw
        loss, clean, adv = mixed_loss(model, x, x_adv, y, cfg.beta, self.class_weight)
        if clean is None:  # beta = 1: the update rules still need the clean prediction
            with attack_mode(model), torch.no_grad():
                clean = model(fast_layout(x, model))
        clean = clean.detach()
        ok = clean.argmax(1) == y
        broken = observer.broken
        # The distance is only used by the shrink rule (clean-correct and broken), so the bisection
        # runs after the training forward, on those samples only; but that forward moved the
        # BatchNorm running statistics, so the bisection runs on the attack's buffers (spec, rule
        # 1: it must see exactly the function the attack saw, else x + p may no longer break).
        with attack_mode(model), buffers_restored(attacked):
            dist = self.distance(model, x, y, broken & ok, observer, per_sample_ce(clean, y))
        self.state.record_batch(broken, per_sample_ce(clean, y)[ok] if self.updates_tau else None)
        if self.updates_tau and cfg.tau_update == "batch" and self.state.tau is not None:
            # the epoch's estimate so far, from the tau the epoch started with: after the last
            # batch it is exactly the value the per-epoch update would compute
            self.batch_taus.append(self.state.tau)
            self.state.tau = self.next_tau(self.state.tau_history[-1])
        new_eps = self.update(eps_now.to(x.device), ok, broken, dist)
        dpaat.scatter_first(self.state.eps, idx.cpu(), new_eps.cpu())
        adv_logits = adv if adv is not None else observer.last_logits
        return BatchResult(loss, len(x), correct(clean, y), correct(adv_logits, y))

    def distance(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        which: torch.Tensor,
        observer: dpaat.FirstBreak,
        clean_loss: torch.Tensor,
    ) -> torch.Tensor:
        """d[i] = s[i] * ||p[i]||_inf (1/255 units) for the samples in the mask ``which``, 0
        elsewhere; p is the first breaking iterate's perturbation (``observer.first``), and s comes
        from the bisection (the spec) or, with ``boundary_search = "secant"``, from regula falsi
        started at ``clean_loss`` and the loss the observer saw at x + p."""
        dist = torch.zeros(len(x), device=x.device)
        rows = which.nonzero().squeeze(1)
        if len(rows) == 0:
            return dist
        p, steps = observer.first[rows], self.cfg.bisection_steps
        if self.cfg.boundary_search == "secant":
            assert self.state.tau is not None
            s = dpaat.boundary_fraction_secant(
                model, x[rows], p, y[rows], self.state.tau, steps,
                clean_loss[rows], observer.first_loss[rows],
            )  # fmt: skip
        else:
            s = dpaat.boundary_fraction(model, x[rows], p, y[rows], observer.criterion, steps)
        dist[rows] = (s * p.flatten(1).abs().amax(1) * 255.0).float()
        return dist

    def update(
        self, eps: torch.Tensor, ok: torch.Tensor, broken: torch.Tensor, dist: torch.Tensor
    ) -> torch.Tensor:
        c = self.cfg
        return dpaat.update_radii(eps, ok, broken, dist, c.step_delta, c.eps_min, c.eps_max)

    def end_epoch(self) -> dict[str, Any]:
        st, c = self.state, self.cfg
        losses = st.collected_losses()
        tau_used = st.tau
        batch_taus = self.batch_taus
        if batch_taus:
            tau_used = batch_taus[0]  # the epoch's first tau, as with the per-epoch update
        if self.updates_tau and st.tau is not None:
            st.tau = self.next_tau(st.tau_history[-1] if batch_taus else st.tau)
            st.tau_history.append(st.tau)
        record = {
            "tau": tau_used,
            **(
                {"tau_batches": {"min": min(batch_taus), "max": max(batch_taus)}}
                if batch_taus
                else {}
            ),
            "tau_next": st.tau,
            "collected": int(losses.numel()),
            "broken_frac": st.broken / max(st.seen, 1),
            "eps_mean": float(st.eps.double().mean()),
            "eps_hist": dpaat.eps_histogram(st.eps, c.eps_min, c.eps_max),
        }
        st.reset_epoch()
        self.batch_taus = []
        return record

    def next_tau(self, old: float) -> float:
        """tau from the losses collected so far this epoch, smoothed against ``old``."""
        c = self.cfg
        return dpaat.next_tau(
            old,
            self.state.collected_losses(),
            c.z,
            c.tau_momentum,
            c.tau_statistic,
            c.tau_quantile,
        )

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)


class AMATExternal(DPAAT):
    """Exactly DPAAT except that tau is given (from a reference model) and never updated."""

    name = "amat_external"
    updates_tau = False

    def __init__(
        self,
        cfg: TrainConfig,
        num_train: int,
        num_classes: int,
        class_weight: torch.Tensor | None,
        tau: float | None = None,
    ) -> None:
        if tau is None:
            raise ValueError("amat_external needs the tau of its reference model")
        super().__init__(cfg, num_train, num_classes, class_weight, tau)


class IAATFlip(DPAAT):
    """Per-sample radii; broken = some iterate is misclassified; eps +/- delta (no tau)."""

    name = "iaat_flip"
    updates_tau = False

    def initial_tau(self, tau: float) -> float | None:
        return None

    def criterion(self) -> dpaat.Criterion:
        return dpaat.misclassified

    def distance(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        which: torch.Tensor,
        observer: dpaat.FirstBreak,
        clean_loss: torch.Tensor,
    ) -> torch.Tensor:
        return torch.zeros(len(x), device=x.device)  # the flip rule needs no distance

    def update(
        self, eps: torch.Tensor, ok: torch.Tensor, broken: torch.Tensor, dist: torch.Tensor
    ) -> torch.Tensor:
        c = self.cfg
        return dpaat.flip_radii(eps, broken, c.step_delta, c.eps_min, c.eps_max)


METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (Standard, PGDAT, TRADES, DPAAT, AMATExternal, IAATFlip)
}


def make_method(
    cfg: TrainConfig,
    num_train: int,
    num_classes: int,
    class_weight: torch.Tensor | None = None,
    tau: float | None = None,
) -> Method:
    """The method named by ``cfg.method``; ``tau`` is the fixed threshold of ``amat_external``."""
    cls = METHOD_CLASSES[cfg.method]
    if issubclass(cls, DPAAT):
        return cls(cfg, num_train, num_classes, class_weight, tau)
    return cls(cfg, num_train, num_classes, class_weight)
