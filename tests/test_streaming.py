"""Images streamed from disk (models/streaming.py): training on them computes exactly what
training on the same images decoded into memory computes, the decoded-image cache stays within its
bound and is filled by the DataLoader's workers, and memory does not grow with the dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import DataBundle
from models.formats import Sample
from models.streaming import FileImageDataset, tensor_dataset
from models.training import TrainConfig, load_trained_model, train
from models.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c")


def image_files(
    folder: Path, n: int, size: tuple[int, int] = (48, 36), seed: int = 0
) -> list[Sample]:
    """``n`` JPEG files of coloured noise (a class-dependent tint) and their samples."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = i % len(CLASSES)
        pixels = rng.integers(0, 160, (size[1], size[0], 3), dtype=np.uint8)
        pixels[..., label] += 90
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        samples.append(Sample(str(path), label, path.stem))
    return samples


def bundle(train: object, val: object) -> DataBundle:
    return DataBundle(train, val, val, CLASSES, "files", "sha")  # type: ignore[arg-type]


def test_streamed_training_matches_in_memory_tensors(tmp_path: Path) -> None:
    """DPAAT (one radius per sample, kept by index), augmentation on: the streamed run (two
    DataLoader workers, a cache holding a third of the images) gives the same losses, per-sample
    radii and weights as the run on the images decoded into memory."""
    samples = image_files(tmp_path / "img", 72)
    size = 24
    item = 3 * size * size
    streamed = FileImageDataset(samples[:60], CLASSES, size, cache_bytes=20 * (item + 1), workers=2)
    val = FileImageDataset(samples[60:], CLASSES, size, workers=0)
    memory = tensor_dataset(samples[:60], CLASSES, size)
    cfg = TrainConfig(
        image_size=size, method="dpaat", epochs=2, batch_size=16, pgd_steps=2, bisection_steps=2,
        robust_val_steps=2, robust_val_samples=6, device="cpu", augment=True,
    )  # fmt: skip
    a = train(cfg, tmp_path / "streamed", data=bundle(streamed, val))
    b = train(
        cfg, tmp_path / "memory", data=bundle(memory, tensor_dataset(samples[60:], CLASSES, size))
    )
    assert streamed.cache.capacity == 20 and streamed.workers == 2
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert a.history[-1]["eps_hist"] == b.history[-1]["eps_hist"]
    wa, wb = load_trained_model(a.checkpoint)[0], load_trained_model(b.checkpoint)[0]
    for (name, pa), pb in zip(wa.state_dict().items(), wb.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    saved_a = load_checkpoint(Path(a.checkpoint))["method"]
    saved_b = load_checkpoint(Path(b.checkpoint))["method"]
    assert torch.equal(saved_a["eps"], saved_b["eps"]), "per-sample radii by index"


def test_the_cache_is_bounded_and_filled_by_the_workers(tmp_path: Path) -> None:
    samples = image_files(tmp_path / "img", 40)
    size, item = 16, 3 * 16 * 16
    ds = FileImageDataset(samples, CLASSES, size, cache_bytes=25 * (item + 1), workers=2)
    assert ds.cache.capacity == 25 and ds.cache.nbytes <= 25 * (item + 1)
    parts = list(torch.randperm(40, generator=torch.Generator().manual_seed(1)).split(8))
    reference = tensor_dataset(samples, CLASSES, size)
    for idx, batch in zip(parts, ds.batches(parts), strict=True):
        assert torch.equal(batch, reference.images[idx])
    # decoded in the worker processes, seen here: the cached items are not decoded again
    assert ds.cache.holds(list(range(25))) and not ds.cache.holds([25])
    for p in [*samples[:25], samples[30]]:
        Path(p.image).unlink()
    assert torch.equal(ds.images_at(range(25)), reference.images[:25])
    with pytest.raises(ValueError, match="cannot read image"):
        ds.images_at([30])
    assert ds.subset(torch.tensor([3, 1])).images_at([0, 1]).equal(reference.images[[3, 1]])


def _read_in_a_daemon(paths: list[str], out: object) -> None:
    samples = [Sample(p, i % 3, str(i)) for i, p in enumerate(paths)]
    ds = FileImageDataset(samples, CLASSES, 16, workers=1)
    out.put(sum(len(b) for b in ds.batches(list(torch.arange(len(samples)).split(4)))))  # type: ignore[attr-defined]


def test_workers_start_in_a_celery_pool_process(tmp_path: Path) -> None:
    """Celery's prefork pool runs a training job in a daemonic process (billiard's): the
    DataLoader's worker processes still start there."""
    import billiard

    samples = image_files(tmp_path / "img", 12)
    queue = billiard.Queue()
    child = billiard.Process(
        target=_read_in_a_daemon, args=([s.image for s in samples], queue), daemon=True
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0 and queue.get(timeout=5) == 12


MEMORY_RUN = """
import json, sys, torch
from models.data import DataBundle
from models.formats import Sample
from models.streaming import FileImageDataset, tensor_dataset
from models.training import TrainConfig, train
samples = [Sample(p, i % 3, str(i)) for i, p in enumerate(json.loads(sys.argv[1]))]
mode, size, out = sys.argv[2], 112, sys.argv[3]
classes = ("a", "b", "c")
if mode == "streamed":
    data = FileImageDataset(samples, classes, size, cache_bytes=4 << 20, workers=0)
else:
    data = tensor_dataset(samples, classes, size)
val = tensor_dataset(samples[:6], classes, size)
cfg = TrainConfig(image_size=size, method="standard", epochs=1, batch_size=50, device="cpu",
                  robust_val_eps=0.0)
train(cfg, out, data=DataBundle(data, val, val, classes, "m", "sha"))
# VmHWM is this process's own peak: ru_maxrss would carry the parent's RSS over the exec (seen in
# CI: a flat 2,478 MB, the pytest process's size, for every run)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"maxrss_kb": int(hwm.split()[1])}))
"""


def start_run(samples: list[Sample], mode: str, out: Path) -> subprocess.Popen[str]:
    """One training run in a child process; :func:`peak_rss_mb` reads its peak."""
    paths = json.dumps([s.image for s in samples])
    # glibc keeps freed small blocks (each decoded image's buffers) as its own high-water mark, so
    # without these the peak RSS grows with the number of decodes, not with what is held (seen:
    # +61 MB for 360 more streamed images, +1 MB with them): returned to the OS at once, it
    # measures what the process holds
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    return subprocess.Popen(
        [sys.executable, "-c", MEMORY_RUN, paths, mode, str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip


def peak_rss_mb(run: subprocess.Popen[str]) -> float:
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-2000:]
    return float(json.loads(stdout.strip().splitlines()[-1])["maxrss_kb"]) / 1024


def test_memory_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    """Peak resident memory of a training run (112 px, a 4 MB cache) on 120 and on 480 images:
    streamed, it grows by less than 6 MB; decoded into memory, the 360 more images (13.5 MB as
    uint8) show, so the measurement sees what streaming avoids. The four runs go side by side:
    each reads its own process's peak."""
    samples = image_files(tmp_path / "img", 480, size=(160, 120))
    small, large = samples[:120], samples
    runs = {
        (mode, len(s)): start_run(s, mode, tmp_path / f"{mode}{len(s)}")
        for mode in ("streamed", "memory")
        for s in (small, large)
    }
    peak = {key: peak_rss_mb(run) for key, run in runs.items()}
    streamed = [peak["streamed", 120], peak["streamed", 480]]
    memory = [peak["memory", 120], peak["memory", 480]]
    print(f"peak RSS MB streamed {streamed}, in memory {memory}")
    assert streamed[1] - streamed[0] < 6, streamed
    assert memory[1] - memory[0] > 10, memory
