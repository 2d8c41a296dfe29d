"""The dataset layouts users have, read into one list of labelled image files.

* HAM10000: ``HAM10000_metadata.csv`` (or ``labels.csv``) with ``image_id,dx[,lesion_id]``.
* ISIC 2019: ``ISIC_2019_Training_GroundTruth.csv``, one-hot ``image,MEL,NV,...,UNK``, and
  optionally ``ISIC_2019_Training_Metadata.csv`` whose ``lesion_id`` groups images of one lesion.
* ISIC 2020: ``ISIC_2020_Training_GroundTruth[_v2].csv`` with a binary ``target`` (benign,
  malignant), grouped by ``patient_id``.
* Class folders: ``root/<class>/<image>``.

The format is detected from the label file's columns (a file named ``labels.csv`` may hold any of
the three CSV layouts); the classes come from the data: HAM10000's ``dx`` vocabulary, ISIC 2019's
header columns (an ``UNK`` column nobody is labelled with is not a class), ISIC 2020's two target
values, the folder names. A label file is validated as a whole and every rejected row is reported.
No torch here: the web process reads formats without loading it.
"""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# HAM10000's diagnosis codes (its metadata's ``dx`` vocabulary): a subset keeps all seven, so a
# model trained on part of HAM10000 has the outputs of one trained on all of it.
HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC2020_CLASSES: tuple[str, ...] = ("benign", "malignant")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Label files, in the order they are looked for; the first present one is read.
LABEL_FILES = (
    "labels.csv",
    "HAM10000_metadata.csv",
    "ISIC_2019_Training_GroundTruth.csv",
    "ISIC_2020_Training_GroundTruth_v2.csv",
    "ISIC_2020_Training_GroundTruth.csv",
)
ISIC2019_METADATA = "ISIC_2019_Training_Metadata.csv"
KEPT_FILES = (*LABEL_FILES, ISIC2019_METADATA)  # what an upload keeps besides images and masks
# Where images are looked for: the challenges' own folder names, else the dataset's root.
IMAGE_DIRS = ("images", "ISIC_2019_Training_Input", "train")
IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a file stem, never a path
EXAMPLES = 5  # problems listed per kind in a report
NOT_ONE_HOT = "not one-hot (exactly one 1, the rest 0)"


class DataError(ValueError):
    """A dataset on disk is missing, malformed or inconsistent."""


class LabelFileError(DataError):
    """Rows of a label file were rejected; ``details`` lists them by kind."""

    def __init__(self, file: str, rejected: int, details: str) -> None:
        self.file, self.rejected, self.details = file, rejected, details
        super().__init__(f"{file}: {rejected} row(s) rejected; {details}")


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk."""

    image: str
    label: int
    group: str  # lesion (HAM10000, ISIC 2019), patient (ISIC 2020), else the image itself
    mask: str | None = None


@dataclass
class SampleList:
    """All samples of a dataset, its class names and its format."""

    samples: list[Sample]
    classes: tuple[str, ...]
    name: str = "dataset"
    format: str = "class_folders"  # ham10000 | isic2019 | isic2020 | class_folders

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def label_file(root: Path) -> Path | None:
    return next((root / n for n in LABEL_FILES if (root / n).is_file()), None)


def files_by_lower_name(folder: Path) -> dict[str, Path]:
    """The files of ``folder`` by lower-cased name (empty when there is no such folder)."""
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()}


def load_samples(root: str | Path) -> SampleList:
    """The dataset under ``root``, its format detected from the files there."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    path = label_file(root)
    return load_class_folders(root) if path is None else load_label_file(root, path)


