"""The evaluation protocol of docs/dpaat.md: clean and worst-case robust metrics over a list of
attacks and radii, the robustness curve, Grad-CAM lesion focus and the validity checks, returned as
the report dict (the contract shared by the CLI, the API and CI audits; see docs/decisions).

All epsilons in the report are in 1/255 units; attacks receive pixel units.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from models.attacks import Attack, make_attack, per_sample_ce
from models.data import ImageDataset
from models.evaluation import checks as ck
from models.evaluation.gradcam import cam_grid, cam_unavailable, grad_cam, lesion_focus
from models.evaluation.metrics import classification_metrics, mean_interval, wilson
from models.evaluation.report import to_jsonable

REPORT_VERSION = 1
DEFAULT_EPS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_ATTACKS: tuple[dict[str, Any], ...] = ({"name": "fgsm"}, {"name": "pgd", "steps": 20})
Progress = Callable[[str, float], None]
# share of the progress bar per stage: the attacks dominate the run time
_CLEAN, _ATTACKS, _CHECKS = 0.05, 0.85, 0.09
# attacks run their full budget even at eps = 0 (Square: every query), so this check stays small
_EPS_ZERO_SAMPLES = 8


def eps_key(eps: float) -> str:
    """The key of an eps (1/255 units) in ``report["robust"]``: ``0``, ``0.5``, ``2``..."""
    return f"{float(eps):g}"


def build_attack(spec: Mapping[str, Any], model: nn.Module) -> Attack:
    """An attack from its spec ``{"name": ..., **params}`` (see ``models.attacks.make_attack``)."""
    params = dict(spec)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"attack spec {dict(spec)!r} has no name")
    return make_attack(name, model, **params)


def _labels(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Unique labels: the attack name, numbered when the same attack runs twice."""
    names = [str(s.get("name")) for s in specs]
    return [
        n if names.count(n) == 1 else f"{n}-{names[: i + 1].count(n)}" for i, n in enumerate(names)
    ]


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Timer:
    """Seconds per named stage (CUDA work is synchronised before reading the clock)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, key: str, since: float) -> float:
        t = self.now()
        self.totals[key] = self.totals.get(key, 0.0) + t - since
        return t


def _acc_bacc(correct: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, Any]:
    """Accuracy and balanced accuracy from a per-sample correctness mask."""
    hit = correct.double()  # float64 like the metrics module, so the numbers compare exactly
    recalls = [float(hit[y == c].mean()) for c in range(k) if bool((y == c).any())]
    return {
        "accuracy": float(hit.mean()),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "intervals": {"accuracy": wilson(int(correct.sum()), len(correct))},
    }


def _focus_summary(t: torch.Tensor) -> tuple[float | None, dict[str, Any], int]:
    """Mean of the finite per-image scores, its 95 % interval, and the number of NaNs (maps with
    no mass) left out."""
    ok = torch.isfinite(t)
    mean = float(t[ok].mean()) if bool(ok.any()) else None
    return mean, mean_interval(t[ok]), int((~ok).sum())


@dataclass
class WorstCase:
    """One chunk at one eps: per attack, which samples it fooled (among those it ran on) and
    which are still robust (cascaded: after the attacks so far; else: clean-correct and not fooled
    by this attack alone); the worst-case probabilities and, when kept, the worst-case inputs."""

    fooled: dict[str, torch.Tensor]
    robust: dict[str, torch.Tensor]
    attacked: dict[str, int]
    probs: torch.Tensor
    x: torch.Tensor | None
    budget_excess: float
    out_of_range: float

    @property
    def broken(self) -> torch.Tensor:
        """Per sample: misclassified clean or fooled by some attack (the worst case)."""
        return ~torch.stack(list(self.robust.values())).all(0) if self.robust else torch.empty(0)


def worst_case(
    model: nn.Module,
    attacks: Mapping[str, Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    clean_correct: torch.Tensor,
    clean_loss: torch.Tensor,
    clean_probs: torch.Tensor,
    cascade: bool = True,
    keep_x: bool = False,
    timer: _Timer | None = None,
    after_attack: Callable[[], None] | None = None,
) -> WorstCase:
    """Run ``attacks`` (label -> attack, in this order) at ``eps`` (1/255 units) on one chunk.

    The clean input is the first candidate (it lies in every ball). Per sample the worst case is a
    candidate that fools the model, the one with the highest cross-entropy among those that ran;
    with ``cascade`` an attack runs only on the samples nothing has fooled yet (radius 0 for the
    others, which costs nothing), so its robust mask is the same as without, in less time.
    ``after_attack()`` runs after each attack: the caller's progress report and stop check (an
    attack on a chunk can take minutes, so a cancellation is seen between attacks).
    """
    best_fooled, best_loss, best_probs = ~clean_correct, clean_loss, clean_probs
    best_x = x.clone() if keep_x else None
    fooled, robust, attacked = {}, {}, {}
    budget_excess = out_of_range = 0.0
    for lbl, attack in attacks.items():
        t = timer.now() if timer else 0.0
        radius = torch.full((len(x),), eps / 255.0, device=x.device)
        if cascade:
            radius = torch.where(best_fooled, 0.0, radius)
        rows = (radius > 0).nonzero().squeeze(1)
        adv = attack(x, y, radius)
        loss = torch.full_like(best_loss, -math.inf)
        wrong = torch.zeros_like(best_fooled)
        probs = best_probs.clone()
        if len(rows):
            with torch.no_grad():
                out = model(adv[rows]).float()
            loss[rows] = per_sample_ce(out, y[rows])
            wrong[rows] = out.argmax(1) != y[rows]
            probs[rows] = torch.softmax(out, 1)
        if timer:
            timer.add(f"attack:{lbl}", t)
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
        budget_excess = max(budget_excess, float((size - eps / 255.0).max()))
        out_of_range = max(out_of_range, float((adv - adv.clamp(0, 1)).abs().max()))
        better = (wrong & ~best_fooled) | ((wrong == best_fooled) & (loss > best_loss))
        best_fooled = best_fooled | wrong
        best_loss = torch.where(better, loss, best_loss)
        best_probs = torch.where(better[:, None], probs, best_probs)
        if best_x is not None:
            best_x = torch.where(better.view(-1, 1, 1, 1), adv, best_x)
        fooled[lbl] = wrong
        robust[lbl] = ~best_fooled if cascade else ~wrong & clean_correct
        attacked[lbl] = len(rows)
        if after_attack:
            after_attack()
    return WorstCase(fooled, robust, attacked, best_probs, best_x, budget_excess, out_of_range)


def cascade_order(names: Mapping[str, str]) -> list[str]:
    """Attack labels in cascade order: iterative white-box attacks first (as listed), then
    single-step ones, then black-box ones. ``names``: label -> attack name."""

    def rank(lbl: str) -> int:
        name = names[lbl]
        return 2 if name in ck.BLACK_BOX else 1 if name in ck.SINGLE_STEP else 0

    return sorted(names, key=rank)


def curve_auc(points: Sequence[tuple[float, float]]) -> float | None:
    """Area under robust accuracy vs eps (trapezoid) over the eps range; None for one point."""
    pts = sorted(points)
    span = pts[-1][0] - pts[0][0] if pts else 0.0
    if span <= 0:
        return None
    area = sum((e1 - e0) * (a0 + a1) / 2 for (e0, a0), (e1, a1) in itertools.pairwise(pts))
    return area / span


def evaluate_model(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    eps_list: Sequence[float] = DEFAULT_EPS,
    attacks: Sequence[Mapping[str, Any]] = DEFAULT_ATTACKS,
    batch_size: int = 128,
    gradcam: bool = True,
    model_info: Mapping[str, Any],
    dataset_info: Mapping[str, Any],
    progress: Progress | None = None,
    seed: int = 0,
    cam_eps: float = 2.0,
    check_samples: int = 100,
    cascade: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` under every attack of ``attacks`` at every eps of
    ``eps_list`` (1/255 units) and return the report dict.

    Robust metrics at an eps use, per sample, the worst case over the clean input and every attack
    (a sample counts as robust only when nothing fooled it). Probability-based metrics (mAP, AUROC)
    use that worst-case example's probabilities: among the candidates that fool the sample the one
    with the highest cross-entropy, else the one with the highest cross-entropy. Lesion focus
    (Grad-CAM of the predicted class) is computed clean and at the eps of ``eps_list`` nearest
    ``cam_eps``, when ``gradcam`` is on and the dataset has masks. ``cascade`` runs each attack only
    on the samples still robust after the earlier ones (same worst case, less work; the per-attack
    figures are then cumulative, in :func:`cascade_order`). ``check_samples`` caps the
    subset used by the model-level validity checks. ``progress(stage, fraction)`` reports the
    overall fraction done.
    The model is evaluated in eval mode and handed back in the mode it came in.
    """
    eps_sorted = sorted({float(e) for e in eps_list})
    if not eps_sorted or any(not np.isfinite(e) or e < 0 for e in eps_sorted):
        raise ValueError(f"eps_list must be non-empty, finite and >= 0, got {list(eps_list)}")
    if not attacks:
        raise ValueError("at least one attack is needed")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    info_classes = model_info.get("classes")
    if info_classes is not None and list(info_classes) != list(dataset.classes):
        raise ValueError(
            f"model classes {list(info_classes)} differ from the dataset's {list(dataset.classes)}"
        )

    device = _device(model)
    given_training = model.training
    model.eval()
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            report = _evaluate(
                model, dataset, eps_sorted, attacks, batch_size, gradcam, model_info, dataset_info,
                progress, seed, cam_eps, check_samples, given_training, device, cascade,
            )  # fmt: skip
    finally:
        model.train(given_training)
    return report


