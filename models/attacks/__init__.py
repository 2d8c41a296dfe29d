"""Adversarial attacks with a per-sample epsilon (pixel units), chosen by name with
:func:`make_attack`. See :mod:`models.attacks.base` for what every attack guarantees."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from models.attacks.apgd import APGD, APGDCE, APGDDLR, APGDT, apgd_run, dlr_loss, targeted_dlr_loss
from models.attacks.base import Attack, attack_mode, per_sample_ce
from models.attacks.min_eps import flip_search, robustness_score
from models.attacks.pgd import FGSM, PGD, pgd_steps, project, random_start
from models.attacks.reference import AutoAttackReference
from models.attacks.square import Square

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (FGSM, PGD, APGDCE, APGDDLR, APGDT, Square, AutoAttackReference)
}


def attack_params(name: str) -> list[str]:
    """The keyword parameters the attack ``name`` accepts."""
    sig = inspect.signature(ATTACKS[name].__init__)
    return [p for p in sig.parameters if p not in ("self", "model")]


def make_attack(name: str, model: nn.Module, **params: Any) -> Attack:
    """The attack registered under ``name`` ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t",
    "square", and "autoattack", the torchattacks reference) for ``model``. Unknown names and
    parameters raise ValueError listing the valid
    ones."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS)}")
    allowed = attack_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"attack {name!r} has no parameter {unknown}; it takes {allowed}")
    try:
        return ATTACKS[name](model, **params)
    except TypeError as e:  # e.g. a string where a number belongs
        raise ValueError(f"bad parameters for attack {name!r}: {e}") from e


__all__ = [
    "APGD",
    "APGDCE",
    "APGDDLR",
    "APGDT",
    "ATTACKS",
    "FGSM",
    "PGD",
    "Attack",
    "AutoAttackReference",
    "Square",
    "apgd_run",
    "attack_mode",
    "attack_params",
    "dlr_loss",
    "flip_search",
    "make_attack",
    "per_sample_ce",
    "pgd_steps",
    "project",
    "random_start",
    "robustness_score",
    "targeted_dlr_loss",
]
