"""Images as training and evaluation read them: by index, as uint8 batches, from disk or memory.

:class:`FileImageDataset` decodes an image file per item (PIL, resized to ``image_size``) and
keeps decoded images in a bounded cache held in memory shared with the DataLoader's worker
processes, so an image decoded by any worker is not decoded again in a later epoch and memory is
bounded by the cache, not by the dataset. Batches are read in the order the caller gives (the
trainer's seeded batch order), so a streamed run computes exactly what an in-memory one does.
:class:`TensorImageDataset` holds images in memory: generated data, which has no files.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from models.formats import DataError, Sample

CACHE_ENV = "DPAAT_DATA_CACHE_MB"  # decoded-image cache of one run's datasets together
WORKERS_ENV = "DPAAT_DATA_WORKERS"  # DataLoader worker processes decoding images (0: in-process)
DEFAULT_CACHE_MB = 1024
Index = torch.Tensor | Sequence[int] | slice


def cache_bytes_setting() -> int:
    return int(float(os.environ.get(CACHE_ENV, DEFAULT_CACHE_MB)) * (1 << 20))


def workers_setting() -> int:
    """``DPAAT_DATA_WORKERS``, else half the cores (at most 4): on 2 cores one process decodes
    while the other trains."""
    env = os.environ.get(WORKERS_ENV)
    if env is not None and env.strip():
        return max(0, int(env))
    return min(4, max(1, (os.cpu_count() or 2) // 2))


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


def positions(idx: Index, n: int) -> list[int]:
    if isinstance(idx, slice):
        return list(range(n)[idx])
    if isinstance(idx, torch.Tensor):
        return [int(i) for i in idx.reshape(-1).tolist()]
    return [int(i) for i in idx]


def as_index(idx: Index) -> torch.Tensor | slice:
    return idx if isinstance(idx, slice) else torch.as_tensor(idx, dtype=torch.long)


def sequential_parts(n: int, batch_size: int) -> list[torch.Tensor]:
    """Indices 0..n-1 in consecutive batches (evaluation passes)."""
    return list(torch.arange(n).split(batch_size))


class ImageDataset(Dataset):
    """Labels in memory, images by index as uint8 (3, H, W); ``dataset[i]`` is
    ``(image, label, i)``."""

    labels: torch.Tensor
    classes: tuple[str, ...]
    names: list[str]
    image_size: int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.image(i), int(self.labels[i]), i

    def image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def images_at(self, idx: Index) -> torch.Tensor:
        """The images at ``idx`` as one uint8 batch (N, 3, H, W), read in this process."""
        return self._stack([self.image(i) for i in positions(idx, len(self))])

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.stack(images)

    @property
    def has_masks(self) -> bool:
        return False

    def masks_at(self, idx: Index) -> torch.Tensor | None:
        """The lesion masks at ``idx`` (N, H, W) bool, None when the dataset has none."""
        return None

    def batches(self, parts: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 batch of each index tensor of ``parts``, in that order."""
        for idx in parts:
            yield self.images_at(idx)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, idx: torch.Tensor) -> ImageDataset:
        """The samples at ``idx``, reading through this dataset (and its cache)."""
        return SubsetDataset(self, idx)


class TensorImageDataset(ImageDataset):
    """Images held in memory as uint8: generated data, and in-memory copies for comparisons."""

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
        self.image_size = int(images.shape[-1])

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def images_at(self, idx: Index) -> torch.Tensor:
        return self.images[as_index(idx)]

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def masks_at(self, idx: Index) -> torch.Tensor | None:
        if self.masks is None:
            return None
        return self.masks[as_index(idx)]


def tensor_dataset(
    samples: Sequence[Sample], classes: Sequence[str], size: int
) -> TensorImageDataset:
    """Every image decoded into memory (the in-memory reference streaming is compared with)."""
    if not samples:
        raise DataError("empty dataset")
    images = torch.stack([load_image(s.image, size) for s in samples])
    has_masks = all(s.mask for s in samples)
    masks = torch.stack([load_mask(s.mask, size) for s in samples if s.mask]) if has_masks else None
    labels = torch.tensor([s.label for s in samples])
    return TensorImageDataset(images, labels, classes, masks, [Path(s.image).name for s in samples])


