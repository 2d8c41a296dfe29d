"""Attack presets as plain data (no torch: the torch-free CI client expands them too).

- ``quick``: FGSM + PGD-10, for a 2-core CPU.
- ``default``: our full suite at reduced budgets (APGD 20 steps, Square 300 queries): minutes on
  a CPU for a few hundred 64 px images.
- ``full``: our suite at AutoAttack's budgets (APGD-CE and APGD-T 100 steps, all targets up to 9,
  Square 5,000 queries), cascaded by the evaluation: what a report should be compared with.
- ``autoattack``: the reference implementation (torchattacks' AutoAttack "standard"), reported
  under its own name.
"""

from __future__ import annotations

from typing import Any

QUICK: tuple[dict[str, Any], ...] = ({"name": "fgsm"}, {"name": "pgd", "steps": 10})
DEFAULT: tuple[dict[str, Any], ...] = (
    {"name": "fgsm"},
    {"name": "pgd", "steps": 20, "restarts": 1},
    {"name": "apgd-ce", "steps": 20},
    {"name": "apgd-t", "steps": 20, "n_target_classes": 3},
    {"name": "square", "n_queries": 300},
)
FULL: tuple[dict[str, Any], ...] = (
    {"name": "fgsm"},
    {"name": "pgd", "steps": 20, "restarts": 1},
    {"name": "apgd-ce", "steps": 100},
    {"name": "apgd-t", "steps": 100},
    {"name": "square", "n_queries": 5000},
)
AUTOATTACK: tuple[dict[str, Any], ...] = ({"name": "autoattack"},)
ATTACK_PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "quick": QUICK,
    "default": DEFAULT,
    "full": FULL,
    "autoattack": AUTOATTACK,
}


def expand(name: str) -> list[dict[str, Any]] | None:
    """The attack specs of preset ``name`` (copies), or None when it is not a preset."""
    preset = ATTACK_PRESETS.get(name)
    return None if preset is None else [dict(a) for a in preset]
