"""Safe extraction of dataset archives (zip, tar.gz).

Every entry is checked before anything is written: no absolute paths, drive letters or ``..``
components ("zip slip"), no links or device files, no encrypted entries, at most ``max_entries``
entries and ``max_bytes`` uncompressed bytes (counted while writing, so a lying header does not
help a zip bomb). Files are written with fresh permissions; nothing of the archive's metadata is
kept. On any error the caller's destination is left for it to delete.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Generator
from pathlib import Path, PurePosixPath
from typing import IO

from app.services.errors import Invalid, TooLarge, UnsupportedMedia

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
# Metadata that archivers add; skipped, never extracted.
_JUNK_DIRS = {"__MACOSX"}
_Entries = Generator[tuple[str, str, IO[bytes] | None], None, None]


def archive_kind(path: Path) -> str:
    """``zip`` or ``tar.gz`` from the file's first bytes (never from its name)."""
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    raise UnsupportedMedia("the dataset must be a .zip or .tar.gz archive")


def safe_parts(name: str) -> tuple[str, ...] | None:
    """The path components of an entry name, or None for junk to skip; ``Invalid`` when unsafe."""
    if "\x00" in name:
        raise Invalid(f"archive entry {name!r} has a NUL byte in its name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise Invalid(f"archive entry {name!r} is an absolute path")
    parts = tuple(p for p in PurePosixPath(norm).parts if p not in ("", "."))
    if ".." in parts:
        raise Invalid(f"archive entry {name!r} escapes the archive root ('..')")
    if not parts or parts[0] in _JUNK_DIRS or any(p.startswith("._") for p in parts):
        return None
    return parts


class _Budget:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries = 0
        self.bytes = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise TooLarge(f"the archive has more than {self.max_entries} entries")

    def copy(self, src: IO[bytes], dst: Path) -> None:
        with dst.open("xb") as out:
            for block in iter(lambda: src.read(_CHUNK), b""):
                self.bytes += len(block)
                if self.bytes > self.max_bytes:
                    raise TooLarge(
                        f"the archive expands to more than {self.max_bytes // (1 << 20)} MB"
                    )
                out.write(block)


def _target(dest: Path, parts: tuple[str, ...], name: str) -> Path:
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise Invalid(f"archive entry {name!r} escapes the archive root")
    return target


def _zip_entries(path: Path) -> _Entries:
    """(name, 'file'|'dir', stream) for each entry of a zip; rejects links and encryption."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise Invalid(f"archive entry {info.filename!r} is a symbolic link")
            if info.flag_bits & 0x1:
                raise Invalid(f"archive entry {info.filename!r} is encrypted")
            if info.is_dir():
                yield info.filename, "dir", None
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a plain file
                raise Invalid(f"archive entry {info.filename!r} is not a regular file")
            with zf.open(info) as stream:
                yield info.filename, "file", stream


def _tar_entries(path: Path) -> _Entries:
    """(name, 'file'|'dir', stream) for each member of a tar.gz, read in one streaming pass."""
    with tarfile.open(path, mode="r|gz") as tf:
        for member in tf:
            if member.isdir():
                yield member.name, "dir", None
            elif member.isfile():
                stream = tf.extractfile(member)
                if stream is None:
                    raise Invalid(f"archive entry {member.name!r} cannot be read")
                yield member.name, "file", stream
            elif member.issym() or member.islnk():
                raise Invalid(f"archive entry {member.name!r} is a link")
            else:
                raise Invalid(f"archive entry {member.name!r} is not a regular file")


def safe_extract(archive: Path, dest: Path, *, max_entries: int, max_bytes: int) -> int:
    """Extract ``archive`` (zip or tar.gz) into the empty folder ``dest``; returns bytes written."""
    kind = archive_kind(archive)
    entries = _zip_entries(archive) if kind == "zip" else _tar_entries(archive)
    budget = _Budget(max_entries, max_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for name, entry_kind, stream in entries:
            budget.entry()
            parts = safe_parts(name)
            if parts is None:
                continue
            target = _target(dest, parts, name)
            if entry_kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            assert stream is not None
            budget.copy(stream, target)
    except FileExistsError as e:
        raise Invalid(f"archive entry {Path(str(e.filename)).name!r} appears twice") from e
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise Invalid(f"the archive is damaged or truncated: {e}") from e
    finally:
        entries.close()
    return budget.bytes


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name not in _JUNK_DIRS


def dataset_root(extracted: Path, max_depth: int = 8) -> Path:
    """The folder holding the dataset: archives often wrap everything in one or more top folders
    (and macOS adds ``__MACOSX``). A single labels file anywhere marks its folder; otherwise
    single wrapping folders are unwrapped down to the class folders."""
    from models.formats import LABEL_FILES  # only on an upload: the web process starts without it

    labels = [
        p
        for name in LABEL_FILES
        for p in extracted.rglob(name)
        if p.is_file() and all(_visible(Path(part)) for part in p.relative_to(extracted).parts)
    ]
    folders = {p.parent for p in labels}
    if len(folders) == 1:
        return folders.pop()
    root = extracted
    for _ in range(max_depth):
        children = [c for c in root.iterdir() if _visible(c)]
        labelled = any((root / n).is_file() for n in LABEL_FILES)
        if labelled or len(children) != 1 or not children[0].is_dir():
            break
        inner = children[0]
        # A single folder of images is one class, not a wrapper: stop when it has no subfolders
        # and no labels file (the layout check then reports the problem).
        if not any(c.is_dir() and _visible(c) for c in inner.iterdir()):
            break
        root = inner
    return root


def remove_tree(path: Path) -> None:
    """Delete a folder, ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)
