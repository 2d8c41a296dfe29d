"""Epoch time with images streamed from disk against the same images decoded into memory.

Real HAM10000 images (DPAAT_DATA_ROOT), a class-stratified subset, 64 px, the same model, config
and seed on both sides. In memory: every image decoded up front into a uint8 tensor (what
``load_bundle`` did before streaming; its decode time is reported apart). Streamed: a
``FileImageDataset`` with the default DataLoader workers and a cache large enough for the subset,
so the first epoch decodes (in the workers, while the model trains) and later epochs read the
cache. The two sides run interleaved, ``--rounds`` times; per epoch the fastest round is kept, so a
slow-down of the shared machine hits both alike. The CPU time of the whole run (this process and
the DataLoader workers, the in-memory side's decode included) is compared too: on a loaded
machine it is the steadier figure. Target: streamed / in memory <= 1.10 per epoch.

    nice -n 10 .venv/bin/python bench/bench_streaming.py [--images 1200 --epochs 3 --rounds 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DPAAT_PROGRESS", "0")

from models.data import DataBundle, default_data_root, load_samples, subsample
from models.streaming import FileImageDataset, cache_bytes_setting, tensor_dataset, workers_setting
from models.training import TrainConfig, train


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = default_data_root()
    if root is None:
        print("no HAM10000 copy (set DPAAT_DATA_ROOT)")
        return 1
    data = load_samples(root)
    samples = subsample(data.samples, args.images, seed=0)
    val_samples = subsample(data.samples, 64, seed=1)
    cfg = TrainConfig(
        image_size=args.size, arch=args.arch, method="standard", epochs=args.epochs,
        batch_size=64, device="cpu", robust_val_eps=0.0,
    )  # fmt: skip
    print(
        f"# {args.arch}, {len(samples)} HAM10000 images at {args.size} px, {args.epochs} epochs, "
        f"{args.rounds} rounds, {args.threads} torch thread(s), {workers_setting()} loader "
        f"worker(s), cache {cache_bytes_setting() >> 20} MB"
    )
    best: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {"memory": [], "streamed": []}
    decode: list[float] = []
    for r in range(args.rounds):
        for side in ("memory", "streamed") if r % 2 == 0 else ("streamed", "memory"):
            t, c = time.perf_counter(), cpu_seconds()
            if side == "memory":
                train_set = tensor_dataset(samples, data.classes, args.size)
                decode.append(time.perf_counter() - t)
            else:
                train_set = FileImageDataset(
                    samples, data.classes, args.size, cache_bytes_setting()
                )
            val = tensor_dataset(val_samples, data.classes, args.size)
            bundle = DataBundle(train_set, val, val, data.classes, "ham10000", "bench")
            with tempfile.TemporaryDirectory() as tmp:
                result = train(cfg, tmp, data=bundle)
            cpu[side].append(cpu_seconds() - c)
            times = [float(h["train_seconds"]) for h in result.history]
            print(
                f"round {r + 1} {side:8s} epochs "
                + " ".join(f"{s:6.2f}" for s in times)
                + f"  CPU {cpu[side][-1]:.2f} s"
            )
            best[side] = [min(a, b) for a, b in zip(best.get(side, times), times, strict=True)]
    print(f"in-memory up-front decode of {len(samples)} images: {min(decode):.2f} s")
    print("| epoch | in memory (s) | streamed (s) | streamed / in memory |")
    print("| --- | --- | --- | --- |")
    for e, (m, s) in enumerate(zip(best["memory"], best["streamed"], strict=True), 1):
        print(f"| {e} | {m:.2f} | {s:.2f} | {s / m:.3f} |")
    m_all, s_all = sum(best["memory"]), sum(best["streamed"])
    print(f"| all | {m_all:.2f} | {s_all:.2f} | **{s_all / m_all:.3f}** (target <= 1.10) |")
    with_decode = (m_all + min(decode), s_all)
    print(f"wall, with the up-front decode: {with_decode[1] / with_decode[0]:.3f}")
    cm, cs = min(cpu["memory"]), min(cpu["streamed"])
    print(
        f"CPU of the whole run (decode included): in memory {cm:.2f} s, streamed {cs:.2f} s, "
        f"ratio {cs / cm:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
