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
defaults (dpaat vs adversarial-only pgd_at). Target: <= 1.10. ``dpaat_secant`` is DPAAT with
the cheaper boundary estimate (``boundary_search = "secant"``, 2 probes instead of 5 bisection
steps).

``--agreement`` measures instead how far the secant's distance d lies from the bisection's on the
same samples of a real training run (real images with ``--data``): DPAAT with the bisection trains
``--warm`` epochs, then for every batch of one more epoch each broken, clean-correct sample gets
d from the bisection (B = 5, what training uses), from the secant (2 and 3 probes) and from a
bisection of 16 steps (the crossing, to 2^-16 of the segment); medians of |d - d_bisect| and of
each estimate's distance to the crossing are printed, in 1/255.

    .venv/bin/python bench/bench_dpaat.py [--arch small_cnn --size 32 --limit 200 --steps 10]
    (the cpu64 preset: --arch resnet18 --size 64 --steps 3)
    .venv/bin/python bench/bench_dpaat.py --agreement --data ../shared/data/ham10000 \
        --arch resnet18 --size 64 --steps 3 --limit 600
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
from typing import Any, ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DPAAT_PROGRESS", "0")

from models.data import load_bundle
from models.training import TrainConfig, TrainingHooks, dpaat, methods, train
from models.training.methods import DPAAT

VARIANTS: dict[str, dict[str, Any]] = {
    "dpaat": {"method": "dpaat"},  # beta = 0.5
    "pgd_at_mixed": {"method": "pgd_at", "pgd_at_beta": 0.5},  # the same loss as DPAAT's
    "dpaat_beta1": {"method": "dpaat", "beta": 1.0},  # adversarial-only DPAAT
    "pgd_at": {"method": "pgd_at"},  # Madry: adversarial-only loss
    "dpaat_secant": {"method": "dpaat", "boundary_search": "secant", "bisection_steps": 2},
}
PAIRS = (
    ("dpaat", "pgd_at_mixed"),
    ("dpaat_secant", "pgd_at_mixed"),
    ("dpaat_beta1", "pgd_at"),
    ("dpaat", "pgd_at"),
)


class Agreement(DPAAT):
    """DPAAT (bisection, B = 5) that also computes the other estimates of d on the same rows,
    under the same buffers, and keeps them (bench only)."""

    rows: ClassVar[dict[str, list[torch.Tensor]]] = {}

    def distance(self, model, x, y, which, observer, clean_loss):  # type: ignore[no-untyped-def]
        rows = which.nonzero().squeeze(1)
        if len(rows) == 0:
            return torch.zeros(len(x), device=x.device)
        p = observer.first[rows]
        norm = p.flatten(1).abs().amax(1) * 255.0
        assert self.state.tau is not None
        criterion, tau = observer.criterion, self.state.tau
        found = {
            "bisect5": dpaat.boundary_fraction(model, x[rows], p, y[rows], criterion, 5),
            "bisect16": dpaat.boundary_fraction(model, x[rows], p, y[rows], criterion, 16),
        }
        for probes in (2, 3):
            found[f"secant{probes}"] = dpaat.boundary_fraction_secant(
                model, x[rows], p, y[rows], tau, probes,
                clean_loss[rows], observer.first_loss[rows],
            )  # fmt: skip
        for name, s in found.items():
            Agreement.rows.setdefault(name, []).append((s * norm).float())
        dist = torch.zeros(len(x), device=x.device)
        dist[rows] = found["bisect5"] * norm
        return dist


def agreement(args: argparse.Namespace) -> None:
    data = load_bundle(args.data, args.size, limit=args.limit)
    cfg = TrainConfig(
        arch=args.arch, method="dpaat", image_size=args.size, limit=args.limit,
        batch_size=args.batch, pgd_steps=args.steps, eps_max=args.eps_max, epochs=args.warm + 1,
        robust_val_eps=0.0, best_by="last", class_weights=True, scheduler="onecycle",
        device="cpu",
    )  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="bench_dpaat_agree_"))
    try:
        train(cfg, root, StopAfter(args.warm), data=data)
        methods.METHOD_CLASSES["dpaat"] = Agreement
        cpu = time.process_time()
        train(cfg, root, data=data)
        seconds = time.process_time() - cpu
    finally:
        methods.METHOD_CLASSES["dpaat"] = DPAAT
        shutil.rmtree(root, ignore_errors=True)
    if not Agreement.rows:  # seen once on ResNet-18, 1,500 images: not yet understood
        print(f"epoch {args.warm + 1} measured no broken clean-correct sample: nothing to compare")
        return
    d = {k: torch.cat(v) for k, v in Agreement.rows.items()}
    print(
        f"{len(data.train)} training images ({args.data or 'generated'}), {args.size} px, "
        f"{args.arch}, K = {args.steps}, eps_max {args.eps_max}/255, epoch {args.warm + 1} "
        f"({seconds:.0f} s CPU): {len(d['bisect5'])} broken clean-correct samples, "
        f"median d {d['bisect16'].median():.3f}/255"
    )
    # samples already past tau at x (a clean loss above tau) cross at s = 0: shown apart
    inside = d["bisect16"] > 0.01
    for rows, what in ((slice(None), "all"), (inside, "crossing inside the segment")):
        print(f" {what}: {int(torch.ones_like(inside)[rows].sum())} samples")
        for name in ("bisect5", "secant2", "secant3"):
            to_bisect = (d[name] - d["bisect5"])[rows].abs()
            to_crossing = (d[name] - d["bisect16"])[rows]
            print(
                f"  {name:8s} median |d - d_bisect5| {to_bisect.median():.4f}/255 "
                f"(90th pct {to_bisect.quantile(0.9):.4f}), median d - d_crossing "
                f"{to_crossing.median():.4f}/255 (90th pct {to_crossing.quantile(0.9):.4f})"
            )


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
    ap.add_argument("--agreement", action="store_true", help="secant vs bisection distances")
    ap.add_argument("--data", default=None, help="image data root (default: generated)")
    ap.add_argument("--eps-max", type=float, default=4.0, help="--agreement: eps_max, 1/255")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.agreement:
        agreement(args)
        return

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
        f"K = {args.steps}, bisection B = 5 (secant: 2 probes), timed epoch {args.warm + 1}, "
        f"{args.repeats} repeats, "
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
