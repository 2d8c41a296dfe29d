"""Datasets: upload an archive or register a server directory, validate, count, list, delete.

Validation reads the layout (``models.formats``: HAM10000, ISIC 2019/2020, class folders) with
``models.data.load_samples`` (imported on first use: it brings torch, which the web process does
not load at start). Each dataset gets its split manifest at creation, so every training and
evaluation job on it uses the same lesion- or patient-grouped split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.settings import Settings
from app.db.tables import ACTIVE_STATUSES, Dataset, Job, new_id
from app.services import archives, images
from app.services.errors import Conflict, Invalid, NotFound, ServiceError
from app.services.storage import SCHEME, Storage, copy_stream

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def _reencode(root: Path, data: Any, settings: Settings, top: Path) -> None:
    """Rewrite every image and mask of an uploaded dataset without its metadata (decoded under
    the pixel limit), then delete every other file under ``top`` (the extracted archive) except
    the labels: what is stored is exactly what was validated."""
    from models.formats import KEPT_FILES  # only on an upload: the web process starts without it

    keep = {root / n for n in KEPT_FILES}
    for s in data.samples:
        for name in (s.image, s.mask):
            if name is None:
                continue
            path = Path(name)
            try:
                images.reencode_file(path, max_pixels=settings.max_image_pixels)
            except ServiceError as e:
                raise type(e)(f"{path.relative_to(root)}: {e.message}") from e
            keep.add(path)
    for path in sorted(top.rglob("*"), reverse=True):  # children before their folders
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif path not in keep:
            path.unlink()


def _describe(
    root: Path, settings: Settings | None = None, upload_dir: Path | None = None
) -> dict[str, Any]:
    """Validate the layout under ``root`` and describe it (classes, counts, split manifest).

    For an upload (``upload_dir``: the extracted archive) the files are rewritten by
    ``_reencode``; a registered directory is only read."""
    from models.data import DataError, build_manifest, load_samples
    from models.formats import LabelFileError

    try:
        data = load_samples(root)
    except LabelFileError as e:  # the label file is read as a whole: every rejected row listed
        raise Invalid(
            f"{e.file}: {e.rejected} row(s) rejected, nothing was stored; {e.details}"
        ) from e
    except DataError as e:
        raise Invalid(f"not a dataset: {_relative(e, root)}") from e
    counts = data.counts()
    if sum(1 for n in counts.values() if n > 0) < 2:
        raise Invalid(f"a dataset needs images of at least two classes, found {counts}")
    for s in data.samples:
        with open(s.image, "rb") as f:
            head = f.read(8)
        if not head.startswith(_IMAGE_MAGIC):
            raise Invalid(f"{Path(s.image).name} is not a JPEG or PNG image")
    manifest = build_manifest(data, seed=0)
    if settings is not None:
        check_trainable(counts, manifest.parts, settings)
    if upload_dir is not None and settings is not None:
        _reencode(root, data, settings, upload_dir)
    return {
        "layout": data.format,
        "classes": list(data.classes),
        "class_counts": counts,
        "num_samples": len(data.samples),
        "has_masks": all(s.mask for s in data.samples),
        "manifest": manifest,
    }


def check_trainable(
    counts: dict[str, int], parts: dict[str, list[str]], settings: Settings
) -> None:
    """Refuse (``Invalid``) a dataset a training job could not use: fewer images than the
    settable minimums, or a split (train, val, test, lesion-grouped) with an empty part."""
    found = ", ".join(f"{c} {n}" for c, n in sorted(counts.items()) if n)
    total = sum(counts.values())
    if total < settings.min_dataset_images:
        raise Invalid(
            f"too few images to train on: {total} ({found}); a dataset needs at least "
            f"{settings.min_dataset_images} (DPAAT_MIN_DATASET_IMAGES): add images"
        )
    small = {c: n for c, n in counts.items() if 0 < n < settings.min_images_per_class}
    if small:
        raise Invalid(
            f"too few images in class(es) {', '.join(sorted(small))} ({found}); each class "
            f"needs at least {settings.min_images_per_class} (DPAAT_MIN_IMAGES_PER_CLASS): add "
            "images to these classes or remove them"
        )
    empty = [p for p in ("train", "val", "test") if not parts.get(p)]
    if empty:
        sizes = ", ".join(f"{p} {len(parts.get(p, []))}" for p in ("train", "val", "test"))
        raise Invalid(
            f"the split of this dataset leaves {' and '.join(empty)} empty ({sizes} images; "
            "images of one lesion stay in one part): add images of more lesions"
        )


def _relative(error: Exception, root: Path) -> str:
    """An error message without the server's directory layout."""
    return str(error).replace(str(root) + "/", "").replace(str(root), ".")


def _folder_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _save(
    session: Session,
    store: Storage,
    dataset_id: str,
    *,
    owner: str,
    name: str,
    source: str,
    root: str,
    described: dict[str, Any],
    size_bytes: int,
    archive_sha256: str | None = None,
) -> Dataset:
    manifest = described["manifest"]
    ref = store.put_text(f"datasets/{dataset_id}/manifest.json", manifest.to_json())
    row = Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        source=source,
        layout=described["layout"],
        root=root,
        manifest_uri=ref.uri,
        manifest_sha256=manifest.sha256,
        classes=described["classes"],
        class_counts=described["class_counts"],
        num_samples=described["num_samples"],
        has_masks=described["has_masks"],
        archive_sha256=archive_sha256,
        size_bytes=size_bytes,
    )
    session.add(row)
    session.commit()
    return row


