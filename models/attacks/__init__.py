"""Adversarial attacks with a per-sample epsilon. See :mod:`models.attacks.base`."""

from models.attacks.base import Attack, attack_mode, per_sample_ce
from models.attacks.pgd import FGSM, PGD, pgd_steps, project, random_start

__all__ = ["FGSM", "PGD", "Attack", "attack_mode", "per_sample_ce", "pgd_steps", "project", "random_start"]
