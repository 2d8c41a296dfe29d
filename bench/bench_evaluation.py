"""Evaluation benchmarks of issue 11, measured side by side in one run on one trained model.

(a) Cascade: the `default` attack preset evaluated with and without the cascade (each attack only
    on the samples still robust), same model, images and seed. Prints both times, the ratio and
    whether every worst-case robust accuracy (and per-class recall) is identical.
(b) Parity with the AutoAttack reference: our `full` suite (AutoAttack's budgets, cascaded) and
    torchattacks' AutoAttack "standard" on the same images at eps 1, 2 and 4/255: robust accuracy
    side by side with 95 % intervals, the difference (target: ours <= reference + 1 point), and the
    time ratio.

The model: `small_cnn` trained with `pgd_at` (eps_max 4/255) on HAM10000 at 32 px (a few minutes on
2 cores), so that robust accuracy stays above 0 at 4/255 and the comparison means something;
`--data` points at the dataset (default: DPAAT_DATA_ROOT or ../shared/data/ham10000), `--images`
sets the test images (class-stratified, >= 200 for the issue's figure).

Run: .venv/bin/python bench/bench_evaluation.py [--images 200] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import default_data_root, load_bundle
from models.evaluation import evaluate_model
from models.presets import DEFAULT, FULL
from models.training import TrainConfig, load_trained_model, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=None, help="HAM10000 folder (default: the shared copy)")
    p.add_argument("--images", type=int, default=200, help="test images (class-stratified)")
    p.add_argument("--train-limit", type=int, default=1500, help="training images per part")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", choices=["cascade", "parity"], default=None)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args()


def evaluate(
    model: torch.nn.Module,
    info: dict[str, Any],
    test: Any,
    eps: list[float],
    attacks: Any,
    cascade: bool = True,
) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    report = evaluate_model(
        model,
        test,
        eps_list=eps,
        attacks=attacks,
        gradcam=False,
        model_info=info,
        dataset_info={"name": "ham10000", "split": "test"},
        cascade=cascade,
        check_samples=32,
    )
    return report, time.perf_counter() - t


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    root = args.data or default_data_root()
    if root is None:
        sys.exit("HAM10000 not found: pass --data or set DPAAT_DATA_ROOT")
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    manifest = str(work / "split.json")
    cfg = TrainConfig(
        data_root=str(root),
        manifest=manifest,
        image_size=32,
        limit=args.train_limit,
        arch="small_cnn",
        method="pgd_at",
        epochs=args.epochs,
        eps_max=4.0,
        pgd_steps=3,
        class_weights=True,
        device="cpu",
        robust_val_samples=64,
    )
    t = time.perf_counter()
    result = train(cfg, work / "run")
    print(
        f"trained pgd_at small_cnn 32 px in {time.perf_counter() - t:.0f} s "
        f"(best epoch {result.best_epoch} by {result.best_by})"
    )
    model, info = load_trained_model(result.best_checkpoint)
    test = load_bundle(str(root), 32, manifest, limit=args.images, parts=("test",)).test
    counts = dict(zip(test.classes, test.class_counts(), strict=True))
    print(f"{len(test)} test images, classes {counts}")
    figures: dict[str, Any] = {"images": len(test), "threads": args.threads}

    if args.skip != "cascade":
        eps = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
        plain, t_plain = evaluate(model, info, test, eps, DEFAULT, cascade=False)
        cas, t_cas = evaluate(model, info, test, eps, DEFAULT, cascade=True)
        same = all(
            plain["robust"][k]["accuracy"] == cas["robust"][k]["accuracy"]
            and plain["robust"][k]["recall"] == cas["robust"][k]["recall"]
            for k in plain["robust"]
        )
        print("\n(a) cascade, `default` preset, eps 0-8/255")
        print(
            f"  not cascaded {t_plain:8.1f} s   cascaded {t_cas:8.1f} s   "
            f"ratio {t_plain / t_cas:.2f}x   identical robust accuracy and recall: {same}"
        )
        for k in plain["robust"]:
            print(
                f"  eps {k:>4}: robust accuracy {plain['robust'][k]['accuracy']:.4f} / "
                f"{cas['robust'][k]['accuracy']:.4f}"
            )
        figures["cascade"] = {
            "plain_s": t_plain,
            "cascaded_s": t_cas,
            "identical": same,
            "accuracy": {k: r["accuracy"] for k, r in cas["robust"].items()},
        }

    if args.skip != "parity":
        eps = [0.0, 1.0, 2.0, 4.0]
        ours, t_ours = evaluate(model, info, test, eps, FULL)
        ref, t_ref = evaluate(model, info, test, eps, [{"name": "autoattack"}])
        print("\n(b) our `full` suite (cascaded) vs AutoAttack standard (torchattacks)")
        print(f"  time: ours {t_ours:.1f} s, reference {t_ref:.1f} s, ratio {t_ours / t_ref:.2f}")
        rows = {}
        for k in ("1", "2", "4"):
            a, b = ours["robust"][k], ref["robust"][k]
            ia, ib = a["intervals"]["accuracy"], b["intervals"]["accuracy"]
            diff = 100 * (a["accuracy"] - b["accuracy"])
            print(
                f"  eps {k}/255: ours {a['accuracy']:.4f} [{ia['low']:.3f}, {ia['high']:.3f}]  "
                f"AutoAttack {b['accuracy']:.4f} [{ib['low']:.3f}, {ib['high']:.3f}]  "
                f"ours - reference {diff:+.1f} points  {'OK' if diff <= 1.0 else 'WEAKER'}"
            )
            rows[k] = {"ours": a["accuracy"], "autoattack": b["accuracy"], "diff_points": diff}
        figures["parity"] = {"ours_s": t_ours, "autoattack_s": t_ref, "eps": rows}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
