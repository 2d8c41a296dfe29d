"""A bounded local cache of artifacts read from object storage, keyed by sha256.

Entries are ``<root>/<sha256>`` (a file) or ``<root>/<sha256>.d`` (an extracted dataset archive).
The key is the content, so an entry never goes stale: a resumed job or a warm model finds its
bytes here and downloads nothing. Every entry arrives by rename from a temporary name in the same
folder after its digest was checked, so a reader never sees a partial entry, and several worker
processes on one host can share the folder.

Least recently used entries (by mtime, touched on every use) are evicted once the cache holds more
than ``max_bytes``; the entry just added always stays. Inside :meth:`ArtifactCache.holding` (a
running job) every entry handed out is pinned with a shared ``flock`` on ``<entry>.lock``, and
eviction skips pinned entries: a dataset a job is reading from is never removed under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from app.services.errors import Invalid

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _check_sha(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise Invalid(f"not a sha256 digest: {sha256[:80]!r}")
    return sha256


class ArtifactCache:
    """See the module docstring."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._local = threading.local()  # the pins of the holding() block of this thread
        self.downloads = 0  # entries fetched by this process (a warm read fetches none)

    # ------------------------------------------------------------------ pins
    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Pin every entry handed out in this block (this thread) until the block ends."""
        outer = getattr(self._local, "pins", None)
        self._local.pins = outer if outer is not None else {}
        try:
            yield
        finally:
            if outer is None:
                for fd in self._local.pins.values():
                    os.close(fd)  # closing releases the flock
                self._local.pins = None

    def _pin(self, entry: Path) -> None:
        pins: dict[Path, int] | None = getattr(self._local, "pins", None)
        if pins is None or entry in pins:
            return
        fd = os.open(entry.with_name(entry.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        pins[entry] = fd

    # ------------------------------------------------------------------ lookup
    def _entry(self, sha256: str, tree: bool) -> Path:
        return self.root / (_check_sha(sha256) + (".d" if tree else ""))

    def get(self, sha256: str, tree: bool = False) -> Path | None:
        """The cached file (or folder) of this digest, pinned and touched; None when absent."""
        entry = self._entry(sha256, tree)
        self._pin(entry)
        if not entry.exists():
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile: the caller sees it missing
            os.utime(entry)
        return entry if entry.exists() else None

    def fetch(
        self, sha256: str | None, download: Callable[[Path], None], tree: bool = False
    ) -> Path:
        """The entry of ``sha256``, calling ``download(tmp_file)`` on a miss. The downloaded
        bytes must have the digest (``Invalid`` otherwise; nothing is kept). ``sha256=None``
        (an object without a recorded digest) caches by the digest of what was downloaded.
        ``tree``: the download is an uncompressed tar archive, kept extracted."""
        if sha256 is not None and (hit := self.get(sha256, tree)) is not None:
            return hit
        fd, name = tempfile.mkstemp(dir=self.root, prefix=".dl-")
        os.close(fd)
        tmp = Path(name)
        try:
            download(tmp)
            got = file_sha256(tmp)
            if sha256 is not None and got != sha256:
                raise Invalid(
                    f"downloaded artifact has sha256 {got[:12]}..., expected {sha256[:12]}...: "
                    "corrupt or changed in storage"
                )
            self.downloads += 1
            if tree:
                return self._add_tree_from_tar(got, tmp)
            return self.add_file(got, tmp, move=True)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ adding
    def add_file(self, sha256: str, src: Path, move: bool = False) -> Path:
        """Put a file whose digest is known into the cache (moved, or hard-linked when
        ``move`` is False: no copy; skipped across filesystems) and return its entry."""
        entry = self._entry(sha256, False)
        self._pin(entry)
        if not entry.exists():
            tmp = self.root / f".add-{os.getpid()}-{threading.get_ident()}-{sha256[:16]}"
            try:
                if move:
                    shutil.move(str(src), tmp)
                else:
                    os.link(src, tmp)
                os.replace(tmp, entry)
            except OSError as e:
                log.debug("not cached %s: %s", src, e)
                tmp.unlink(missing_ok=True)
                return src
        self._evict(keep=entry)
        return entry

    def add_tree(self, sha256: str, folder: Path) -> Path:
        """Move an extracted folder (the content of archive ``sha256``) into the cache."""
        entry = self._entry(sha256, True)
        self._pin(entry)
        if entry.exists():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            try:
                os.rename(folder, entry)  # atomic; fails if another process won the race
            except OSError:
                if not entry.exists():  # another filesystem: copy in under a temporary name
                    tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".add-"))
                    shutil.copytree(folder, tmp, dirs_exist_ok=True)
                    os.rename(tmp, entry)
                shutil.rmtree(folder, ignore_errors=True)
        self._evict(keep=entry)
        return entry

    def _add_tree_from_tar(self, sha256: str, tar_path: Path) -> Path:
        import tarfile

        folder = Path(tempfile.mkdtemp(dir=self.root, prefix=".x-"))
        try:
            with tarfile.open(tar_path, "r:") as tf:
                tf.extractall(folder, filter="data")  # our own archive; still no escapes
            return self.add_tree(sha256, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ eviction
    def size(self) -> int:
        return sum(_size(e) for e in self._entries())

    def _entries(self) -> list[Path]:
        return [
            p for p in self.root.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"
        ]

    def _evict(self, keep: Path) -> None:
        entries = []
        for p in self._entries():
            with contextlib.suppress(OSError):
                entries.append((p.stat().st_mtime, _size(p), p))
        total = sum(n for _, n, _ in entries)
        for _, n, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p != keep and self._remove_unpinned(p):
                total -= n

    def _remove_unpinned(self, entry: Path) -> bool:
        lock = entry.with_name(entry.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a job holds it
            # Renamed away first, so no reader finds a half-deleted folder under its name.
            gone = self.root / f".del-{os.getpid()}-{entry.name}"
            try:
                os.rename(entry, gone)
            except OSError:
                return False
            if gone.is_dir():
                shutil.rmtree(gone, ignore_errors=True)
            else:
                gone.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)
