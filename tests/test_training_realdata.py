"""Training on a few hundred real HAM10000 images (../shared/data/ham10000): the split is grouped
by lesion, and a short `standard` run learns more than the majority class."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from models.data import build_manifest, load_bundle, load_samples
from models.training import TrainConfig, load_trained_model, train

pytestmark = pytest.mark.realdata
MAJORITY_BACC = 1 / 7  # predicting nv for everything recalls one class of seven


def test_split_keeps_every_lesion_in_one_part(ham_root: Path) -> None:
    # read lesion ids straight from labels.csv, independently of models.data's parsing
    with (ham_root / "labels.csv").open(newline="") as f:
        lesion_of = {f"{row['image_id']}.jpg": row["lesion_id"] for row in csv.DictReader(f)}
    manifest = build_manifest(load_samples(ham_root), seed=0)
    lesions = {part: {lesion_of[name] for name in names} for part, names in manifest.parts.items()}
    assert not lesions["train"] & lesions["val"]
    assert not lesions["train"] & lesions["test"]
    assert not lesions["val"] & lesions["test"]
    sizes = {part: len(names) for part, names in manifest.parts.items()}
    assert sum(sizes.values()) == len(lesion_of)
    for part, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert sizes[part] / len(lesion_of) == pytest.approx(share, abs=0.02), sizes


def test_short_standard_run_beats_the_majority_class(ham_root: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        data_root=str(ham_root),
        manifest=str(tmp_path / "split.json"),
        image_size=32,
        limit=200,
        method="standard",
        epochs=5,
        batch_size=32,
        optimizer="adam",
        lr=0.002,
        class_weights=True,  # without them a small model predicts nv (2/3 of the images) only
        device="cpu",
    )
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed"
    assert (tmp_path / "split.json").is_file()
    val_bacc = result.history[-1]["val_bacc"]

    test = load_bundle(str(ham_root), 32, tmp_path / "split.json", limit=200, parts=("test",)).test
    model, info = load_trained_model(result.checkpoint)
    assert info["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    with torch.no_grad():
        pred = model(test.images_at(slice(None)).float() / 255).argmax(1)
    recalls = [float((pred[test.labels == c] == c).double().mean()) for c in range(7)]
    test_bacc = sum(recalls) / 7
    print(f"val bacc {val_bacc:.3f}, test bacc {test_bacc:.3f}, test recalls {recalls}")
    assert val_bacc > MAJORITY_BACC + 0.1, result.history
    assert test_bacc > MAJORITY_BACC + 0.05, recalls
