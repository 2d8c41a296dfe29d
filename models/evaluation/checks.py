"""Validity checks of an adversarial evaluation (Carlini et al. 2019, "On Evaluating Adversarial
Robustness"; the flags of AutoAttack). Each check returns ``{"name", "status", "detail"}`` with
status ``pass``, ``warn`` or ``fail``; the verdict is the worst status.

Checks that compare numbers tolerate a small excess as a warning (one sample, or 1% of them): with
random starts, per-eps attacks are separate runs and one sample can flip by chance; more than that
means an attack or the model is broken (gradient masking, a weak attack, a bug).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from models.attacks import PGD, per_sample_ce
from models.attacks.base import attack_mode

Check = dict[str, str]
STATUS_ORDER = ("pass", "warn", "fail")
BLACK_BOX = frozenset({"square"})
SINGLE_STEP = frozenset({"fgsm"})
AttackFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def result(name: str, status: str, detail: str) -> Check:
    if status not in STATUS_ORDER:
        raise ValueError(f"unknown status {status!r}")
    return {"name": name, "status": status, "detail": detail}


def verdict(checks: Sequence[Mapping[str, str]]) -> str:
    """The worst status of ``checks`` (``pass`` when there are none)."""
    return max((c["status"] for c in checks), key=STATUS_ORDER.index, default="pass")


def _grade(excess: int, n: int) -> str:
    """0 -> pass; up to one sample or 1% of ``n`` -> warn (noise of random starts); more -> fail."""
    if excess <= 0:
        return "pass"
    return "warn" if excess <= max(1, int(0.01 * n)) else "fail"


def _fmt(eps: float) -> str:
    return f"{eps:g}/255"


# ----------------------------------------------------------------------- from the attack results
def check_eps_zero(attacks: Mapping[str, AttackFn], x: torch.Tensor, y: torch.Tensor) -> Check:
    """Every attack at eps = 0 returns its input unchanged."""
    worst: dict[str, float] = {}
    for label, attack in attacks.items():
        adv = attack(x, y, 0.0)
        worst[label] = float((adv - x).abs().max()) if adv.shape == x.shape else float("inf")
    bad = {k: v for k, v in worst.items() if v > 1e-7}
    if bad:
        text = ", ".join(f"{k}: max |change| {v:.3g}" for k, v in bad.items())
        return result("eps_zero_identity", "fail", f"eps = 0 changed the inputs ({text})")
    return result(
        "eps_zero_identity",
        "pass",
        f"{len(attacks)} attack(s) left {len(x)} inputs unchanged at eps = 0",
    )


def check_budget(max_excess: float, out_of_range: float) -> Check:
    """Adversarial examples stay inside the L-infinity ball and in [0, 1] (pixel units)."""
    if max_excess > 1e-6 or out_of_range > 1e-6:
        return result(
            "perturbation_budget",
            "fail",
            f"an attack left the threat model: |delta| exceeded eps by {max_excess:.3g}, "
            f"pixels left [0, 1] by {out_of_range:.3g}",
        )
    return result(
        "perturbation_budget", "pass", "every adversarial example is within eps and [0, 1]"
    )


def check_monotone(curves: Mapping[str, Sequence[tuple[float, float]]], n: int) -> Check:
    """Robust accuracy never rises with eps, for the worst case and for each attack.

    ``curves``: label -> [(eps, accuracy)]; ``n``: number of samples (to turn rises into counts).
    """
    rises: list[tuple[str, float, float, int]] = []
    for label, points in curves.items():
        pts = sorted(points)
        for (e0, a0), (e1, a1) in itertools.pairwise(pts):
            count = round((a1 - a0) * n)
            if count > 0:
                rises.append((label, e0, e1, count))
    if not rises:
        return result("monotone_in_eps", "pass", "robust accuracy never rises with eps")
    status = _grade(max(r[3] for r in rises), n)
    text = "; ".join(f"{lbl}: +{c} sample(s) from {_fmt(a)} to {_fmt(b)}" for lbl, a, b, c in rises)
    return result("monotone_in_eps", status, f"robust accuracy rises with eps ({text})")


def check_iterative_vs_fgsm(
    fooled: Mapping[float, Mapping[str, torch.Tensor]], names: Mapping[str, str], n: int
) -> Check:
    """Iterative white-box attacks are at least as strong as FGSM: FGSM never fools a sample that
    every iterative attack missed. ``fooled``: eps -> label -> bool (N,) per sample (in a cascade,
    FGSM runs after the iterative attacks, on their survivors only)."""
    fgsm = [lbl for lbl, nm in names.items() if nm in SINGLE_STEP]
    iterative = [lbl for lbl, nm in names.items() if nm not in SINGLE_STEP | BLACK_BOX]
    if not fgsm or not iterative:
        return result(
            "iterative_beats_fgsm",
            "warn",
            "not checked: needs FGSM and an iterative white-box attack among the attacks",
        )
    worst: tuple[int, float] = (0, 0.0)
    for eps, by_attack in fooled.items():
        iter_any = torch.stack([by_attack[lbl] for lbl in iterative]).any(0)
        fgsm_any = torch.stack([by_attack[lbl] for lbl in fgsm]).any(0)
        count = int((fgsm_any & ~iter_any).sum())
        if count > worst[0]:
            worst = (count, eps)
    if worst[0] == 0:
        return result(
            "iterative_beats_fgsm",
            "pass",
            f"{', '.join(iterative)}: FGSM fooled no sample they missed",
        )
    return result(
        "iterative_beats_fgsm",
        _grade(worst[0], n),
        f"FGSM fooled {worst[0]} sample(s) that every iterative attack missed at "
        f"{_fmt(worst[1])}: the iterative attacks are weaker than one step",
    )


def check_black_box(
    fooled: Mapping[float, Mapping[str, torch.Tensor]], names: Mapping[str, str], n: int
) -> Check:
    """The black-box attack never fools a sample that every white-box attack missed (a sign of
    gradient masking). ``fooled``: eps -> label -> bool (N,) per sample."""
    black = [lbl for lbl, nm in names.items() if nm in BLACK_BOX]
    white = [lbl for lbl, nm in names.items() if nm not in BLACK_BOX]
    if not black or not white:
        return result(
            "black_box_not_stronger",
            "warn",
            "not checked: run a black-box attack (square) next to the white-box ones "
            "to test for gradient masking",
        )
    worst: tuple[int, float] = (0, 0.0)
    for eps, by_attack in fooled.items():
        white_any = torch.stack([by_attack[lbl] for lbl in white]).any(0)
        black_any = torch.stack([by_attack[lbl] for lbl in black]).any(0)
        count = int((black_any & ~white_any).sum())
        if count > worst[0]:
            worst = (count, eps)
    if worst[0] == 0:
        return result(
            "black_box_not_stronger",
            "pass",
            "the black-box attack fooled no sample the white-box ones missed",
        )
    return result(
        "black_box_not_stronger",
        _grade(worst[0], n),
        f"the black-box attack fooled {worst[0]} sample(s) that every white-box attack missed "
        f"at {_fmt(worst[1])}: possible gradient masking",
    )


# --------------------------------------------------------------------------- from the model
def check_logits(outputs: torch.Tensor, num_classes: int) -> Check:
    """The model returns logits: (N, K), finite, and not rows of probabilities."""
    name = "returns_logits"
    if outputs.ndim != 2 or outputs.shape[1] != num_classes:
        return result(
            name, "fail", f"outputs have shape {tuple(outputs.shape)}, expected (N, {num_classes})"
        )
    if not bool(torch.isfinite(outputs).all()):
        return result(name, "fail", "the model returned non-finite outputs")
    o = outputs.double()
    in_unit = bool(((o >= 0) & (o <= 1)).all())
    sums_to_one = bool(((o.sum(1) - 1).abs() < 1e-3).all())
    if in_unit and sums_to_one:
        return result(
            name,
            "fail",
            "every output row is a probability vector: the model seems to apply softmax, which "
            "saturates the cross-entropy gradients the attacks follow",
        )
    if in_unit:
        return result(
            name,
            "warn",
            "every output is within [0, 1]: the model may apply a sigmoid to its logits",
        )
    if bool((o <= 0).all()) and bool((torch.logsumexp(o, 1).abs() < 1e-3).all()):
        return result(name, "pass", "outputs are log-probabilities (valid logits up to a constant)")
    return result(name, "pass", "outputs are unnormalised logits")


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Check:
    """Input gradients of the cross-entropy are finite and not all zero."""
    name = "gradients_finite_nonzero"
    with attack_mode(model), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = per_sample_ce(model(xg), y)
        (grad,) = torch.autograd.grad(loss.sum(), xg)
    if not bool(torch.isfinite(grad).all()):
        return result(name, "fail", "input gradients contain NaN or infinity")
    zero = (grad.flatten(1).abs().amax(1) == 0).sum().item()
    if zero == len(x):
        return result(
            name,
            "fail",
            f"input gradients are exactly zero for all {len(x)} samples (non-differentiable input "
            "processing, e.g. quantisation, masks the gradients)",
        )
    if zero > 0.1 * len(x):
        return result(name, "warn", f"input gradients are zero for {zero} of {len(x)} samples")
    return result(name, "pass", f"input gradients finite and non-zero ({zero} of {len(x)} zero)")


def check_eval_deterministic(model: nn.Module, x: torch.Tensor, given_training: bool) -> Check:
    """The model is in eval mode everywhere and two forward passes agree.

    ``given_training``: whether the caller handed over the model in train mode (evaluate_model
    switches it to eval mode, which is worth a warning but is not an error).
    """
    name = "eval_mode_deterministic"
    stuck = [n or "<root>" for n, m in model.named_modules() if m.training]
    with torch.no_grad():
        a, b = model(x), model(x)
    diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
    tol = 1e-5 * max(1.0, float(a.abs().max()))
    problems = []
    if stuck:
        problems.append(f"modules still in train mode after eval(): {', '.join(stuck[:5])}")
    if not diff <= tol:
        problems.append(f"two forward passes differ by up to {diff:.3g} (randomness in the model)")
    if problems:
        return result(name, "fail", "; ".join(problems))
    if given_training:
        return result(
            name, "warn", "the model was passed in train mode; it was evaluated in eval mode"
        )
    return result(name, "pass", "eval mode everywhere and two forward passes agree")


def check_large_eps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 64.0, steps: int = 20
) -> Check:
    """PGD at a large radius (``eps`` in 1/255 units) drives accuracy to about zero; if it does not,
    the attack cannot follow the model's gradients."""
    name = "large_eps_breaks_model"
    attack = PGD(model, steps=steps, restarts=1, seed=0)
    adv = attack(x, y, eps / 255.0)
    with torch.no_grad():
        correct = int((model(adv).argmax(1) == y).sum())
    acc = correct / len(x)
    detail = f"PGD-{steps} at {_fmt(eps)}: accuracy {acc:.3f} ({correct} of {len(x)} samples)"
    if correct <= max(1, int(0.01 * len(x))):
        return result(name, "pass", detail)
    return result(name, "warn" if acc <= 0.1 else "fail", detail + "; expected about 0")
