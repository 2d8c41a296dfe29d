"""The robustness score of single images (the prediction endpoint; docs/dpaat.md).

For each image: the predicted class, ``eps_star`` = the smallest L-infinity radius (1/255 units) at
which PGD flips that prediction, searched up to ``cap``, ``stable_at`` for the radii of the threat
model, and ``score = min(eps_star / cap, 1)`` (1 when nothing below the cap flips it).

The search: every candidate radius of every image in one batched PGD run (each image replicated once
per radius), then bisection between the largest radius below the first flipping one and that one,
one batched PGD run per bisection step for all images at their own midpoints.

The attack is untargeted against the *prediction* (no label is known) and maximises the margin
``max_{j != pred} z_j - z_pred``: unlike the cross-entropy, its gradient does not vanish on very
confident predictions. Any iterate that flips the prediction counts (the run also looks at the last
one). The random start is the same unit-cube pattern (drawn from ``seed``) scaled by each radius,
so an image's result does not depend on the other images of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.attacks.base import attack_mode, fast_layout, view
from models.attacks.pgd import pgd_steps

ALPHA_FACTOR = 2.5  # PGD step = 2.5 eps / steps, as everywhere in the project
GRID_OCTAVES = 7  # the grid runs geometrically from cap / 2**7 to cap


def prediction_margin(logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """max_{j != pred} z_j - z_pred: positive once another class beats the prediction."""
    z = logits.float()
    z_pred = z.gather(1, pred[:, None]).squeeze(1)
    return z.scatter(1, pred[:, None], -math.inf).amax(1) - z_pred


def start_pattern(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One uniform pattern in [-1, 1]^(C, H, W) for all images, from ``seed`` (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.empty(tuple(x.shape[1:]), dtype=x.dtype).uniform_(-1.0, 1.0, generator=g)
    return u.to(x.device)


def flip_search(
    model: nn.Module,
    x: torch.Tensor,
    pred: torch.Tensor,
    eps: torch.Tensor,
    *,
    steps: int = 10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD at per-sample radii ``eps`` (pixel units) against the predicted classes ``pred``.

    Returns ``(flipped (N,) bool, witness)``: the witness is the first iterate that flipped the
    prediction (inside the ball, in [0, 1]), or ``x`` where none did.
    """
    with attack_mode(model):
        x = x.detach()
        flipped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        witness = x.clone()

        def observe(_k: int, x_adv: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor) -> None:
            nonlocal witness, flipped
            new = (logits.argmax(1) != pred) & ~flipped
            witness = torch.where(view(new, x), x_adv, witness)
            flipped = flipped | new

        init = start_pattern(x, seed) * view(eps, x)
        alpha = ALPHA_FACTOR * eps / steps
        pgd_steps(model, x, pred, eps, steps, alpha, "linf", init, prediction_margin, observe, True)
    return flipped, witness.contiguous()


def radius_grid(cap: float, n_radii: int, eps_list: Sequence[float] = ()) -> list[float]:
    """The radii of the batched run (1/255 units): ``n_radii`` geometric ones from cap / 128 to
    ``cap`` (cap / 64, ..., cap / 2, cap for the default 8), plus the positive radii of
    ``eps_list`` (so ``stable_at`` comes from the same run)."""
    steps = max(n_radii - 1, 1)
    # exponents -7 * j / steps computed as one division, so 8 radii are exact powers of two
    grid = [cap * 2.0 ** (-GRID_OCTAVES * (steps - i) / steps) for i in range(n_radii)]
    if n_radii == 1:
        grid = [cap]
    merged: dict[float, float] = {}
    for r in [*grid, *(float(e) for e in eps_list if e > 0)]:
        merged.setdefault(round(r, 9), r)
    return sorted(merged.values())


def _eps_key(eps: float) -> str:
    return f"{float(eps):g}"