class DecodedCache:
    """Decoded images of items ``0 .. capacity - 1``, bounded by ``max_bytes``.

    The memory is an anonymous shared mapping made before the DataLoader forks its workers: a
    worker's decoded image is seen by the others and the main process, and outlives the workers
    (one set per pass). Which items are cached is fixed, not recently used: in a shuffled epoch
    every item is equally likely next, so a fixed subset hits as often as LRU would, with no
    bookkeeping shared between processes. A flag byte per slot is set after its image is written;
    two processes decoding the same item write the same bytes.
    """

    def __init__(self, n_items: int, shape: tuple[int, ...], max_bytes: int) -> None:
        self.shape, item = shape, math.prod(shape)
        self.capacity = max(0, min(n_items, max_bytes // (item + 1)))
        self._map: mmap.mmap | None = None
        if self.capacity:
            self._map = mmap.mmap(-1, self.capacity * (item + 1))
            buf = torch.frombuffer(self._map, dtype=torch.uint8)
            self.flags = buf[: self.capacity]
            self.images = buf[self.capacity :].view(self.capacity, *shape)

    @property
    def nbytes(self) -> int:
        return 0 if self._map is None else len(self._map)

    def get(self, i: int) -> torch.Tensor | None:
        if i < self.capacity and self.flags[i]:
            return self.images[i]
        return None

    def put(self, i: int, image: torch.Tensor) -> None:
        if i < self.capacity:
            self.images[i] = image
            self.flags[i] = 1

    def holds(self, idx: list[int]) -> bool:
        return all(i < self.capacity for i in idx) and bool(self.flags[idx].all()) if idx else True

    def __getstate__(self) -> dict[str, Any]:
        # a worker started by pickling (spawn) cannot share the mapping: it runs without a cache
        return {"shape": self.shape, "capacity": 0, "_map": None}


def _stack_batch(items: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    return torch.stack([image for image, _, _ in items])


class FileImageDataset(ImageDataset):
    """Images decoded from their files per item, through a :class:`DecodedCache`."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        image_size: int,
        cache_bytes: int = 0,
        workers: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)
        self.classes = tuple(classes)
        self.names = [Path(s.image).name for s in self.samples]
        self.image_size = image_size
        self.workers = workers_setting() if workers is None else workers
        self.cache = DecodedCache(len(self.samples), (3, image_size, image_size), cache_bytes)

    def image(self, i: int) -> torch.Tensor:
        hit = self.cache.get(i)
        if hit is not None:
            return hit
        image = load_image(self.samples[i].image, self.image_size)
        self.cache.put(i, image)
        return image

    @property
    def has_masks(self) -> bool:
        return bool(self.samples) and all(s.mask for s in self.samples)

    def masks_at(self, idx: Index) -> torch.Tensor | None:
        if not self.has_masks:
            return None
        size = self.image_size
        found = [load_mask(str(self.samples[i].mask), size) for i in positions(idx, len(self))]
        return torch.stack(found) if found else torch.zeros(0, size, size, dtype=torch.bool)

    def batches(self, parts: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Decoded by ``workers`` DataLoader processes (prefetching ahead of the caller), or in
        this process when there are none or every image is already in the cache."""
        lists = [positions(p, len(self)) for p in parts]
        if self.workers == 0 or self.cache.holds([i for idx in lists for i in idx]):
            for idx in lists:
                yield self._stack([self.image(i) for i in idx])
            return
        loader: DataLoader = DataLoader(
            self,
            batch_sampler=lists,
            num_workers=self.workers,
            collate_fn=_stack_batch,
            # its own seed source: the global RNG draws exactly what an in-memory run draws
            generator=torch.Generator(),
        )
        with may_start_children():
            batches = iter(loader)  # starts the workers
        yield from batches


@contextmanager
def may_start_children() -> Iterator[None]:
    """Celery's prefork pool runs tasks in daemonic processes, which ``multiprocessing`` forbids
    to start children (a daemon is killed without reaping them). DataLoader workers watch their
    parent and exit when it is gone, so the flag is lifted while they start."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemon = config.get("daemon", False)
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = daemon


class SubsetDataset(ImageDataset):
    """Some samples of another dataset, read through it."""

    def __init__(self, base: ImageDataset, idx: torch.Tensor) -> None:
        self.base, self.idx = base, idx.long()
        self.labels = base.labels[self.idx]
        self.classes = base.classes
        self.names = [base.names[i] for i in self.idx.tolist()]
        self.image_size = base.image_size

    def image(self, i: int) -> torch.Tensor:
        return self.base.image(int(self.idx[i]))

    def images_at(self, idx: Index) -> torch.Tensor:
        return self.base.images_at(self.idx[as_index(idx)])

    @property
    def has_masks(self) -> bool:
        return self.base.has_masks

    def masks_at(self, idx: Index) -> torch.Tensor | None:
        return self.base.masks_at(self.idx[as_index(idx)])

    def batches(self, parts: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        return self.base.batches([self.idx[p] for p in parts])
