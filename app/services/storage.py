"""The artifact store: files addressed by ``artifact://<key>`` URIs, behind one interface with two
backends (docs/decisions/storage.md):

- ``ArtifactStore``: a local directory (the embedded default); ``<root>/<key>``;
- ``S3Store`` (``app.services.storage_s3``): S3-compatible object storage, chosen by
  ``DPAAT_ARTIFACTS=s3://bucket/prefix``; reads go through a bounded local cache keyed by sha256.

URIs are relative, so rows in the database do not depend on the backend or on where a process
mounts it. Stored names are generated (never a client's file name) and every write is atomic: a
reader sees the old content or the new, never a partial file (local: temporary file, fsync,
rename; S3: a PUT or a completed multipart upload).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from app.services.errors import Invalid, TooLarge, Unavailable

if TYPE_CHECKING:
    from app.core.settings import Settings

SCHEME = "artifact://"
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9_]{1,16}){0,2}$")
_CHUNK = 1 << 20
TOP_LEVEL = ("blobs", "datasets", "jobs", "tmp")


@dataclass(frozen=True)
class ArtifactRef:
    """Where a stored file is and what it holds."""

    uri: str
    size: int
    sha256: str


class ArtifactMissing(Unavailable):
    """A URI the database names is not in the store (deleted by hand, a lost bucket)."""


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_suffix(suffix: str) -> str:
    if not _SUFFIX.match(suffix):
        raise Invalid(f"bad artifact suffix {suffix!r}")
    return suffix.lower()


def key_of(uri: str) -> str:
    """The store-relative key of a URI; refuses URIs that would leave the store."""
    if not uri.startswith(SCHEME):
        raise Invalid(f"not an artifact URI: {uri!r}")
    rel = uri[len(SCHEME) :]
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("..", ".") for p in parts):
        raise Invalid(f"artifact URI escapes the store: {uri!r}")
    return "/".join(parts)


def uri_of(key: str) -> str:
    return SCHEME + key_of(SCHEME + key)


def new_blob_key(suffix: str) -> str:
    name = uuid.uuid4().hex
    return f"blobs/{name[:2]}/{name}{check_suffix(suffix)}"


class Storage(ABC):
    """What every backend offers. Writes take a key (``jobs/<id>/checkpoint.pt``) or generate
    one (``blobs/...``); reads take a URI and hand back a local file (cached for object storage).
    """

    #: True when the store is a local directory that job folders can live in directly.
    is_local: bool = False

    @abstractmethod
    def check(self) -> None:
        """Raise when the store cannot be used now (the readiness probe): quick, no retries."""

    # ------------------------------------------------------------------ writing
    @abstractmethod
    def put_stream(
        self, stream: BinaryIO, suffix: str = "", max_bytes: int | None = None
    ) -> ArtifactRef:
        """Copy a readable stream into the store; past ``max_bytes``: ``TooLarge``, nothing kept."""

    def put_bytes(self, data: bytes, suffix: str = "") -> ArtifactRef:
        """Store ``data`` under a generated name ending in ``suffix`` (e.g. ``.png``)."""
        return self.put_stream(io.BytesIO(data), suffix)

    def put_file(self, path: str | Path, suffix: str | None = None) -> ArtifactRef:
        """Copy a file into the store under a generated name (its suffix kept unless given)."""
        src = Path(path)
        with src.open("rb") as f:
            return self.put_stream(f, src.suffix if suffix is None else suffix)

    @abstractmethod
    def publish(self, path: str | Path, key: str) -> ArtifactRef:
        """Make the complete local file ``path`` the content of ``key``, atomically (a job's
        checkpoint, report, figure)."""

    @abstractmethod
    def put_text(self, key: str, text: str) -> ArtifactRef:
        """Write ``text`` at ``key`` atomically (e.g. a dataset's split manifest)."""

    @abstractmethod
    def put_tree(self, folder: Path, key: str) -> ArtifactRef:
        """Store a folder (a validated dataset) at ``key``; ``folder`` is consumed."""

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def stat(self, uri: str) -> ArtifactRef | None:
        """Size and sha256 of a stored file; None when absent."""

    def exists(self, uri: str) -> bool:
        return self.stat(uri) is not None

    @abstractmethod
    def local_path(self, uri: str, sha256: str | None = None) -> Path:
        """A local file with the content of ``uri`` (``ArtifactMissing`` when absent). For
        object storage: from the cache, downloaded on a miss and checked against ``sha256``
        (or the digest recorded with the object)."""

    @abstractmethod
    def local_dir(self, uri: str) -> Path:
        """A local folder with the content of a folder stored by :meth:`put_tree`."""

    def read_bytes(self, uri: str) -> bytes:
        return self.local_path(uri).read_bytes()

    @abstractmethod
    def fetch(self, uri: str, dest: Path) -> ArtifactRef | None:
        """Copy ``uri`` to ``dest`` (atomically, digest checked) unless ``dest`` already holds
        it; None when the store has no such file (``dest`` untouched)."""

    # ------------------------------------------------------------------ removing
    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove a file or a folder of the store (missing is fine)."""

    # ------------------------------------------------------------------ local work
    @abstractmethod
    def temp_dir(self) -> Path:
        """A new private local folder for work in progress."""

    @abstractmethod
    def job_dir(self, job_id: str) -> Path:
        """The local folder a job works in: the store's own ``jobs/<id>`` for a directory
        store, local scratch for object storage (the worker publishes what it must keep)."""

    def holding(self) -> AbstractContextManager[None]:
        """A block during which cached files handed out stay on disk (a running job)."""
        return nullcontext()


class ArtifactStore(Storage):
    """Files under ``root``; see the module docstring for the guarantees."""

    is_local = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # The top-level folders exist from the start; only their contents come and go.
        for top in TOP_LEVEL:
            (self.root / top).mkdir(exist_ok=True)
        self.tmp_dir = self.root / "tmp"

    def check(self) -> None:
        # a file written and removed: a full disk or a read-only mount fails here, even as root
        with tempfile.NamedTemporaryFile(dir=self.tmp_dir, prefix="ready-"):
            pass

    # ------------------------------------------------------------------ addressing
    def uri_for(self, path: str | Path) -> str:
        """The URI of a path inside the store (raises ``Invalid`` for a path outside it)."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise Invalid(f"{path} is not inside the artifact store")
        return SCHEME + resolved.relative_to(self.root).as_posix()

    def path(self, uri: str) -> Path:
        """The local path of a URI; refuses URIs that would leave the store."""
        candidate = (self.root / key_of(uri)).resolve()
        if not candidate.is_relative_to(self.root) or candidate == self.root:
            raise Invalid(f"artifact URI escapes the store: {uri!r}")
        return candidate

    def dir_for(self, *parts: str) -> Path:
        """A folder in the store (created), e.g. ``dir_for("jobs", job_id)`` for a job's outputs."""
        for p in parts:
            if not p or p in (".", "..") or "/" in p or "\\" in p:
                raise Invalid(f"bad artifact folder name {p!r}")
        d = self.root.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _atomic(self, target: Path) -> Iterator[BinaryIO]:
        """Write to a temporary file beside ``target``; fsync and rename on success."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_stream(
        self, stream: BinaryIO, suffix: str = "", max_bytes: int | None = None
    ) -> ArtifactRef:
        target = self.path(SCHEME + new_blob_key(suffix))
        try:
            size, digest = self.spool(stream, target, max_bytes)
        except BaseException:
            self._remove_empty_parents(target)
            raise
        return ArtifactRef(self.uri_for(target), size, digest)

    def spool(
        self, stream: BinaryIO, target: Path, max_bytes: int | None = None
    ) -> tuple[int, str]:
        """Copy a stream to ``target`` atomically; returns (size, sha256). ``TooLarge`` past
        ``max_bytes`` (the partial file is removed)."""
        with self._atomic(target) as f:
            return copy_stream(stream, f, max_bytes)

    def publish(self, path: str | Path, key: str) -> ArtifactRef:
        target = self.path(uri_of(key))
        src = Path(path)
        if src.resolve() == target:  # written in place (a job folder of this store)
            return self.ref(target)
        with src.open("rb") as stream, self._atomic(target) as f:
            size, digest = copy_stream(stream, f)
        return ArtifactRef(uri_of(key), size, digest)

    def put_text(self, key: str, text: str) -> ArtifactRef:
        return self.write_text_atomic(self.path(uri_of(key)), text)

    def write_text_atomic(self, path: Path, text: str) -> ArtifactRef:
        """Write ``text`` at a chosen path inside the store (e.g. a dataset's split manifest)."""
        uri = self.uri_for(path)
        data = text.encode()
        with self._atomic(path) as f:
            f.write(data)
        return ArtifactRef(uri, len(data), hashlib.sha256(data).hexdigest())

    def put_tree(self, folder: Path, key: str) -> ArtifactRef:
        target = self.path(uri_of(key))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(target))
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        return ArtifactRef(uri_of(key), size, "")

    def ref(self, path: str | Path) -> ArtifactRef:
        """The reference of a file already inside the store (e.g. a worker's checkpoint)."""
        p = Path(path)
        if not p.is_file():
            raise Invalid(f"{path} is not a file")
        return ArtifactRef(self.uri_for(p), p.stat().st_size, sha256_file(p))

    # ------------------------------------------------------------------ reading
    def stat(self, uri: str) -> ArtifactRef | None:
        p = self.path(uri)
        return self.ref(p) if p.is_file() else None

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def local_path(self, uri: str, sha256: str | None = None) -> Path:
        p = self.path(uri)
        if not p.is_file():
            raise ArtifactMissing("a file is missing from the artifact store")
        return p

    def local_dir(self, uri: str) -> Path:
        p = self.path(uri)
        if not p.is_dir():
            raise ArtifactMissing("a folder is missing from the artifact store")
        return p

    def fetch(self, uri: str, dest: Path) -> ArtifactRef | None:
        src = self.path(uri)
        if not src.is_file():
            return None
        if dest.resolve() != src:
            with src.open("rb") as stream, self._atomic(dest) as f:
                copy_stream(stream, f)
        return self.ref(src)

    # ------------------------------------------------------------------ removing
    def delete(self, uri: str) -> None:
        """Remove a file or folder of the store (missing is fine)."""
        p = self.path(uri)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        self._remove_empty_parents(p)

    def _remove_empty_parents(self, path: Path) -> None:
        """Remove the folders above ``path`` that became empty (up to the store's top level)."""
        for parent in path.parents:
            if parent == self.root or parent.parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty, or already gone
                break

    # ------------------------------------------------------------------ local work
    def temp_dir(self) -> Path:
        """A new private folder for work in progress (same filesystem, so renames are atomic)."""
        return Path(tempfile.mkdtemp(dir=self.tmp_dir))

    def job_dir(self, job_id: str) -> Path:
        return self.dir_for("jobs", job_id)


def copy_stream(stream: BinaryIO, out: BinaryIO, max_bytes: int | None = None) -> tuple[int, str]:
    """Copy ``stream`` to ``out``; returns (size, sha256); ``TooLarge`` past ``max_bytes``."""
    h = hashlib.sha256()
    size = 0
    for block in iter(lambda: stream.read(_CHUNK), b""):
        size += len(block)
        if max_bytes is not None and size > max_bytes:
            raise TooLarge(f"upload exceeds the limit of {max_bytes // (1 << 20)} MB")
        h.update(block)
        out.write(block)
    return size, h.hexdigest()


def open_store(settings: Settings) -> Storage:
    """The store ``settings`` name: ``DPAAT_ARTIFACTS=s3://bucket/prefix``, else the directory
    ``DPAAT_ARTIFACT_DIR``."""
    if settings.artifacts and settings.artifacts.startswith("s3://"):
        from app.services.storage_s3 import S3Store

        return S3Store.from_settings(settings)
    return ArtifactStore(settings.artifact_dir)
