"""Benchmark: evaluating an ONNX-uploaded ResNet-18 against the same network loaded natively.

The network (torchvision ResNet-18, random weights, 7 classes) is saved as safetensors and loaded
the way a torchvision upload is; its ONNX export (`models.export`, what `dpaat export --format
onnx` writes) is loaded the way an ONNX upload is (onnx2torch). Both are evaluated with the same
attacks on the same images (``models.evaluation.evaluate_model``: clean pass, FGSM and PGD-K at
each eps, checks; Grad-CAM off so the attacks dominate). Repeats alternate the order; medians of
wall-clock and process CPU time are printed with the ratio ONNX / native. Target <= 1.10 (the
converted graph must not be a slow interpreter).

Run: .venv/bin/python bench/bench_byom.py [--size 64] [--images 64] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from io import BytesIO
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.api import load_model
from models.data import synthetic_dataset
from models.evaluation import evaluate_model
from models.export import export_archive

CLASSES = [f"class{k}" for k in range(7)]  # the generated dataset's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import torchvision
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    save_file(net.state_dict(), str(tmp / "w.safetensors"))
    info = {"framework": "torchvision", "architecture": "resnet18", "classes": CLASSES,
            "image_size": args.size}  # fmt: skip
    native = load_model(tmp / "w.safetensors", info=dict(info))
    with zipfile.ZipFile(BytesIO(export_archive(native.model, native.info, "onnx"))) as z:
        z.extractall(tmp)
    onnx_info = {**info, "framework": "onnx"}
    converted = load_model(tmp / "model.onnx", info=dict(onnx_info))

    data = synthetic_dataset(n=args.images, size=args.size, num_classes=len(CLASSES))
    eps = (0.0, 1.0, 2.0)
    attacks = ({"name": "fgsm"}, {"name": "pgd", "steps": args.steps})

    def run(model: torch.nn.Module) -> tuple[float, float, dict[str, object]]:
        w, c = time.perf_counter(), time.process_time()
        report = evaluate_model(
            model, data, eps_list=eps, attacks=attacks, gradcam=False, batch_size=64,
            model_info={"classes": CLASSES}, dataset_info={"name": "synthetic"},
        )  # fmt: skip
        return time.perf_counter() - w, time.process_time() - c, report

    times: dict[str, list[tuple[float, float]]] = {"native": [], "onnx": []}
    reports: dict[str, dict[str, object]] = {}
    for r in range(args.repeats):
        order = ["native", "onnx"] if r % 2 == 0 else ["onnx", "native"]
        for name in order:
            wall, cpu, reports[name] = run(native.model if name == "native" else converted.model)
            times[name].append((wall, cpu))

    x = data.images[:16].float() / 255
    with torch.no_grad():
        diff = float((converted.model(x) - native.model(x)).abs().max())
    print(f"# ResNet-18, {args.images} images at {args.size} px, eps {eps}, PGD-{args.steps}")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {args.repeats} repeats (medians)")  # fmt: skip
    print(f"max abs logit difference ONNX vs native: {diff:.2e}")

    def accuracy(name: str) -> dict[str, object]:
        robust = reports[name]["robust"]
        assert isinstance(robust, dict)
        return {k: (v["accuracy"], v["per_attack"]) for k, v in robust.items()}

    same = accuracy("native") == accuracy("onnx")
    print(f"identical accuracies (clean, per eps and attack): {same}")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in times.items()}  # fmt: skip
    for name, (w, c) in med.items():
        print(f"{name:>7}: wall {w:7.2f} s   cpu {c:7.2f} s")
    print(f"ratio ONNX / native: wall {med['onnx'][0] / med['native'][0]:.3f}   "
          f"cpu {med['onnx'][1] / med['native'][1]:.3f}   (target <= 1.10)")  # fmt: skip


if __name__ == "__main__":
    main()
