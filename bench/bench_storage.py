"""Benchmark: a checkpoint's save and resume through S3-compatible object storage vs the local
directory store (issue 15).

A ResNet-18-sized training checkpoint (torchvision ResNet-18 weights + SGD momentum buffers, as the
trainer writes it, ~90 MB) is:

- saved: ``save_checkpoint`` into the job folder, then published (local: the folder *is* the store,
  nothing more; S3: uploaded by ``S3Store.publish``, multipart, its sha256 computed first);
- resumed on another host: fetched into an empty job folder (local: already there; S3: downloaded,
  sha256 checked, renamed into place by ``S3Store.fetch``), then loaded with ``load_checkpoint``.

The S3 server is moto's standalone server on loopback (the tests' server), so the figures measure
the client side and a local HTTP hop, not a network; a real MinIO/S3 adds the link's bandwidth
(90 MB at 1 Gbit/s: ~0.75 s). Repeats alternate the backends; medians are printed side by side.

Run: .venv/bin/python bench/bench_storage.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from s3_support import moto_server  # noqa: E402

from app.services.storage import ArtifactStore, Storage, open_store  # noqa: E402
from models.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from worker.job_files import JobFiles  # noqa: E402


def checkpoint_state() -> dict[str, object]:
    model = torchvision.models.resnet18(num_classes=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # fills the momentum buffers
    return {
        "format": "dpaat-checkpoint/1",
        "epoch": 1,
        "config": {},
        "model_info": {"arch": "torchvision/resnet18"},
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_once(store: Storage, state: dict[str, object], job: str, tmp: Path) -> tuple[float, float]:
    """(save seconds, resume seconds) of one checkpoint through ``store``."""
    folder = store.job_dir(job)
    files = JobFiles(store, job, folder)

    def save() -> None:
        save_checkpoint(state, folder / "checkpoint.pt")
        files.save()

    save_s = timed(save)
    if not store.is_local:  # another host: an empty scratch folder
        shutil.rmtree(folder)
        folder.mkdir(parents=True)

    def resume() -> None:
        assert files.restore()
        load_checkpoint(folder / "checkpoint.pt")

    return save_s, timed(resume)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    state = checkpoint_state()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with moto_server(tmp / "moto.log") as server:
            bucket = server.new_bucket()
            s3 = open_store(server.settings(bucket, tmp))
            local = ArtifactStore(tmp / "artifacts")
            size = 0
            times: dict[str, list[tuple[float, float]]] = {"local": [], "s3": []}
            for r in range(args.repeats):
                order = [("local", local), ("s3", s3)]
                for name, store in order if r % 2 == 0 else order[::-1]:
                    times[name].append(run_once(store, state, f"job{r}", tmp))
                size = (local.job_dir(f"job{r}") / "checkpoint.pt").stat().st_size
    med = {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"# checkpoint {size / 2**20:.1f} MB, {args.repeats} repeats, medians, {machine}")
    print(f"{'':24}{'local':>10}{'s3 (moto)':>12}{'ratio':>8}")
    for i, what in enumerate(("save (+ publish)", "resume (fetch + load)")):
        a, b = med["local"][i], med["s3"][i]
        print(f"{what:24}{a:>9.3f}s{b:>11.3f}s{b / a:>8.2f}")


if __name__ == "__main__":
    main()
