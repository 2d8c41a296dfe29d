"""Datasets of a run: the split manifest, and images read from disk as training needs them.

The layouts on disk (HAM10000, ISIC 2019/2020, class folders) are read by :mod:`models.formats`.
Images on disk are streamed: decoded and resized per item, in DataLoader worker processes, with a
bounded cache of decoded images (:mod:`models.streaming`), so memory does not grow with the
dataset. Generated data (tests, the demo) has no files and lives in memory. Every dataset returns
``(image as uint8, label, index)``: DPAAT keeps one perturbation radius per training sample and
needs a stable index.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.formats import (
    HAM10000_CLASSES,
    IMAGE_SUFFIXES,
    DataError,
    Sample,
    SampleList,
    load_class_folders,
    load_samples,
)
from models.streaming import (
    FileImageDataset,
    ImageDataset,
    TensorImageDataset,
    cache_bytes_setting,
    load_image,
    load_mask,
    tensor_dataset,
    to_float,
)

__all__ = [
    "HAM10000_CLASSES",
    "IMAGE_SUFFIXES",
    "DataError",
    "FileImageDataset",
    "ImageDataset",
    "Sample",
    "SampleList",
    "TensorImageDataset",
    "load_class_folders",
    "load_image",
    "load_mask",
    "load_samples",
    "tensor_dataset",
    "to_float",
]

# Where the shared copy lives relative to a checkout; overridable by DPAAT_DATA_ROOT.
DEFAULT_DATA_ENV = "DPAAT_DATA_ROOT"


def default_data_root() -> Path | None:
    """The HAM10000 copy named by DPAAT_DATA_ROOT, else ../shared/data/ham10000, if present.

    A DPAAT_DATA_ROOT that is not a directory is an error, not a reason to train silently on
    another copy or on generated data (docs/decisions.md).
    """
    env = os.environ.get(DEFAULT_DATA_ENV)
    if env:
        if not Path(env).is_dir():
            raise NotADirectoryError(f"{DEFAULT_DATA_ENV}={env} is not a directory")
        return Path(env)
    candidates = [
        Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000",
        Path.cwd().parent / "shared" / "data" / "ham10000",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    return None


# --------------------------------------------------------------------------- split manifest
def make_split(
    samples: Sequence[Sample],
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> dict[str, list[int]]:
    """Split grouped by ``group`` (lesion) and stratified by class.

    Groups are dealt per class (by their majority label) in a seeded random order to whichever part
    is furthest below its target share, so each class is split close to ``fractions`` and no group
    is in two parts.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.group].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g, idx in sorted(groups.items()):
        label = Counter(samples[i].label for i in idx).most_common(1)[0][0]
        by_class[label].append(g)
    rng = random.Random(seed)
    names = ["train", "val", "test"]
    dealt: dict[str, list[tuple[int, str]]] = {n: [] for n in names}  # (label, group) per part
    for label in sorted(by_class):
        gs = by_class[label]
        rng.shuffle(gs)
        total = sum(len(groups[g]) for g in gs)
        taken = dict.fromkeys(names, 0)
        for g in gs:
            # the part with the largest deficit against its target takes the group
            part = max(names, key=lambda n: fractions[names.index(n)] * total - taken[n])
            dealt[part].append((label, g))
            taken[part] += len(groups[g])
    _fill_empty_parts(dealt, fractions)
    return {k: sorted(i for _, g in v for i in groups[g]) for k, v in dealt.items()}


def _fill_empty_parts(
    dealt: dict[str, list[tuple[int, str]]], fractions: tuple[float, float, float]
) -> None:
    """A small dataset can leave a part with a non-zero share empty (each class alone is too small
    for its 10 % of validation); training and evaluation read all three parts. Such a part takes
    one group from another part that keeps at least one: preferably a group whose class that part
    keeps too (so train keeps every class), from the part with the most groups, else from test
    before train. Datasets whose parts are all filled are not changed."""
    for part, share in zip(("test", "val"), (fractions[2], fractions[1]), strict=True):
        if dealt[part] or share <= 0:
            continue
        donors = [n for n in ("train", "test", "val") if n != part and len(dealt[n]) >= 2]
        if not donors:
            continue
        spare = [
            (len(dealt[n]), -k, n, i)
            for k, n in enumerate(donors)
            for i, (label, _) in enumerate(dealt[n])
            if sum(lab == label for lab, _ in dealt[n]) >= 2
        ]
        if spare:
            _, _, donor, index = max(spare)
        else:
            donor = next((n for n in ("test", "val") if n in donors), donors[0])
            index = len(dealt[donor]) - 1
        dealt[part].append(dealt[donor].pop(index))


@dataclass
class Manifest:
    """The split written to disk and reused by every run (sha256 identifies it in reports)."""

    dataset: str
    classes: tuple[str, ...]
    seed: int
    fractions: tuple[float, float, float]
    parts: dict[str, list[str]]  # image file names (not paths) per part
    sha256: str = ""

    def to_json(self) -> str:
        body = {
            "dataset": self.dataset,
            "classes": list(self.classes),
            "seed": self.seed,
            "fractions": list(self.fractions),
            "parts": self.parts,
        }
        return json.dumps(body, indent=1, sort_keys=True)


def build_manifest(data: SampleList, seed: int = 0, fractions=(0.7, 0.1, 0.2)) -> Manifest:
    split = make_split(data.samples, fractions, seed)
    parts = {k: [Path(data.samples[i].image).name for i in v] for k, v in split.items()}
    m = Manifest(data.name, data.classes, seed, tuple(fractions), parts)
    m.sha256 = hashlib.sha256(m.to_json().encode()).hexdigest()
    return m