# --------------------------------------------------------------------------- CSV layouts
class _Rows:
    """Reads a label file's rows and collects every rejected one by kind (all or nothing: a
    dataset silently missing rows would change its split and results)."""

    def __init__(self, root: Path, path: Path, id_column: str) -> None:
        self.root, self.path, self.id_column = root, path, id_column
        image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), root)
        # File names matched case-insensitively (cameras and Windows write ISIC_0024306.JPG).
        self.images = files_by_lower_name(image_dir)
        self.masks = files_by_lower_name(root / "masks")
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.first_line: dict[str, int] = {}

    def reject(self, kind: str, line: int, text: str) -> None:
        self.problems[kind].append(f"line {line} {text}")

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, str]]]:
        """(line, image id, row) of the rows whose image id is valid, new and has an image."""
        for line, row in read_csv(self.path):
            image_id = (row.get(self.id_column) or "").strip()
            if not IMAGE_ID.match(image_id):
                self.reject(f"bad {self.id_column}", line, repr(image_id[:40]))
                continue
            if image_id in self.first_line:
                first = self.first_line[image_id]
                self.reject(
                    f"duplicate {self.id_column}", line, f"{image_id} (first on line {first})"
                )
                continue
            self.first_line[image_id] = line
            yield line, image_id, row

    def image(self, line: int, image_id: str) -> Path | None:
        names = (f"{image_id}{ext}".lower() for ext in IMAGE_SUFFIXES)
        found = next((self.images[n] for n in names if n in self.images), None)
        if found is None:
            self.reject("missing image", line, image_id)
        return found

    def sample(self, image: Path, image_id: str, label: int, group: str) -> Sample:
        mask = self.masks.get(f"{image_id}_segmentation.png".lower())
        return Sample(str(image), label, group or image_id, str(mask) if mask else None)

    def finish(self, samples: list[Sample], classes: tuple[str, ...], fmt: str) -> SampleList:
        if self.problems:
            rows = {item.split()[1] for items in self.problems.values() for item in items}
            parts = [
                f"{kind} ({len(items)}): {', '.join(items[:EXAMPLES])}"
                + (f", ... {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else "")
                for kind, items in sorted(self.problems.items())
            ]
            details = "; ".join(parts) + f"; allowed classes: {', '.join(classes)}"
            raise LabelFileError(self.path.name, len(rows), details)
        if not samples:
            raise DataError(f"{self.path}: no rows")
        return SampleList(samples, classes, name=fmt, format=fmt)


def read_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file; a file that is not readable text is a DataError."""
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column.
        with path.open(newline="", encoding="utf-8-sig") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                yield line, {k: v for k, v in row.items() if k is not None}
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path.name} is not a readable CSV file: {e}") from e


def header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path.name} is not a readable CSV file: {e}") from e


def load_label_file(root: Path, path: Path) -> SampleList:
    """A CSV layout, told apart by its columns."""
    names = header(path)
    columns = set(names)
    loader: Callable[[Path, Path, list[str]], SampleList]
    if {"image_id", "dx"} <= columns:
        loader = _ham10000
    elif "image" in columns and "MEL" in columns:
        loader = _isic2019
    elif {"image_name", "target"} <= columns:
        loader = _isic2020
    else:
        raise DataError(
            f"{path.name}: unknown label file layout (columns {sorted(columns)[:12]}); expected "
            "HAM10000 (image_id, dx), ISIC 2019 (image, MEL, NV, ...) or ISIC 2020 "
            "(image_name, target): see docs/datasets.md"
        )
    return loader(root, path, names)


def _ham10000(root: Path, path: Path, columns: list[str]) -> SampleList:
    rows, index = _Rows(root, path, "image_id"), {c: i for i, c in enumerate(HAM10000_CLASSES)}
    samples = []
    for line, image_id, row in rows:
        dx = (row.get("dx") or "").strip()
        if dx not in index:
            rows.reject("unknown class", line, f"{image_id}: {dx[:40]!r}")
        image = rows.image(line, image_id)
        if image is not None and dx in index:
            group = (row.get("lesion_id") or "").strip()
            samples.append(rows.sample(image, image_id, index[dx], group))
    return rows.finish(samples, HAM10000_CLASSES, "ham10000")


def _isic2019(root: Path, path: Path, columns: list[str]) -> SampleList:
    """One-hot rows: exactly one column is 1, the others 0 (``1.0``/``0.0`` as ISIC writes them)."""
    diagnoses = [c for c in columns if c != "image"]
    lesions = _isic2019_lesions(root)
    rows = _Rows(root, path, "image")
    picked: list[tuple[int, str, Path, str]] = []  # line, image id, file, diagnosis
    for line, image_id, row in rows:
        values = {c: _one_hot_value(row.get(c)) for c in diagnoses}
        ones = [c for c, v in values.items() if v == 1]
        if any(v is None for v in values.values()) or len(ones) != 1:
            shown = [f"{c}={(row.get(c) or '').strip()[:8]}" for c in diagnoses if values[c] != 0]
            rows.reject(NOT_ONE_HOT, line, f"{image_id}: {','.join(shown) or 'all 0'}")
            continue
        image = rows.image(line, image_id)
        if image is not None:
            picked.append((line, image_id, image, ones[0]))
    used = {d for *_, d in picked}
    # UNK marks images outside the other diagnoses (the challenge's test set has them, its
    # training set does not): it is a class only when some image is labelled with it.
    classes = tuple(d for d in diagnoses if d != "UNK" or d in used)
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        rows.sample(image, image_id, index[d], lesions.get(image_id, ""))
        for _, image_id, image, d in picked
    ]
    return rows.finish(samples, classes, "isic2019")


def _one_hot_value(text: str | None) -> int | None:
    try:
        v = float((text or "").strip())
    except ValueError:
        return None
    return int(v) if v in (0.0, 1.0) else None


def _isic2019_lesions(root: Path) -> dict[str, str]:
    """image -> lesion_id from the optional metadata file (an empty lesion_id: no grouping)."""
    path = root / ISIC2019_METADATA
    if not path.is_file():
        return {}
    if not {"image", "lesion_id"} <= set(header(path)):
        raise DataError(f"{path.name}: missing columns image and lesion_id")
    return {
        (row.get("image") or "").strip(): (row.get("lesion_id") or "").strip()
        for _, row in read_csv(path)
    }


def _isic2020(root: Path, path: Path, columns: list[str]) -> SampleList:
    """Binary ``target`` (0 benign, 1 malignant); a patient's images stay in one split part."""
    rows = _Rows(root, path, "image_name")
    samples = []
    for line, image_id, row in rows:
        target = (row.get("target") or "").strip()
        if target not in ("0", "1"):
            rows.reject("bad target (0 or 1)", line, f"{image_id}: {target[:40]!r}")
        image = rows.image(line, image_id)
        if image is not None and target in ("0", "1"):
            patient = (row.get("patient_id") or "").strip()
            samples.append(rows.sample(image, image_id, int(target), patient))
    return rows.finish(samples, ISIC2020_CLASSES, "isic2020")


# --------------------------------------------------------------------------- class folders
def load_class_folders(root: str | Path) -> SampleList:
    """Plain layout: ``root/<class name>/<image>``; classes sorted by name."""
    root = Path(root)
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{root}: no label file ({', '.join(LABEL_FILES)}) and no class folders")
    samples = [
        Sample(image=str(p), label=i, group=f"{name}/{p.stem}")
        for i, name in enumerate(classes)
        for p in sorted((root / name).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DataError(f"{root}: no images in the class folders")
    return SampleList(samples, classes, name=root.name, format="class_folders")
