"""The Grad-CAM montage of an evaluation: a few test images (one per class first, melanoma
first), Grad-CAM of the predicted class on each clean image and on its worst-case adversarial
example (over the evaluation's attacks, at one eps), with the lesion outline when the dataset has
masks. The maps are computed here (torch); the figure is drawn by :func:`models.plots.draw_montage`,
which the experiment report uses too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.attacks.base import attack_mode
from models.data import ImageDataset
from models.evaluation.evaluate import build_attack
from models.evaluation.gradcam import grad_cam
from models.plots import draw_montage

MONTAGE_NAME = "gradcam_montage.png"


def pick_images(labels: torch.Tensor, classes: Sequence[str], n: int) -> list[int]:
    """Indices of up to ``n`` images: the first of each class (``mel`` first: it matters most),
    then the rest in dataset order."""
    order: list[int] = []
    wanted = ["mel", *[c for c in classes if c != "mel"]] if "mel" in classes else list(classes)
    for c in wanted:
        hits = (labels == list(classes).index(c)).nonzero().flatten().tolist()
        if hits and len(order) < n:
            order.append(int(hits[0]))
    order += [i for i in range(len(labels)) if i not in order][: n - len(order)]
    return order


def montage_eps(eps_list: Sequence[float], target: float = 2.0) -> float | None:
    """The eps (> 0) of the evaluation nearest ``target`` (the lesion-focus score uses the same
    rule); None when every eps is 0."""
    positive = [float(e) for e in eps_list if float(e) > 0]
    return min(positive, key=lambda e: (abs(e - target), e)) if positive else None


def _worst_case(
    model: nn.Module,
    attacks: Sequence[Mapping[str, Any]],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Per image, the adversarial example that fools the model, with the highest loss among
    those (else the highest loss): the worst case the report's robust metrics use."""
    best_x, best_fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        best_loss = F.cross_entropy(model(x).float(), y, reduction="none")
    for spec in attacks:
        adv = build_attack(spec, model)(x, y, eps / 255.0)
        with torch.no_grad():
            out = model(adv).float()
        loss = F.cross_entropy(out, y, reduction="none")
        wrong = out.argmax(1) != y
        better = (wrong & ~best_fooled) | ((wrong == best_fooled) & (loss > best_loss))
        best_x = torch.where(better.view(-1, 1, 1, 1), adv, best_x)
        best_fooled, best_loss = best_fooled | wrong, torch.where(better, loss, best_loss)
    return best_x


def write_montage(
    model: nn.Module,
    dataset: ImageDataset,
    attacks: Sequence[Mapping[str, Any]],
    eps_list: Sequence[float],
    path: str | Path,
    n_images: int = 6,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Write the montage PNG; returns what was drawn (None when no eps > 0 was evaluated).
    ``attacks``: the evaluation's attack specs (``{"name": ..., **params}``)."""
    eps = montage_eps(eps_list)
    if eps is None or len(dataset) == 0:
        return None
    classes = list(dataset.classes)
    order = pick_images(dataset.labels, classes, n_images)
    device = next(model.parameters()).device
    x = (dataset.images_at(order).float() / 255).to(device)
    y = dataset.labels[order].to(device)
    found = dataset.masks_at(order)
    masks = found.numpy() if found is not None else None
    rows = []
    # seeded like the evaluation (random starts), and eval mode with frozen parameters throughout
    with torch.random.fork_rng(devices=[]), attack_mode(model):
        torch.manual_seed(seed)
        x_adv = _worst_case(model, attacks, x, y, eps)
        for inputs, tag in ((x, "clean"), (x_adv, f"adversarial\neps {eps:g}/255")):
            cam = grad_cam(model, inputs).cpu().numpy()
            with torch.no_grad():
                pred = model(inputs).argmax(1).cpu().tolist()
            titles = [
                f"{classes[p]} {'ok' if p == int(t) else 'WRONG'}"
                for p, t in zip(pred, y.cpu().tolist(), strict=True)
            ]
            rows.append((tag, _hwc(inputs), cam, titles))
    drawn = draw_montage(
        _hwc(x),
        [classes[int(t)] for t in y.cpu().tolist()],
        rows,
        path,
        masks=masks,
        title=f"Grad-CAM (predicted class), clean vs worst case at eps {eps:g}/255",
    )
    return {**drawn, "eps": eps, "images": order}


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).cpu().float().numpy()
