"""Datasets: HAM10000 as shipped, class-per-folder, and a generated set for tests and demos.

Every dataset returns ``(image, label, index)``: DPAAT keeps one perturbation radius per training
sample and needs a stable index. Images are decoded and resized once, kept in memory as uint8
(8,924 images at 64 px are ~110 MB), and returned as float tensors in [0, 1].
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Where the shared copy lives relative to a checkout; overridable by DPAAT_DATA_ROOT.
DEFAULT_DATA_ENV = "DPAAT_DATA_ROOT"


class DataError(ValueError):
    """A dataset on disk is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk."""

    image: str
    label: int
    group: str  # lesion_id for HAM10000; the file stem elsewhere (no grouping)
    mask: str | None = None


@dataclass
class SampleList:
    """All samples of a dataset and its class names."""

    samples: list[Sample]
    classes: tuple[str, ...]
    name: str = "dataset"

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def default_data_root() -> Path | None:
    """The HAM10000 copy named by DPAAT_DATA_ROOT, else ../shared/data/ham10000, if present."""
    env = os.environ.get(DEFAULT_DATA_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000")
    candidates.append(Path.cwd().parent / "shared" / "data" / "ham10000")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def files_by_lower_name(folder: Path) -> dict[str, Path]:
    """The files of ``folder`` by lower-cased name (empty when there is no such folder)."""
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()}


def load_ham10000(root: str | Path) -> SampleList:
    """HAM10000 layout: ``labels.csv`` (or ``HAM10000_metadata.csv``), ``images/``, ``masks/``
    (optional)."""
    root = Path(root)
    csv_path = next(
        (root / n for n in ("labels.csv", "HAM10000_metadata.csv") if (root / n).is_file()), None
    )
    if csv_path is None:
        raise DataError(f"{root}: no labels.csv or HAM10000_metadata.csv")
    image_dir = root / "images" if (root / "images").is_dir() else root
    mask_dir = root / "masks"
    index = {s: i for i, s in enumerate(HAM10000_CLASSES)}
    samples: list[Sample] = []
    # File names matched case-insensitively (cameras and Windows write ISIC_0024306.JPG).
    images = files_by_lower_name(image_dir)
    masks = files_by_lower_name(mask_dir)
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing_cols = {"image_id", "dx"} - set(reader.fieldnames or [])
        if missing_cols:
            raise DataError(f"{csv_path}: missing columns {sorted(missing_cols)}")
        for row in reader:
            dx = row["dx"].strip()
            if dx not in index:
                raise DataError(f"{csv_path}: unknown class {dx!r} for {row['image_id']}")
            image = next(
                (
                    images[f"{row['image_id']}{ext}".lower()]
                    for ext in IMAGE_SUFFIXES
                    if f"{row['image_id']}{ext}".lower() in images
                ),
                None,
            )
            if image is None:
                raise DataError(f"{csv_path}: image {row['image_id']} not found in {image_dir}")
            mask = masks.get(f"{row['image_id']}_segmentation.png".lower())
            samples.append(
                Sample(
                    image=str(image),
                    label=index[dx],
                    group=(row.get("lesion_id") or row["image_id"]).strip(),
                    mask=str(mask) if mask is not None else None,
                )
            )
    if not samples:
        raise DataError(f"{csv_path}: no rows")
    return SampleList(samples, HAM10000_CLASSES, name="ham10000")


def load_class_folders(root: str | Path) -> SampleList:
    """Plain layout: ``root/<class name>/<image>``; classes sorted by name."""
    root = Path(root)
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{root}: no class folders")
    samples = [
        Sample(image=str(p), label=i, group=f"{name}/{p.stem}")
        for i, name in enumerate(classes)
        for p in sorted((root / name).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DataError(f"{root}: no images in the class folders")
    return SampleList(samples, classes, name=root.name)


def load_samples(root: str | Path) -> SampleList:
    """Either layout, detected from what is on disk."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    if (root / "labels.csv").is_file() or (root / "HAM10000_metadata.csv").is_file():
        return load_ham10000(root)
    return load_class_folders(root)


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


# --------------------------------------------------------------------------- tensors
def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An RGB image file as a uint8 tensor (3, size, size)."""
    try:
        with Image.open(path) as src:
            im = src.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_mask(path: str | Path, size: int) -> torch.Tensor:
    """A lesion mask as a bool tensor (size, size), thresholded at 128."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(arr >= 128)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


class TensorImageDataset(Dataset):
    """Images held in memory as uint8; returns ``(image in [0,1], label, index)``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        masks: torch.Tensor | None = None,
        names: list[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor (N, C, H, W)")
        self.images = images
        self.labels = labels.long()
        self.classes = tuple(classes)
        self.masks = masks  # (N, H, W) bool, or None when the dataset has no masks
        self.names = names or [str(i) for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return to_float(self.images[i]), int(self.labels[i]), i

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def tensor_dataset(
    samples: Sequence[Sample], classes: Sequence[str], size: int
) -> TensorImageDataset:
    """Decode and resize every image once."""
    images = torch.stack([load_image(s.image, size) for s in samples]) if samples else None
    if images is None:
        raise DataError("empty dataset")
    has_masks = all(s.mask for s in samples)
    masks = torch.stack([load_mask(s.mask, size) for s in samples if s.mask]) if has_masks else None
    labels = torch.tensor([s.label for s in samples])
    return TensorImageDataset(images, labels, classes, masks, [Path(s.image).name for s in samples])


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

    train: TensorImageDataset
    val: TensorImageDataset
    test: TensorImageDataset
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
) -> DataBundle:
    """The datasets of a run.

    With ``data_root`` None, a generated dataset (for tests and the demo without data).
    Otherwise the split manifest at ``manifest_path`` is reused when it exists and written there
    when it does not. ``limit`` caps each part (class-stratified) for quick CPU runs; it applies
    after the split, so the test set of a limited run is a subset of the full test set.
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
    empty = TensorImageDataset(
        torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(0), data.classes
    )
    sets = {
        part: tensor_dataset(
            subsample(select(data, m, part), limit, seed), data.classes, image_size
        )
        if part in parts
        else empty
        for part in ("train", "val", "test")
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
