"""Square attack (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search"), L-infinity, written from the paper.

Black-box: forward passes only, under ``torch.no_grad``. It starts from vertical stripes of +-eps
and then, one query per iteration, proposes to set a random square window to +-eps (one sign per
channel) and keeps the proposal when it lowers the margin z_y - max_{j != y} z_j. The window covers
a fraction p of the image, p shrinking from ``p_init`` on the paper's schedule. A sample stops as
soon as it is misclassified or has used its budget. Its point in an evaluation: a model whose
gradients are masked resists the white-box attacks but not this one.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from models.attacks.base import Attack, fast_layout, like_input, view

# (fraction of the budget used, divisor of p_init) on the paper's schedule (defined for 10,000
# queries and rescaled to the budget, as in the authors' code)
_P_SCHEDULE = (
    (0.001, 1), (0.005, 2), (0.02, 4), (0.05, 8), (0.1, 16), (0.2, 32), (0.4, 64), (0.6, 128),
    (0.8, 256),
)  # fmt: skip


def p_fraction(p_init: float, it: int, n_queries: int) -> float:
    """The share of the image the window covers at iteration ``it`` of a ``n_queries`` budget."""
    used = it / n_queries
    divisor = 512
    for bound, d in _P_SCHEDULE:
        if used <= bound:
            divisor = d
            break
    return p_init / divisor


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j: negative once the sample is misclassified."""
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    return z_y - z.scatter(1, y[:, None], -math.inf).amax(1)


class Square(Attack):
    """Square attack, L-infinity. ``n_queries`` is the budget of forward passes per sample, the
    clean one included; ``queries`` holds how many each sample of the last call used."""

    name: ClassVar[str] = "square"

    def __init__(
        self,
        model: nn.Module,
        n_queries: int = 1000,
        p_init: float = 0.8,
        seed: int | None = 0,
        batch_size: int = 256,
    ) -> None:
        if n_queries < 1:
            raise ValueError("n_queries must be >= 1")
        if not 0 < p_init <= 1:
            raise ValueError("p_init must lie in (0, 1]")
        super().__init__(model, batch_size, seed, n_queries=n_queries, p_init=p_init)
        self.n_queries, self.p_init = n_queries, p_init
        self.queries: torch.Tensor | None = None
        self._chunk_queries: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        self._chunk_queries = []
        out = super().__call__(x, y, eps)
        self.queries = (
            torch.cat(self._chunk_queries)
            if self._chunk_queries
            else torch.zeros(0, dtype=torch.long)
        )
        return out

    def _signs(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Random +-1 (on the CPU when seeded, like every draw of this attack)."""
        dev = like.device if self.generator is None else torch.device("cpu")
        s = torch.randint(0, 2, shape, generator=self.generator, device=dev)
        return (2 * s - 1).to(like.device, like.dtype)

    def _positions(self, n: int, high: int, like: torch.Tensor) -> torch.Tensor:
        dev = like.device if self.generator is None else torch.device("cpu")
        return torch.randint(0, high, (n, 1), generator=self.generator, device=dev).to(like.device)

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x_in, x = x, fast_layout(x, self.model, backward=False)  # no gradient, ever
        e = view(eps, x)
        lo, hi = (x - e).clamp_(min=0.0), (x + e).clamp_(max=1.0)
        # Every random draw is made for the whole chunk and the rows in play taken from it, so a
        # sample's result does not depend on which others are attacked (an evaluation's cascade
        # gives radius 0, hence no query at all, to the samples an earlier attack broke).
        queries = (eps > 0).long()
        best_margin = torch.full((n,), -1.0, device=x.device)
        live = (eps > 0).nonzero().squeeze(1)
        if live.numel():
            best_margin[live] = margin(self.model(x[live]), y[live])
        x_best = x.clone()

        def todo() -> torch.Tensor:
            return (
                ((best_margin >= 0) & (queries < self.n_queries) & (eps > 0)).nonzero().squeeze(1)
            )

        # start: vertical stripes of +-eps, one sign per channel and column, accepted as they are
        idx = todo()
        if idx.numel():
            stripes = self._signs((n, c, 1, w), x)[idx] * e[idx]
            cand = (x[idx] + stripes).clamp_(min=lo[idx], max=hi[idx])
            best_margin[idx] = margin(self.model(cand), y[idx])
            x_best[idx] = cand
            queries[idx] += 1
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        # the clean pass and the stripes used 2 queries; the schedule counts iterations from 0
        for it in range(self.n_queries - 2):
            idx = todo()
            if idx.numel() == 0:
                break
            p = p_fraction(self.p_init, it, self.n_queries)
            side = min(max(round(math.sqrt(p * h * w)), 1), min(h, w) - 1)
            r0 = self._positions(n, h - side + 1, x)[idx]
            c0 = self._positions(n, w - side + 1, x)[idx]
            window = (
                (((rows >= r0) & (rows < r0 + side))[:, None, :, None])
                & (((cols >= c0) & (cols < c0 + side))[:, None, None, :])
            )
            xi, bi, li, ui = x[idx], x_best[idx], lo[idx], hi[idx]
            step = self._signs((n, c, 1, 1), x)[idx] * e[idx]
            cand = torch.where(window, xi + step, bi).clamp_(min=li, max=ui)
            # a proposal that changes nothing (clipped at 0 or 1) wastes a query: flip its signs
            same = (cand == bi).flatten(1).all(1)
            if bool(same.any()):
                flipped = torch.where(window, xi - step, bi).clamp_(min=li, max=ui)
                cand = torch.where(view(same, cand), flipped, cand)
            new_margin = margin(self.model(cand), y[idx])
            queries[idx] += 1
            better = new_margin < best_margin[idx]
            x_best[idx] = torch.where(view(better, cand), cand, bi)
            best_margin[idx] = torch.where(better, new_margin, best_margin[idx])
        self._chunk_queries.append(queries.cpu())
        return like_input(x_best, x_in)