def robustness_score(
    model: nn.Module,
    x: torch.Tensor,
    *,
    cap: float = 16.0,
    eps_list: Sequence[float] = (0.5, 1, 2, 4, 8),
    steps: int = 10,
    n_radii: int = 8,
    bisection_steps: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    return_adversarial: bool = False,
) -> list[dict[str, Any]]:
    """Per image of ``x`` (N, C, H, W) in [0, 1]: ``{"predicted", "eps_star", "stable_at", "score",
    "cap"}`` (see the module docstring; radii in 1/255 units).

    ``eps_star`` is None when no radius up to ``cap`` flips the prediction (score 1.0); otherwise it
    is the upper end of the final bisection interval, rounded up to 1e-4 (the witness lies inside
    that ball). ``stable_at[e]`` is False when PGD at ``e`` flipped the prediction or when a flip
    was found at a radius <= e (the witness is inside the e-ball too); eps = 0 is always stable.
    ``return_adversarial`` adds ``"adversarial"``: the witness image (C, H, W) at eps_star, or None.
    ``batch_size`` bounds the rows (image x radius) of one PGD call.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError("cap must be > 0")
    if n_radii < 1 or steps < 1 or bisection_steps < 0 or batch_size < 1:
        raise ValueError("n_radii and steps must be >= 1, bisection_steps >= 0, batch_size >= 1")
    if any(not math.isfinite(float(e)) or e < 0 for e in eps_list):
        raise ValueError("eps_list values must be finite and >= 0")
    n = len(x)
    if n == 0:
        return []
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError("inputs must lie in [0, 1]")
    x = x.detach()
    radii = radius_grid(cap, n_radii, eps_list)
    r = len(radii)
    with attack_mode(model), torch.no_grad():
        chunks = [fast_layout(x[s : s + batch_size], model) for s in range(0, n, batch_size)]
        pred = torch.cat([model(c).argmax(1) for c in chunks])

    def search(
        rows_x: torch.Tensor, rows_pred: torch.Tensor, rows_eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flips, witnesses = [], []
        for s in range(0, len(rows_x), batch_size):
            f, w = flip_search(
                model,
                rows_x[s : s + batch_size],
                rows_pred[s : s + batch_size],
                rows_eps[s : s + batch_size] / 255.0,
                steps=steps,
                seed=seed,
            )
            flips.append(f)
            witnesses.append(w if return_adversarial else w[:0])
        return torch.cat(flips), torch.cat(witnesses)

    # 1. every radius of every image in one batched run (rows: image-major)
    grid = torch.tensor(radii, dtype=x.dtype, device=x.device)
    flips, wits = search(x.repeat_interleave(r, 0), pred.repeat_interleave(r), grid.repeat(n))
    flips = flips.view(n, r)
    in_cap = grid <= cap
    flips_in_cap = flips & in_cap
    found = flips_in_cap.any(1)
    first = torch.where(found, flips_in_cap.float().argmax(1), torch.zeros_like(pred))
    hi = grid[first]
    lo = torch.where(first > 0, grid[(first - 1).clamp_min(0)], torch.zeros_like(hi))
    witness = wits.view(n, r, *x.shape[1:])[torch.arange(n), first] if return_adversarial else None

    # 2. bisection between the largest surviving radius and the first flipping one
    idx = found.nonzero().squeeze(1)
    for _ in range(bisection_steps if idx.numel() else 0):
        mid = (lo[idx] + hi[idx]) / 2
        f, w = search(x[idx], pred[idx], mid)
        hi[idx] = torch.where(f, mid, hi[idx])
        lo[idx] = torch.where(f, lo[idx], mid)
        if witness is not None:
            witness[idx] = torch.where(view(f, w), w, witness[idx])

    results = []
    for i in range(n):
        eps_star = math.ceil(round(float(hi[i]) * 1e4, 6)) / 1e4 if bool(found[i]) else None
        stable = {}
        for e in eps_list:
            e = float(e)
            if e <= 0:
                stable[_eps_key(e)] = True
                continue
            flipped_at_e = bool(flips[i, radii.index(_grid_value(radii, e))])
            stable[_eps_key(e)] = not flipped_at_e and not (eps_star is not None and eps_star <= e)
        item: dict[str, Any] = {
            "predicted": int(pred[i]),
            "eps_star": eps_star,
            "stable_at": stable,
            "score": 1.0 if eps_star is None else min(eps_star / cap, 1.0),
            "cap": float(cap),
        }
        if return_adversarial:
            item["adversarial"] = witness[i].cpu() if witness is not None and found[i] else None
        results.append(item)
    return results


def _grid_value(radii: list[float], e: float) -> float:
    """The grid radius that stands for ``e`` (merged at 1e-9 precision)."""
    return next(r for r in radii if round(r, 9) == round(e, 9))
