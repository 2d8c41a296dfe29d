"""Cost of one DPAAT epoch against one pgd_at epoch at the same PGD step count K.

Same generated data, model, batch size and K. Each method is first trained for ``--warm``
epochs (so DPAAT's radii and tau are past their initial values); every repeat then resumes that
state in a fresh folder and times exactly one more epoch. Repeats are interleaved (the order of
the methods alternates) and the medians are compared, so a slow-down of the shared machine hits
every method alike. Both the wall time of the epoch's training loop and the CPU time of the
whole one-epoch call are compared; with ``--threads 1`` (the default) the CPU time does not depend
on what else the machine runs.

DPAAT's loss has a clean term (beta = 0.5), which costs one more forward+backward per step than
Madry's adversarial-only pgd_at. So two pairs are compared: at equal loss (dpaat vs pgd_at with
pgd_at_beta = 0.5, and dpaat with beta = 1 vs adversarial-only pgd_at), which isolates DPAAT's own
machinery (observer, the extra last-iterate forward, bisection, radius bookkeeping); and the
defaults (dpaat vs adversarial-only pgd_at). Target: <= 1.10.

    .venv/bin/python bench/bench_dpaat.py [--arch small_cnn --size 32 --limit 200 --steps 10]
    (the cpu64 preset: --arch resnet18 --size 64 --steps 3)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DPAAT_PROGRESS", "0")

from models.data import load_bundle
from models.training import TrainConfig, TrainingHooks, train

VARIANTS: dict[str, dict[str, Any]] = {
    "dpaat": {"method": "dpaat"},  # beta = 0.5
    "pgd_at_mixed": {"method": "pgd_at", "pgd_at_beta": 0.5},  # the same loss as DPAAT's
    "dpaat_beta1": {"method": "dpaat", "beta": 1.0},  # adversarial-only DPAAT
    "pgd_at": {"method": "pgd_at"},  # Madry: adversarial-only loss
}
PAIRS = (("dpaat", "pgd_at_mixed"), ("dpaat_beta1", "pgd_at"), ("dpaat", "pgd_at"))


class StopAfter(TrainingHooks):
    def __init__(self, epochs: int) -> None:
        self.epochs, self.done = epochs, 0

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        self.done = epoch

    def should_stop(self) -> bool:
        return self.done >= self.epochs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="small_cnn", help="models.nets architecture")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=200, help="generated images per split part / 2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="PGD steps K for both methods")
    ap.add_argument("--warm", type=int, default=2, help="untimed epochs before the timed one")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = load_bundle(None, args.size, limit=args.limit)
    root = Path(tempfile.mkdtemp(prefix="bench_dpaat_"))
    configs = {
        name: TrainConfig(
            arch=args.arch,
            robust_val_eps=0.0,  # the per-epoch robust check is the same for both: left out
            best_by="last",
            image_size=args.size,
            limit=args.limit,
            batch_size=args.batch,
            pgd_steps=args.steps,
            epochs=args.warm + 1,
            device="cpu",
            **extra,
        )
        for name, extra in VARIANTS.items()
    }
    try:
        for name, cfg in configs.items():
            train(cfg, root / "warm" / name, StopAfter(args.warm), data=data)
        timings: dict[str, dict[str, list[float]]] = {
            n: {"train": [], "cpu": [], "broken": []} for n in configs
        }
        names = list(configs)
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                run = root / f"r{r}" / name
                shutil.copytree(root / "warm" / name, run)
                cpu = time.process_time()
                record = train(configs[name], run, data=data).history[-1]
                timings[name]["cpu"].append(time.process_time() - cpu)
                timings[name]["train"].append(record["train_seconds"])
                timings[name]["broken"].append(record.get("broken_frac", float("nan")))
                shutil.rmtree(run)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in timings.items()}
    print(
        f"train images {len(data.train)}, {args.size} px, {args.arch}, batch {args.batch}, "
        f"K = {args.steps}, bisection B = 5, timed epoch {args.warm + 1}, {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}"
    )
    for n, m in med.items():
        broken = f", broken fraction {m['broken']:.2f}" if n.startswith("dpaat") else ""
        print(
            f"  {n:13s} train loop {m['train']:.2f} s wall "
            f"(range {min(timings[n]['train']):.2f}-{max(timings[n]['train']):.2f}), "
            f"epoch call {m['cpu']:.2f} s CPU{broken}"
        )
    for a, b in PAIRS:
        print(
            f"ratio {a} / {b}: train loop (wall) {med[a]['train'] / med[b]['train']:.3f}, "
            f"epoch (CPU) {med[a]['cpu'] / med[b]['cpu']:.3f}"
        )


if __name__ == "__main__":
    main()
