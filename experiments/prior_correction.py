"""How a post-hoc prior correction (logit adjustment, Menon et al. 2021) would move a trained
checkpoint's clean figures: logits - tau * log(training prior), for tau in a grid, on the
validation and test splits. A measurement for the cpu64 pilot (docs/results/pilot-cpu64), not a
part of the method: with class weights at the square root of inverse frequency, tau = 0.5 is the
correction that completes the weights to the balanced-error rule argmax p(y|x) / p(y).

    .venv/bin/python experiments/prior_correction.py runs/x/checkpoint.pt runs/x/split.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.api import load_model
from models.data import default_data_root, load_bundle
from models.evaluation.metrics import classification_metrics
from models.streaming import ImageDataset, sequential_parts, to_float


def logits(model: torch.nn.Module, ds: ImageDataset, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        parts = sequential_parts(len(ds), batch)
        return torch.cat([model(to_float(x)) for x in ds.batches(parts)]).double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("manifest", type=Path, help="the run's split manifest (split.json)")
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = p.parse_args()
    loaded = load_model(args.checkpoint)
    size = int(loaded.info["image_size"])
    bundle = load_bundle(args.data, size, args.manifest)
    prior = torch.tensor(bundle.train.class_counts(), dtype=torch.float64)
    log_prior = (prior / prior.sum()).log()
    rows = []
    for part in ("val", "test"):
        ds = getattr(bundle, part)
        z, y = logits(loaded.model, ds), ds.labels.numpy()
        for tau in args.tau:
            probs = torch.softmax(z - tau * log_prior, 1).numpy()
            m = classification_metrics(probs, y, bundle.classes)
            bacc = m["intervals"]["balanced_accuracy"]
            rows.append(
                {
                    "part": part,
                    "tau": tau,
                    "accuracy": round(m["accuracy"], 3),
                    "balanced_accuracy": round(m["balanced_accuracy"], 3),
                    "balanced_accuracy_95": [round(bacc["low"], 3), round(bacc["high"], 3)],
                    "map": round(m["map"], 3),
                    "mel_recall": round(m["recall"]["mel"], 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
