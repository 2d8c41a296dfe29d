"""The artifact store: a directory of files addressed by ``artifact://<relative path>`` URIs.

URIs are relative so the API and the workers can mount the same store at different paths. Stored
names are generated (never a client's file name) and every write is atomic: a temporary file in the
same folder, fsync, then rename, so a crash never leaves a half-written artifact under its name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.services.errors import Invalid, TooLarge

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


class ArtifactStore:
    """Files under ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # The top-level folders exist from the start; only their contents come and go.
        for top in TOP_LEVEL:
            (self.root / top).mkdir(exist_ok=True)
        self.tmp_dir = self.root / "tmp"

    # ------------------------------------------------------------------ addressing
    def uri_for(self, path: str | Path) -> str:
        """The URI of a path inside the store (raises ``Invalid`` for a path outside it)."""
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise Invalid(f"{path} is not inside the artifact store")
        return SCHEME + resolved.relative_to(self.root).as_posix()

    def path(self, uri: str) -> Path:
        """The local path of a URI; refuses URIs that would leave the store."""
        if not uri.startswith(SCHEME):
            raise Invalid(f"not an artifact URI: {uri!r}")
        rel = uri[len(SCHEME) :]
        candidate = (self.root / rel).resolve()
        if not rel or rel.startswith("/") or not candidate.is_relative_to(self.root):
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
    @staticmethod
    def _check_suffix(suffix: str) -> str:
        if not _SUFFIX.match(suffix):
            raise Invalid(f"bad artifact suffix {suffix!r}")
        return suffix.lower()

    def _new_blob_path(self, suffix: str) -> Path:
        name = uuid.uuid4().hex
        folder = self.dir_for("blobs", name[:2])
        return folder / f"{name}{self._check_suffix(suffix)}"

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

    def put_bytes(self, data: bytes, suffix: str = "") -> ArtifactRef:
        """Store ``data`` under a generated name ending in ``suffix`` (e.g. ``.png``)."""
        target = self._new_blob_path(suffix)
        with self._atomic(target) as f:
            f.write(data)
        return ArtifactRef(self.uri_for(target), len(data), hashlib.sha256(data).hexdigest())

    def put_stream(
        self, stream: BinaryIO, suffix: str = "", max_bytes: int | None = None
    ) -> ArtifactRef:
        """Copy a readable stream into the store; past ``max_bytes``: ``TooLarge``, nothing kept."""
        target = self._new_blob_path(suffix)
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
        h = hashlib.sha256()
        size = 0
        with self._atomic(target) as f:
            for block in iter(lambda: stream.read(_CHUNK), b""):
                size += len(block)
                if max_bytes is not None and size > max_bytes:
                    raise TooLarge(f"upload exceeds the limit of {max_bytes // (1 << 20)} MB")
                h.update(block)
                f.write(block)
        return size, h.hexdigest()

    def put_file(self, path: str | Path, suffix: str | None = None) -> ArtifactRef:
        """Copy a file into the store under a generated name (its suffix kept unless given)."""
        src = Path(path)
        with src.open("rb") as f:
            return self.put_stream(f, src.suffix if suffix is None else suffix)

    def write_text_atomic(self, path: Path, text: str) -> ArtifactRef:
        """Write ``text`` at a chosen path inside the store (e.g. a dataset's split manifest)."""
        uri = self.uri_for(path)
        data = text.encode()
        with self._atomic(path) as f:
            f.write(data)
        return ArtifactRef(uri, len(data), hashlib.sha256(data).hexdigest())

    def ref(self, path: str | Path) -> ArtifactRef:
        """The reference of a file already inside the store (e.g. a worker's checkpoint)."""
        p = Path(path)
        if not p.is_file():
            raise Invalid(f"{path} is not a file")
        return ArtifactRef(self.uri_for(p), p.stat().st_size, sha256_file(p))

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

    def temp_dir(self) -> Path:
        """A new private folder for work in progress (same filesystem, so renames are atomic)."""
        return Path(tempfile.mkdtemp(dir=self.tmp_dir))