def _masks(dataset: ImageDataset, sl: slice) -> torch.Tensor:
    found = dataset.masks_at(sl)
    assert found is not None  # only called when the dataset has masks
    return found


def _evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    eps_sorted: list[float],
    attack_specs: Sequence[Mapping[str, Any]],
    batch_size: int,
    gradcam: bool,
    model_info: Mapping[str, Any],
    dataset_info: Mapping[str, Any],
    progress: Progress | None,
    seed: int,
    cam_eps: float,
    check_samples: int,
    given_training: bool,
    device: torch.device,
    cascade: bool,
) -> dict[str, Any]:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    timer = _Timer(device)
    t_total = timer.now()
    report_progress = progress or (lambda _stage, _fraction: None)
    classes = list(dataset.classes)
    k, n = len(classes), len(dataset)
    labels = dataset.labels.cpu()
    chunks = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    def chunk(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset.images_at(sl).to(device).float().div_(255.0), labels[sl].to(device)

    # a model without a spatial feature map (a ViT) gets lesion_focus null and the reason
    no_cam = cam_unavailable(model, chunk(slice(0, 1))[0]) if gradcam and n else None
    # lesion masks are read per chunk (streamed data: never all in memory at once)
    masks = gradcam and no_cam is None and dataset.has_masks

    labels_list = _labels(attack_specs)
    attacks = {
        lbl: build_attack(spec, model) for lbl, spec in zip(labels_list, attack_specs, strict=True)
    }
    described = [{"label": lbl, **a.describe()} for lbl, a in attacks.items()]
    norms = {str(d.get("norm", "linf")) for d in described}
    if len(norms) != 1:
        raise ValueError(f"all attacks must share one norm, got {sorted(norms)}")
    norm = norms.pop()
    names = {lbl: str(spec["name"]) for lbl, spec in zip(labels_list, attack_specs, strict=True)}

    # ---------------------------------------------------------------- clean pass (+ Grad-CAM)
    report_progress("clean", 0.0)
    logits = torch.empty(n, k)
    focus_clean = torch.full((n,), float("nan"))
    mask_area = torch.zeros(n)  # the share of each image inside its lesion mask
    # the first pass reads through the dataset's loader (streamed data: decoded by its workers)
    parts = [torch.arange(sl.start, sl.stop) for sl in chunks]
    for i, (sl, images) in enumerate(zip(chunks, dataset.batches(parts), strict=True)):
        t = timer.now()
        x = images.to(device).float().div_(255.0)
        with torch.no_grad():
            out = model(x).float()
        if out.shape != (len(x), k):
            raise ValueError(
                f"the model returned shape {tuple(out.shape)}, expected ({len(x)}, {k})"
            )
        logits[sl] = out.cpu()
        t = timer.add("clean", t)
        if masks:
            lesion = _masks(dataset, sl)
            focus_clean[sl] = lesion_focus(grad_cam(model, x, batch_size=batch_size), lesion).cpu()
            mask_area[sl] = lesion.bool().flatten(1).float().mean(1).cpu()
            timer.add("gradcam", t)
        report_progress("clean", _CLEAN * (i + 1) / len(chunks))
    clean_probs = torch.softmax(logits, dim=1)
    clean_correct = logits.argmax(1) == labels
    clean_loss = per_sample_ce(logits, labels)
    clean_metrics = classification_metrics(clean_probs, labels, classes)

    # ---------------------------------------------------------------- attacks, eps by eps
    # With the cascade (AutoAttack's design), each attack only runs on the samples that are still
    # robust after the clean input and the attacks before it: the others get radius 0, which costs
    # nothing. Attacks draw their random numbers for the whole chunk, so a sample's outcome is the
    # same either way. Order: iterative white-box attacks, then single-step, then black-box ones,
    # so that FGSM or Square fooling a survivor is exactly what the validity checks look for.
    order = cascade_order(names) if cascade else list(attacks)
    positive = [e for e in eps_sorted if e > 0]
    adv_cam_eps = min(positive, key=lambda e: (abs(e - cam_eps), e)) if positive else None
    focus_adv = torch.full((n,), float("nan"))
    worst_probs: dict[float, torch.Tensor] = {}
    # per attack: cascaded, robust after the attacks so far; else clean-correct and not fooled
    correct: dict[float, dict[str, torch.Tensor]] = {}
    fooled: dict[float, dict[str, torch.Tensor]] = {}  # ran on the sample and it was wrong
    attacked: dict[float, dict[str, int]] = {}  # samples each attack ran on
    budget_excess, out_of_range = 0.0, 0.0
    units, done = max(1, len(positive) * len(chunks) * len(attacks)), 0

    def attack_done() -> None:
        nonlocal done
        done += 1
        report_progress("attacks", _CLEAN + _ATTACKS * done / units)

    for eps in positive:
        probs_e = clean_probs.clone()
        correct[eps] = {lbl: torch.zeros(n, dtype=torch.bool) for lbl in order}
        fooled[eps] = {lbl: torch.zeros(n, dtype=torch.bool) for lbl in order}
        attacked[eps] = dict.fromkeys(order, 0)
        for sl in chunks:
            x, y = chunk(sl)
            wc = worst_case(
                model, {lbl: attacks[lbl] for lbl in order}, x, y, eps,
                clean_correct[sl].to(device), clean_loss[sl].to(device),
                clean_probs[sl].to(device), cascade,
                keep_x=eps == adv_cam_eps and masks, timer=timer, after_attack=attack_done,
            )  # fmt: skip
            for lbl in order:
                fooled[eps][lbl][sl] = wc.fooled[lbl].cpu()
                correct[eps][lbl][sl] = wc.robust[lbl].cpu()
                attacked[eps][lbl] += wc.attacked[lbl]
            budget_excess = max(budget_excess, wc.budget_excess)
            out_of_range = max(out_of_range, wc.out_of_range)
            best_probs, best_x = wc.probs, wc.x
            probs_e[sl] = best_probs.cpu()
            if best_x is not None and masks:
                t = timer.now()
                focus_adv[sl] = lesion_focus(
                    grad_cam(model, best_x, batch_size=batch_size), _masks(dataset, sl)
                ).cpu()
                timer.add("gradcam", t)
        worst_probs[eps] = probs_e

    # ---------------------------------------------------------------- metrics per eps
    robust: dict[str, Any] = {}
    for eps in eps_sorted:
        if eps == 0:
            m = dict(clean_metrics)
            per_attack = {lbl: _acc_bacc(clean_correct, labels, k) for lbl in order}
        else:
            m = classification_metrics(worst_probs[eps], labels, classes)
            per_attack = {
                lbl: {
                    **_acc_bacc(correct[eps][lbl], labels, k),
                    "attacked": attacked[eps][lbl],
                    "fooled": int(fooled[eps][lbl].sum()),
                }
                for lbl in order
            }
        robust[eps_key(eps)] = {"eps": eps, **m, "per_attack": per_attack}
    curve = [(eps, robust[eps_key(eps)]["accuracy"]) for eps in eps_sorted]

    # ---------------------------------------------------------------- validity checks
    report_progress("checks", _CLEAN + _ATTACKS)
    t = timer.now()
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, check_samples)]
    xs, ys = dataset.images_at(pick).to(device).float().div_(255.0), labels[pick].to(device)
    per_attack_curves = {
        lbl: {eps: robust[eps_key(eps)]["per_attack"][lbl]["accuracy"] for eps in eps_sorted}
        for lbl in order
    }
    # each check is a callable, so the progress report (and its stop check) runs between them
    check_runs: list[Callable[[], ck.Check]] = [
        lambda: ck.check_logits(logits, k),
        lambda: ck.check_eval_deterministic(model, xs, given_training),
        lambda: ck.check_gradients(model, xs, ys),
        lambda: ck.check_eps_zero(attacks, xs[:_EPS_ZERO_SAMPLES], ys[:_EPS_ZERO_SAMPLES]),
        lambda: ck.check_budget(budget_excess, out_of_range),
        lambda: ck.check_monotone(
            {
                "worst case": curve,
                **{lbl: sorted(c.items()) for lbl, c in per_attack_curves.items()},
            },
            n,
        ),
        lambda: ck.check_iterative_vs_fgsm(fooled, names, n),
        lambda: ck.check_large_eps(model, xs, ys),
        lambda: ck.check_black_box(fooled, names, n),
    ]
    check_list = []
    for i, run_check in enumerate(check_runs):
        check_list.append(run_check())
        report_progress("checks", _CLEAN + _ATTACKS + _CHECKS * (i + 1) / len(check_runs))
    timer.add("checks", t)

    focus: dict[str, Any] | None = None
    if masks:
        clean_mean, clean_iv, clean_empty = _focus_summary(focus_clean)
        adv_mean, adv_iv, adv_empty = _focus_summary(
            focus_adv if adv_cam_eps is not None else torch.empty(0)
        )
        focus = {
            "clean": clean_mean,
            "adversarial": adv_mean,
            "intervals": {"clean": clean_iv, "adversarial": adv_iv},
            # a map spread evenly scores the lesion's area: a focus near this does not localise
            "uniform_map": float(mask_area.mean()),
            "cam_grid": list(cam_grid(model, chunk(slice(0, 1))[0])),
            "eps": adv_cam_eps,
            "explained_class": "predicted",
            "samples": n,
            "empty_maps": {"clean": clean_empty, "adversarial": adv_empty},
        }

    timer.add("total", t_total)
    tt = timer.totals
    report = {
        "report_version": REPORT_VERSION,
        "created_at": started_at,
        "model": {
            "architecture": model_info.get("arch", getattr(model, "arch", None)),
            "classes": classes,
            "input_size": int(model_info.get("image_size", dataset.image_size)),
            "checkpoint_sha256": model_info.get("checkpoint_sha256"),
            "method": model_info.get("method"),
            # the training epoch this checkpoint holds (a best-epoch checkpoint: see best_by)
            "epoch": model_info.get("epochs_done"),
            "best_by": (model_info.get("config") or {}).get("best_by"),
            "num_params": int(
                model_info.get("num_params", sum(p.numel() for p in model.parameters()))
            ),
        },
        "dataset": {
            **{
                key: v for key, v in dataset_info.items() if isinstance(v, str | int | float | None)
            },
            "name": dataset_info.get("name"),
            "split": dataset_info.get("split"),
            "manifest_sha256": dataset_info.get("manifest_sha256"),
            "samples": n,
            "class_counts": dict(zip(classes, dataset.class_counts(), strict=True)),
            "image_size": dataset.image_size,
            "has_masks": dataset.has_masks,
        },
        "threat_model": {
            "norm": norm,
            "eps": eps_sorted,
            "eps_unit": "1/255",
            "attacks": described,
            "robust_metric": "per-sample worst case over the clean input and every attack",
            "cascade": cascade,
            "order": order,
            "per_attack_metric": (
                "robust after the clean input and the attacks up to this one (cascade order); "
                "attacked: samples it ran on; fooled: samples it broke"
                if cascade
                else "clean-correct and not fooled by this attack alone"
            ),
        },
        "clean": clean_metrics,
        "robust": robust,
        "curve": {"eps": [e for e, _ in curve], "accuracy": [a for _, a in curve]},
        "curve_auc": curve_auc(curve),
        "lesion_focus": focus,
        "lesion_focus_unavailable": no_cam,
        "checks": check_list,
        "verdict": ck.verdict(check_list),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "dpaat": _package_version("dpaat"),
            "seed": seed,
            "device": str(device),
        },
        "timings": {
            "total_s": tt["total"],
            "clean_s": tt.get("clean", 0.0),
            "gradcam_s": tt.get("gradcam", 0.0),
            "checks_s": tt.get("checks", 0.0),
            "attacks_s": {lbl: tt.get(f"attack:{lbl}", 0.0) for lbl in order},
        },
    }
    report_progress("done", 1.0)
    return to_jsonable(report)
