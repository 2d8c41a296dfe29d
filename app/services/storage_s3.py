"""The artifact store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW...), with boto3.

Keys are ``<prefix>/<artifact key>`` in one bucket. Every object carries its sha256 in its
metadata (``x-amz-meta-sha256``), so a reader knows which cache entry holds it from a HEAD request
and checks every download against it. A write is one PUT, or a multipart upload that S3 makes
visible only when it is completed: an interrupted upload leaves the previous object (or none),
never a partial one. A folder (a dataset) is stored as ONE uncompressed tar object
``<key>.tar`` and extracted into the cache where it is read (docs/decisions/storage.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from app.services.artifact_cache import ArtifactCache
from app.services.errors import Invalid, Unavailable
from app.services.storage import (
    ArtifactMissing,
    ArtifactRef,
    Storage,
    copy_stream,
    key_of,
    new_blob_key,
    sha256_file,
    uri_of,
)

if TYPE_CHECKING:
    from app.core.settings import Settings

log = logging.getLogger(__name__)
TREE_SUFFIX = ".tar"
_META = "sha256"


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise Invalid(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


class S3Store(Storage):
    """See the module docstring. ``client`` is a boto3 S3 client."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        cache: ArtifactCache,
        scratch: Path,
        probe: Any | None = None,
    ) -> None:
        self.client = client
        self.probe = probe or client  # the readiness probe's client: one try, short timeouts
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = cache
        self.scratch = Path(scratch).expanduser().resolve()
        (self.scratch / "tmp").mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        import boto3
        from botocore.config import Config

        assert settings.artifacts is not None
        bucket, prefix = parse_url(settings.artifacts)
        secret = settings.s3_secret_access_key

        def client(attempts: int, connect_timeout: float, read_timeout: float) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=settings.s3_endpoint_url,
                region_name=settings.s3_region,
                aws_access_key_id=settings.s3_access_key_id,
                aws_secret_access_key=secret.get_secret_value() if secret else None,
                # Path-style addressing works with every S3-compatible server (MinIO, moto)
                config=Config(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": attempts, "mode": "standard"},
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                ),
            )

        cache = ArtifactCache(settings.cache_dir, settings.cache_max_mb << 20)
        # the work rides out a restarting server with a few retries; the readiness probe must
        # answer within a load balancer's timeout, so it tries once
        return cls(
            client(5, 10, 60), bucket, prefix, cache, settings.scratch_dir, probe=client(1, 2, 5)
        )

    def check(self) -> None:
        self.probe.head_bucket(Bucket=self.bucket)

    # ------------------------------------------------------------------ addressing
    def _key(self, uri: str) -> str:
        key = key_of(uri)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception) -> Unavailable:
        log.warning("object storage error: %s", e)
        return Unavailable("the artifact store (object storage) is unavailable; try again later")

    # ------------------------------------------------------------------ writing
    def _upload(
        self, path: Path, key: str, sha256: str, callback: Callable[[int], None] | None = None
    ) -> None:
        """One object from a complete local file: a PUT, or a multipart upload completed only
        when every part arrived (boto3 aborts it on an error)."""
        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"Metadata": {_META: sha256}},
                Callback=callback,
            )
        except Exception as e:
            if isinstance(e, (Invalid, Unavailable)) or not _is_boto_error(e):
                raise
            raise self._error(e) from e

    def put_stream(
        self, stream: BinaryIO, suffix: str = "", max_bytes: int | None = None
    ) -> ArtifactRef:
        key = new_blob_key(suffix)
        fd, name = tempfile.mkstemp(dir=self.scratch / "tmp", prefix=".up-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:  # spooled: the digest and size come before the PUT
                size, digest = copy_stream(stream, f, max_bytes)
            self._upload(tmp, self._key(uri_of(key)), digest)
            self.cache.add_file(digest, tmp, move=True)  # the next read downloads nothing
        finally:
            tmp.unlink(missing_ok=True)
        return ArtifactRef(uri_of(key), size, digest)

    def publish(
        self, path: str | Path, key: str, callback: Callable[[int], None] | None = None
    ) -> ArtifactRef:
        uri, src = uri_of(key), Path(path)  # the key is checked before anything is read
        digest = sha256_file(src)
        ref = ArtifactRef(uri, src.stat().st_size, digest)
        current = self.stat(ref.uri)
        if current is None or current.sha256 != digest:
            self._upload(src, self._key(ref.uri), digest, callback)
        return ref

    def put_text(self, key: str, text: str) -> ArtifactRef:
        import hashlib

        data = text.encode()
        digest = hashlib.sha256(data).hexdigest()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(uri_of(key)), Body=data, Metadata={_META: digest}
            )
        except Exception as e:
            raise self._error(e) from e
        return ArtifactRef(uri_of(key), len(data), digest)

    def put_tree(self, folder: Path, key: str) -> ArtifactRef:
        fd, name = tempfile.mkstemp(dir=self.scratch / "tmp", prefix=".tree-")
        os.close(fd)
        tar_path = Path(name)
        try:
            # Uncompressed (images are JPEG/PNG already); sorted, with neutral metadata, so the
            # same folder always makes the same archive.
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
                for p in sorted(folder.rglob("*")):
                    info = tf.gettarinfo(str(p), arcname=p.relative_to(folder).as_posix())
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0
                    info.mode = 0o755 if p.is_dir() else 0o644
                    if p.is_file():
                        with p.open("rb") as f:
                            tf.addfile(info, f)
                    elif p.is_dir():
                        tf.addfile(info)
            digest = sha256_file(tar_path)
            size = tar_path.stat().st_size
            self._upload(tar_path, self._key(uri_of(key)) + TREE_SUFFIX, digest)
        finally:
            tar_path.unlink(missing_ok=True)
        self.cache.add_tree(digest, folder)  # the host that uploaded reads it without a download
        return ArtifactRef(uri_of(key), size, digest)

    # ------------------------------------------------------------------ reading
    def _head(self, key: str) -> ArtifactRef | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if _not_found(e):
                return None
            raise self._error(e) from e
        return ArtifactRef(key, int(head["ContentLength"]), head.get("Metadata", {}).get(_META, ""))

    def stat(self, uri: str) -> ArtifactRef | None:
        found = self._head(self._key(uri))
        return None if found is None else ArtifactRef(uri, found.size, found.sha256)

    def exists(self, uri: str) -> bool:
        key = self._key(uri)
        return self._head(key) is not None or self._head(key + TREE_SUFFIX) is not None

    def _download(self, key: str) -> Callable[[Path], None]:
        def download(tmp: Path) -> None:
            try:
                self.client.download_file(self.bucket, key, str(tmp))
            except Exception as e:
                if _not_found(e):
                    raise ArtifactMissing("a file is missing from the artifact store") from e
                raise self._error(e) from e

        return download

    def local_path(self, uri: str, sha256: str | None = None) -> Path:
        key = self._key(uri)
        if sha256 and (hit := self.cache.get(sha256)) is not None:
            return hit  # warm: not even a HEAD request
        found = self._head(key)
        if found is None:
            raise ArtifactMissing("a file is missing from the artifact store")
        expected = sha256 or found.sha256 or None
        return self.cache.fetch(expected, self._download(key))

    def local_dir(self, uri: str) -> Path:
        key = self._key(uri) + TREE_SUFFIX
        found = self._head(key)
        if found is None:
            raise ArtifactMissing("a folder is missing from the artifact store")
        return self.cache.fetch(found.sha256 or None, self._download(key), tree=True)

    def read_bytes(self, uri: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(uri))["Body"]
            return bytes(body.read())
        except Exception as e:
            if _not_found(e):
                raise ArtifactMissing("a file is missing from the artifact store") from e
            raise self._error(e) from e

    def fetch(self, uri: str, dest: Path) -> ArtifactRef | None:
        found = self.stat(uri)
        if found is None:
            return None
        if dest.is_file() and found.sha256 and sha256_file(dest) == found.sha256:
            return found  # this host wrote it, or fetched it before
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.dl")
        try:
            self._download(self._key(uri))(tmp)
            got = sha256_file(tmp)
            if found.sha256 and got != found.sha256:
                raise Invalid(f"{uri}: downloaded content does not match its sha256")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return ArtifactRef(uri, found.size, got)

    # ------------------------------------------------------------------ removing
    def delete(self, uri: str) -> None:
        key = self._key(uri)
        try:
            keys = [key, key + TREE_SUFFIX]
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=key + "/"
            )
            keys += [o["Key"] for page in pages for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )
        except Exception as e:
            raise self._error(e) from e

    def keys(self) -> list[str]:
        """Every artifact key in the bucket under this store's prefix (tests, audits)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""
        )
        skip = len(self.prefix) + 1 if self.prefix else 0
        return [o["Key"][skip:] for page in pages for o in page.get("Contents", [])]

    # ------------------------------------------------------------------ local work
    def temp_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.scratch / "tmp"))

    def job_dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id in (".", ".."):
            raise Invalid(f"bad job id {job_id!r}")
        d = self.scratch / "jobs" / job_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def remove_job_dir(self, job_id: str) -> None:
        shutil.rmtree(self.scratch / "jobs" / job_id, ignore_errors=True)

    def holding(self) -> AbstractContextManager[None]:
        return self.cache.holding()


def _is_boto_error(e: Exception) -> bool:
    return type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer")


def _not_found(e: Exception) -> bool:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")
