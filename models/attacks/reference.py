"""AutoAttack as a reference: torchattacks' ``AutoAttack`` (Croce & Hein 2020; version "standard":
APGD-CE, APGD-T, FAB-T, Square, each on the samples the previous ones did not break), wrapped in our
attack interface so that an evaluation can report it under its own name next to our suite.

torchattacks is an optional dependency (its release pins an old ``requests``: install it with
``pip install --no-deps torchattacks==3.5.1``). Its budgets are its own defaults (APGD 10 steps,
Square 5,000 queries), recorded by ``describe()``. It takes one scalar radius, so samples are
grouped by radius; a radius of 0 costs nothing, as for every attack of ours.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.attacks.base import Attack
from models.attacks.pgd import active_rows

TORCHATTACKS_HINT = "pip install --no-deps torchattacks==3.5.1"


class AutoAttackReference(Attack):
    """torchattacks' AutoAttack ("standard", L-infinity), ``n_classes`` read from the model."""

    name: ClassVar[str] = "autoattack"

    def __init__(
        self,
        model: nn.Module,
        version: str = "standard",
        seed: int | None = 0,
        batch_size: int = 256,
    ) -> None:
        if version not in ("standard", "plus", "rand"):
            raise ValueError("version must be 'standard', 'plus' or 'rand'")
        super().__init__(model, batch_size, seed, version=version, implementation=_implementation())
        self.version = version

    def perturb(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        import torchattacks

        out = x.clone()
        rows = active_rows(eps)
        if rows.numel() == 0:
            return out
        with torch.no_grad():
            k = int(self.model(x[:1].contiguous()).shape[1])
        for radius in torch.unique(eps[rows]).tolist():
            sel = rows[eps[rows] == radius]
            attack = torchattacks.AutoAttack(
                self.model, norm="Linf", eps=radius, version=self.version, n_classes=k,
                seed=self.seed,
            )  # fmt: skip
            # contiguous NCHW: torchattacks calls .view on input gradients (docs/dpaat.md's trap)
            out[sel] = attack(x[sel].contiguous(), y[sel]).to(out.dtype)
        return out


def _implementation() -> str:
    try:
        import torchattacks
    except ImportError:
        hint = f"the autoattack reference needs torchattacks: {TORCHATTACKS_HINT}"
        raise ValueError(hint) from None
    return f"torchattacks {torchattacks.__version__}"