def create_from_archive(
    session: Session,
    store: Storage,
    settings: Settings,
    *,
    owner: str,
    name: str,
    upload: BinaryIO,
) -> Dataset:
    """Store an uploaded zip / tar.gz archive, extract it safely, validate it, record it.

    Nothing is kept when any step fails: the partial folder and the archive are removed.
    """
    dataset_id = new_id()
    work = store.temp_dir()
    tree = f"datasets/{dataset_id}/data"
    try:
        archive_path = work / "upload"
        with archive_path.open("wb") as f:
            _size, archive_sha256 = copy_stream(upload, f, max_bytes=settings.max_upload_mb << 20)
        archives.safe_extract(
            archive_path,
            work / "data",
            max_entries=settings.max_archive_entries,
            max_bytes=settings.max_archive_extracted_mb << 20,
        )
        archive_path.unlink()
        root = archives.dataset_root(work / "data")
        described = _describe(root, settings, upload_dir=work / "data")
        size_bytes = _folder_size(work / "data")
        relative = root.relative_to(work / "data").as_posix()
        # The validated folder: moved in place (a directory store) or ONE archive object
        # (object storage; extracted into each worker's cache: docs/decisions/storage.md).
        store.put_tree(work / "data", tree)
        return _save(
            session,
            store,
            dataset_id,
            owner=owner,
            name=name,
            source="upload",
            root=SCHEME + tree + ("" if relative == "." else f"/{relative}"),
            described=described,
            size_bytes=size_bytes,
            archive_sha256=archive_sha256,
        )
    except BaseException:
        session.rollback()
        store.delete(SCHEME + f"datasets/{dataset_id}")
        raise
    finally:
        archives.remove_tree(work)


def register_directory(
    session: Session,
    store: Storage,
    settings: Settings,
    *,
    owner: str,
    name: str | None,
    path: str,
) -> Dataset:
    """Record a server directory under one of ``settings.data_roots`` (read in place, never
    copied or deleted)."""
    requested = Path(path)
    if not requested.is_absolute():
        raise Invalid("path must be absolute")
    resolved = requested.resolve()  # follows symlinks: containment is checked on the real path
    if not any(resolved == r or resolved.is_relative_to(r) for r in settings.data_roots):
        raise Invalid("path is not under a data root this server allows (settings.data_roots)")
    if not resolved.is_dir():
        raise Invalid("path is not a directory")
    described = _describe(resolved, settings)
    dataset_id = new_id()
    try:
        return _save(
            session,
            store,
            dataset_id,
            owner=owner,
            name=name or resolved.name,
            source="registered",
            root=str(resolved),
            described=described,
            size_bytes=0,
        )
    except BaseException:
        session.rollback()
        store.delete(SCHEME + f"datasets/{dataset_id}")
        raise


def get_dataset(session: Session, dataset_id: str, owner: str | None = None) -> Dataset:
    """The dataset with this id (of this owner when given); ``NotFound`` otherwise."""
    row = session.get(Dataset, dataset_id)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFound(f"dataset {dataset_id} not found")
    return row


def list_datasets(
    session: Session, owner: str, *, limit: int = 50, offset: int = 0
) -> tuple[list[Dataset], int]:
    """A page of the owner's datasets, newest first, and their total."""
    total = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.owner == owner))
    rows = session.scalars(
        select(Dataset)
        .where(Dataset.owner == owner)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), int(total or 0)


def delete_dataset(session: Session, store: Storage, dataset_id: str, owner: str) -> None:
    """Delete a dataset and its stored files; ``Conflict`` while a job still needs it.

    A registered directory is never touched (only its manifest in the store is removed). Models
    and finished jobs keep working: their ``dataset_id`` becomes null.
    """
    row = get_dataset(session, dataset_id, owner)
    busy = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.dataset_id == dataset_id, Job.status.in_([s.value for s in ACTIVE_STATUSES]))
    )
    if busy:
        raise Conflict(f"dataset {dataset_id} is used by {busy} unfinished job(s)")
    session.delete(row)
    session.commit()
    store.delete(SCHEME + f"datasets/{dataset_id}")


def dataset_root(row: Dataset, store: Storage) -> Path:
    """The local folder the dataset's images are read from: a registered server directory, or
    the stored upload (on object storage: extracted into this host's cache)."""
    if not row.root.startswith(SCHEME):
        return Path(row.root)
    tree = SCHEME + f"datasets/{row.id}/data"
    if row.root != tree and not row.root.startswith(tree + "/"):
        raise Invalid(f"dataset {row.id} names files outside its folder")
    return store.local_dir(tree) / row.root[len(tree) :].lstrip("/")


def manifest_path(row: Dataset, store: Storage) -> Path:
    """The dataset's split manifest (every job on the dataset uses this split), as a local file."""
    return store.local_path(row.manifest_uri)
