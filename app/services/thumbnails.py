"""What the dashboard shows of a dataset besides its counts: the sizes of its fixed split and a
few thumbnails (decoded under the pixel limit, re-encoded as small PNGs; chosen by index, never
by a client's path)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from app.db.tables import Dataset
from app.services import datasets
from app.services.errors import NotFound, ServiceError
from app.services.storage import Storage

MAX_THUMBS = 6
SIZE = 96
_SUFFIXES = (".jpg", ".jpeg", ".png")


def split_sizes(row: Dataset, store: Storage) -> dict[str, int]:
    """Images per part of the dataset's split (train / val / test)."""
    try:
        parts = json.loads(datasets.manifest_path(row, store).read_text()).get("parts", {})
    except (OSError, ValueError, ServiceError):
        return {}
    return {name: len(files) for name, files in parts.items()}


def _images(row: Dataset, store: Storage) -> list[Path]:
    root = datasets.dataset_root(row, store)
    found: list[Path] = []
    for path in sorted(root.rglob("*")):
        if "mask" in path.parent.name.lower() or path.suffix.lower() not in _SUFFIXES:
            continue
        found.append(path)
        if len(found) == MAX_THUMBS:
            break
    return found


def count(row: Dataset, store: Storage) -> int:
    return len(_images(row, store))


def thumbnail(row: Dataset, store: Storage, index: int) -> bytes:
    """The ``index``-th thumbnail of the dataset, a PNG at most SIZE px on a side."""
    files = _images(row, store)
    if not 0 <= index < len(files):
        raise NotFound(f"dataset {row.id} has no thumbnail {index}")
    with Image.open(files[index]) as im:
        im.thumbnail((SIZE, SIZE))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
