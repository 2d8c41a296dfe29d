"""Benchmark of our PGD loop, measured side by side in one run (interleaved repeats, medians).

(a) our PGD-K / (K x one forward+backward of the same batch w.r.t. the input, model in eval mode):
    the overhead of the loop itself. Target <= 1.05. Printed against the forward+backward in the
    layout our loop runs in (chosen per model by a probe, models/attacks/layout.py) and in the
    caller's layout (NCHW).
(b) our PGD-K / torchattacks PGD-K, same model, batch, eps, step and steps. Target <= 0.90.
    Printed with torchattacks given the caller's NCHW batch (what a user of it gets) and given the
    batch in our loop's layout (same kernels as ours: isolates the loop from the layout).
(c) for information: APGD-CE-K and Square (K queries) against the same baseline.

`--table`: (b) for every architecture of models.nets and a timm model (`--timm`, skipped when timm
is missing): our PGD-K / torchattacks PGD-K given the caller's NCHW batch, best of `--repeats`
interleaved rounds, with the layout our probe chose (models/attacks/layout.py) and the probe's
cost. Target <= 1.00 everywhere. `--table --threads 1 --batch 32` is the issue-11 table.

Each repeat runs every case once, odd repeats in reverse order; both wall-clock and process CPU
time are printed. On a shared, loaded machine `--threads 1` gives the stable figures (two torch
threads per process on two busy cores spin against other processes' threads).

Run: .venv/bin/python bench/bench_attacks.py [--arch resnet18] [--size 64] [--batch 128] ...
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchattacks
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attacks import APGDCE, PGD, Square, layout
from models.attacks.base import attack_mode, fast_layout, input_grad, per_sample_ce
from models.nets import ARCHITECTURES, build_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="small_cnn", help="small_cnn | resnet18 | ... (models.nets)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--batch", type=int, default=128, help="images per batch")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="PGD steps K")
    p.add_argument("--eps", type=float, default=8.0, help="radius in 1/255 units")
    p.add_argument("--repeats", type=int, default=6, help="even: half run in reverse order")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-extra", action="store_true", help="skip (c)")
    p.add_argument("--table", action="store_true", help="(b) for every architecture, see above")
    p.add_argument("--archs", default=",".join(ARCHITECTURES), help="--table: models.nets names")
    p.add_argument("--timm", default="convnext_atto", help="--table: timm models ('' for none)")
    return p.parse_args()


def timm_builders(names: str, classes: int, size: int) -> dict[str, Callable[[], nn.Module]]:
    """timm models (random weights, never downloaded); none when timm is not installed."""
    if not names:
        return {}
    try:
        import timm
    except ImportError:
        print(f"timm is not installed: rows {names} skipped (pip install -e .[bench])")
        return {}

    def build(name: str) -> nn.Module:
        try:  # ViTs need the image size
            return timm.create_model(name, pretrained=False, num_classes=classes, img_size=size)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=classes)

    return {f"timm {n}": lambda n=n: build(n) for n in names.split(",")}


def table(args: argparse.Namespace) -> None:
    """Our PGD-K / torchattacks PGD-K on every architecture, with the layout our probe chose."""
    builders: dict[str, Callable[[], nn.Module]] = {
        a: lambda a=a: build_model(a, args.classes) for a in args.archs.split(",") if a
    }
    builders |= timm_builders(args.timm, args.classes, args.size)
    load0 = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"torchattacks {torchattacks.__version__}; {args.batch} x 3 x {args.size} x {args.size}, "
        f"PGD-{args.steps}, eps {args.eps:g}/255, best of {args.repeats} interleaved rounds"
    )
    print(
        f"| model | layout chosen | probe: fwd+bwd NCHW / channels-last (CPU s) | probe (wall s) "
        f"| probe / our PGD | our PGD-{args.steps} (s) | torchattacks PGD-{args.steps} (s) "
        f"| ratio, best wall | ratio, paired median wall | ratio, best CPU time |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, build in builders.items():
        torch.manual_seed(0)
        print(table_row(name, build().eval(), args), flush=True)
    load1 = os.getloadavg()
    print(f"load average {load0[0]:.1f} -> {load1[0]:.1f}")


def table_row(name: str, model: nn.Module, args: argparse.Namespace) -> str:
    """One model: probe once (cost timed on its own), then interleaved rounds."""
    k, eps = args.steps, args.eps / 255
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        y = model(x).argmax(1)
    layout.clear_cache()
    with attack_mode(model):
        fast_layout(x, model)  # the probe our first attack would run
    choice = layout.cached(model, x)
    ours = PGD(model, steps=k, alpha_factor=2.5, batch_size=args.batch)
    theirs = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / k, steps=k, random_start=True)
    cases: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(x, y, eps),
        "theirs": lambda: theirs(x, y),
    }
    # no separate warm-up: the probe ran both layouts' kernels; the best round drops a cold one
    times: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(args.repeats):
        for c in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            cases[c]()
            times[c].append(time.perf_counter() - t0)
            cpu[c].append(time.process_time() - c0)
    o, t = times["ours"], times["theirs"]
    paired = statistics.median(a / b for a, b in zip(o, t, strict=True))
    cpu_ratio = min(cpu["ours"]) / min(cpu["theirs"])
    if choice is None:  # DPAAT_ATTACK_LAYOUT forces one: no probe
        chosen, probe = f"{os.environ.get(layout.LAYOUT_ENV)} (forced)", "- | - | -"
    else:
        chosen = "channels-last" if choice.channels_last else "NCHW"
        probe = (
            f"{choice.nchw_s:.3f} / {choice.channels_last_s:.3f} | {choice.probe_s:.2f} "
            f"| {choice.probe_s / min(o):.2f}"
        )
    return (
        f"| {name} | {chosen} | {probe} | {min(o):.3f} | {min(t):.3f} "
        f"| {min(o) / min(t):.3f} | {paired:.3f} | {cpu_ratio:.3f} |"
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        table(args)
        return
    torch.manual_seed(0)
    model = build_model(args.arch, args.classes).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():  # labels = predictions: every sample is attacked by every attack
        y = model(x).argmax(1)
    with attack_mode(model):
        x_cl = fast_layout(x, model)  # our loop's layout: the probe runs here (or it is forced)
    ours_layout = "NCHW" if x_cl.is_contiguous() else "channels-last"
    k, eps = args.steps, args.eps / 255
    alpha = 2.5 * eps / k

    def fwd_bwd(inputs: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with attack_mode(model):
                for _ in range(k):
                    input_grad(model, inputs, y, per_sample_ce)

        return run

    ours = PGD(model, steps=k, alpha_factor=2.5, batch_size=args.batch)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=k, random_start=True)
    cases: dict[str, Callable[[], object]] = {
        "K x fwd+bwd (our layout)": fwd_bwd(x_cl),
        "K x fwd+bwd (NCHW)": fwd_bwd(x),
        "our PGD": lambda: ours(x, y, eps),
        "torchattacks PGD (NCHW input)": lambda: theirs(x, y),
        "torchattacks PGD (our layout's input)": lambda: theirs(x_cl, y),
    }
    if not args.no_extra:
        apgd = APGDCE(model, steps=k, batch_size=args.batch)
        square = Square(model, n_queries=k, batch_size=args.batch)
        cases["our APGD-CE"] = lambda: apgd(x, y, eps)
        cases["our Square (K queries)"] = lambda: square(x, y, eps)
    for fn in cases.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    load0 = os.getloadavg()
    for r in range(args.repeats):
        # odd repeats run the cases in reverse order: what runs before a case (caches, allocator,
        # a neighbour's load) would otherwise bias it the same way every time
        for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            fn = cases[name]
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    load1 = os.getloadavg()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"load average {load0[0]:.1f} -> {load1[0]:.1f}"
    )
    print(
        f"setup: {args.arch}, {args.batch} x 3 x {args.size} x {args.size}, K = {k}, "
        f"eps = {args.eps:g}/255, {args.repeats} interleaved repeats"
    )
    print(f"  {'seconds: median (min-max)':40s} {'wall clock':>24s} {'process CPU time':>24s}")
    for name in cases:
        w, c = wall[name], cpu[name]
        print(
            f"  {name:40s} {statistics.median(w):8.3f} ({min(w):6.3f}-{max(w):6.3f})"
            f" {statistics.median(c):8.3f} ({min(c):6.3f}-{max(c):6.3f})"
        )

    def ratio(num: str, den: str) -> str:
        """Per clock: the median of the per-repeat ratios (each pair measured back to back, so
        load drifts cancel) and the ratio of the fastest runs (the least disturbed ones)."""
        out = []
        for t in (wall, cpu):
            paired = statistics.median(a / b for a, b in zip(t[num], t[den], strict=True))
            out.append(f"{paired:6.3f} ({min(t[num]) / min(t[den]):6.3f})")
        return "   ".join(out)

    fb_cl, fb, pgd = "K x fwd+bwd (our layout)", "K x fwd+bwd (NCHW)", "our PGD"
    rows = [
        ("(a) our PGD / K x fwd+bwd, target <= 1.05", None, None),
        (f"    fwd+bwd in our loop's layout ({ours_layout})", pgd, fb_cl),
        ("    fwd+bwd in the caller's NCHW layout", pgd, fb),
        ("(b) our PGD / torchattacks PGD, target <= 0.90", None, None),
        ("    torchattacks given NCHW input", pgd, "torchattacks PGD (NCHW input)"),
        ("    torchattacks given our loop's layout", pgd, "torchattacks PGD (our layout's input)"),
    ]
    if not args.no_extra:
        rows += [
            ("(c) for information, / K x fwd+bwd (our layout)", None, None),
            ("    APGD-CE, K steps", "our APGD-CE", fb_cl),
            ("    Square, K queries (forward only)", "our Square (K queries)", fb_cl),
        ]
    print(f"ratios: paired median (fastest runs)  {'wall clock':>17s}   {'process CPU time':>17s}")
    for label, num, den in rows:
        print(label if num is None or den is None else f"{label:46s} {ratio(num, den)}")


if __name__ == "__main__":
    main()