def write_manifest(m: Manifest, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = m.to_json()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> Manifest:
    text = Path(path).read_text()
    try:
        body = json.loads(text)
        m = Manifest(
            body["dataset"],
            tuple(body["classes"]),
            int(body["seed"]),
            tuple(body["fractions"]),
            {k: list(v) for k, v in body["parts"].items()},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a split manifest ({e})") from e
    m.sha256 = hashlib.sha256(m.to_json().encode()).hexdigest()
    return m


def select(data: SampleList, m: Manifest, part: str) -> list[Sample]:
    by_name = {Path(s.image).name: s for s in data.samples}
    missing = [n for n in m.parts[part] if n not in by_name]
    if missing:
        raise DataError(
            f"manifest lists {len(missing)} images not in the dataset, e.g. {missing[0]}"
        )
    return [by_name[n] for n in m.parts[part]]


def subsample(samples: list[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """At most ``limit`` samples, stratified by class (each class keeps its share, at least one)."""
    if limit is None or limit >= len(samples):
        return samples
    rng = random.Random(seed)
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    out: list[Sample] = []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        out.extend(group[: max(1, round(limit * len(group) / len(samples)))])
    rng.shuffle(out)
    return out[:limit]


# --------------------------------------------------------------------------- datasets
def synthetic_dataset(
    n: int = 256, size: int = 32, num_classes: int = 3, seed: int = 0
) -> TensorImageDataset:
    """A generated, learnable stand-in for dermoscopy: a blob on skin-coloured noise.

    Each class has its own blob colour and shape (a small CNN learns it in a few epochs) and
    every image has a lesion mask, so Grad-CAM lesion focus can be computed.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    palette = torch.tensor(
        [[0.35, 0.2, 0.1], [0.15, 0.1, 0.3], [0.5, 0.1, 0.1], [0.1, 0.3, 0.1], [0.3, 0.3, 0.05]]
    )
    images = torch.empty(n, 3, size, size)
    masks = torch.empty(n, size, size, dtype=torch.bool)
    labels = torch.arange(n) % num_classes
    for i in range(n):
        c = int(labels[i])
        skin = torch.tensor([0.85, 0.65, 0.55]).view(3, 1, 1)
        img = skin + 0.06 * torch.randn(3, size, size, generator=g)
        cy, cx = (torch.rand(2, generator=g) * 0.4 + 0.3) * size
        r = size * (0.18 + 0.06 * float(torch.rand(1, generator=g)))
        stretch = 1.0 + 0.8 * (c % 2)  # odd classes are elongated
        m = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * stretch)) ** 2 <= 1.0
        colour = palette[c % len(palette)].view(3, 1, 1)
        img = torch.where(m, colour + 0.05 * torch.randn(3, size, size, generator=g), img)
        images[i] = img.clamp(0, 1)
        masks[i] = m
    classes = tuple(f"class{k}" for k in range(num_classes))
    return TensorImageDataset(
        (images * 255).round().to(torch.uint8),
        labels,
        classes,
        masks,
        [f"synthetic_{i}" for i in range(n)],
    )


@dataclass
class DataBundle:
    """Train/val/test datasets of one run plus where they came from (for the report)."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: tuple[str, ...]
    name: str
    manifest_sha256: str
    manifest_path: str | None = None
    extra: dict = field(default_factory=dict)


def load_bundle(
    data_root: str | Path | None,
    image_size: int,
    manifest_path: str | Path | None = None,
    seed: int = 0,
    limit: int | None = None,
    parts: Sequence[str] = ("train", "val", "test"),
    cache_bytes: int | None = None,
) -> DataBundle:
    """The datasets of a run.

    With ``data_root`` None, a generated dataset (for tests and the demo without data).
    Otherwise the split manifest at ``manifest_path`` is reused when it exists and written there
    when it does not. ``limit`` caps each part (class-stratified) for quick CPU runs; it applies
    after the split, so the test set of a limited run is a subset of the full test set.
    Images on disk are streamed; the parts share ``cache_bytes`` of decoded-image cache (default
    ``DPAAT_DATA_CACHE_MB``) in proportion to their sizes.
    """
    if data_root is None:
        n = limit or 240
        full = synthetic_dataset(n=n * 2, size=image_size, seed=seed)
        k = len(full)
        idx = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        cut1, cut2 = int(0.7 * k), int(0.8 * k)

        def sub(ix: torch.Tensor) -> TensorImageDataset:
            masks = full.masks[ix] if full.masks is not None else None
            return TensorImageDataset(full.images[ix], full.labels[ix], full.classes, masks)

        return DataBundle(
            sub(idx[:cut1]),
            sub(idx[cut1:cut2]),
            sub(idx[cut2:]),
            full.classes,
            "synthetic",
            "synthetic",
        )
    data = load_samples(data_root)
    if manifest_path is not None and Path(manifest_path).is_file():
        m = read_manifest(manifest_path)
        if tuple(m.classes) != tuple(data.classes):
            raise DataError(
                f"{manifest_path}: classes {m.classes} differ from the data's {data.classes}"
            )
    else:
        m = build_manifest(data, seed=seed)
        if manifest_path is not None:
            write_manifest(m, manifest_path)
    chosen = {
        part: subsample(select(data, m, part), limit, seed) if part in parts else []
        for part in ("train", "val", "test")
    }
    budget = cache_bytes_setting() if cache_bytes is None else cache_bytes
    total = max(1, sum(len(v) for v in chosen.values()))
    sets = {
        part: FileImageDataset(v, data.classes, image_size, budget * len(v) // total)
        for part, v in chosen.items()
    }
    return DataBundle(
        sets["train"],
        sets["val"],
        sets["test"],
        data.classes,
        data.name,
        m.sha256,
        str(manifest_path) if manifest_path else None,
    )
