"""What the trainer measures on the validation part after every epoch: clean metrics on all of
it, and a cheap robust check (PGD on a fixed class-stratified subset at one radius) that lets a run
keep its best epoch instead of its last (robust overfitting, Rice et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from models.attacks import PGD
from models.data import ImageDataset, to_float

# the criteria a run can keep its best checkpoint by; "auto" picks val_bacc for `standard` and
# robust_val_bacc for the adversarial methods
BEST_BY: tuple[str, ...] = (
    "auto",
    "last",
    "val_acc",
    "val_bacc",
    "robust_val_acc",
    "robust_val_bacc",
)


def best_criterion(best_by: str, method: str) -> str:
    """The history key a run maximises ("last" keeps the last epoch)."""
    if best_by == "auto":
        return "val_bacc" if method == "standard" else "robust_val_bacc"
    return best_by


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``n`` samples, each class keeping its share (at least one), in a seeded
    order that does not depend on the epoch: every epoch is measured on the same images."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    picked = []
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]
        picked.append(members[: max(1, round(n * len(members) / len(labels)))])
    return torch.cat(picked).sort().values[:n]


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    recalls = [float((pred[y == c] == c).double().mean()) for c in torch.unique(y).tolist()]
    return sum(recalls) / len(recalls)


def robust_metrics(
    model: nn.Module,
    data: ImageDataset,
    idx: torch.Tensor,
    eps: float,
    steps: int,
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float | None]:
    """Accuracy and balanced accuracy under PGD-``steps`` at ``eps`` (1/255 units) on the subset
    ``idx`` of ``data`` (eval mode, seeded random start; the model's mode is restored)."""
    if len(idx) == 0 or eps <= 0:
        return {"robust_val_acc": None, "robust_val_bacc": None}
    attack = PGD(model, steps=steps, seed=0, batch_size=batch_size)
    x = to_float(data.images_at(idx)).to(device)
    y = data.labels[idx].to(device)
    adv = attack(x, y, eps / 255.0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        chunks = [model(adv[s : s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)]
    pred = torch.cat(chunks)
    model.train(was_training)
    pred, y = pred.cpu(), y.cpu()
    return {
        "robust_val_acc": float((pred == y).double().mean()),
        "robust_val_bacc": balanced_accuracy(pred, y),
    }
