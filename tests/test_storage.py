"""Issue 15: the artifact store's contract, run against both backends (a local directory and
S3-compatible object storage on a real moto server process), the bounded sha256-keyed read cache,
and an interrupted upload that must never leave a half checkpoint a resume would read."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_support import S3Server

from app.core.settings import Settings
from app.services.artifact_cache import ArtifactCache
from app.services.errors import Invalid, TooLarge
from app.services.storage import (
    SCHEME,
    ArtifactMissing,
    ArtifactStore,
    Storage,
    open_store,
    sha256_file,
)
from app.services.storage_s3 import S3Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield ArtifactStore(tmp_path / "artifacts")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    store = open_store(server.settings(server.new_bucket(), tmp_path))
    assert isinstance(store, S3Store)
    yield store


def _leftovers(store: Storage) -> list[str]:
    """Temporary files left behind (partial uploads, spools)."""
    roots = [store.root] if isinstance(store, ArtifactStore) else [store.scratch, store.cache.root]
    return [
        str(p)
        for r in roots
        for p in r.rglob("*")
        if p.is_file() and p.name.startswith((".tmp-", ".up-", ".dl-", ".tree-"))
    ]


# ============================================================================ contract
def test_put_get_stream_and_ref(store: Storage) -> None:
    ref = store.put_bytes(b"hello", ".txt")
    assert ref.uri.startswith(SCHEME + "blobs/") and ref.uri.endswith(".txt")
    assert ref.size == 5 and ref.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert store.read_bytes(ref.uri) == b"hello"
    assert store.local_path(ref.uri).read_bytes() == b"hello"
    assert store.stat(ref.uri) == ref and store.exists(ref.uri)
    data = os.urandom(3 << 20)  # several chunks
    big = store.put_stream(io.BytesIO(data), ".bin")
    assert big.sha256 == hashlib.sha256(data).hexdigest() and big.size == len(data)
    assert sha256_file(store.local_path(big.uri, big.sha256)) == big.sha256
    copy = store.put_file(store.local_path(ref.uri))
    assert copy.uri != ref.uri and copy.sha256 == ref.sha256


def test_publish_text_and_fetch(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "checkpoint.pt"
    src.write_bytes(b"epoch 1")
    ref = store.publish(src, "jobs/j1/checkpoint.pt")
    assert ref.uri == SCHEME + "jobs/j1/checkpoint.pt" and store.stat(ref.uri) == ref
    src.write_bytes(b"epoch 2")
    ref2 = store.publish(src, "jobs/j1/checkpoint.pt")  # overwritten whole
    assert store.read_bytes(ref2.uri) == b"epoch 2" and ref2.sha256 != ref.sha256
    dest = tmp_path / "elsewhere" / "checkpoint.pt"
    assert store.fetch(ref2.uri, dest) == ref2 and dest.read_bytes() == b"epoch 2"
    assert store.fetch(SCHEME + "jobs/j1/absent.pt", tmp_path / "x") is None
    assert not (tmp_path / "x").exists()
    text = store.put_text("datasets/d1/manifest.json", '{"parts": {}}')
    assert store.read_bytes(text.uri) == b'{"parts": {}}'
    assert text.sha256 == hashlib.sha256(b'{"parts": {}}').hexdigest()


def test_tree_roundtrip_and_delete(store: Storage, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "mel").mkdir(parents=True)
    (folder / "mel" / "a.jpg").write_bytes(b"\xff\xd8\xffjpeg")
    (folder / "labels.csv").write_text("image_id,dx\n")
    ref = store.put_tree(folder, "datasets/d1/data")
    assert not folder.exists()  # consumed
    local = store.local_dir(ref.uri)
    assert (local / "mel" / "a.jpg").read_bytes() == b"\xff\xd8\xffjpeg"
    assert (local / "labels.csv").read_text() == "image_id,dx\n"
    store.put_text("datasets/d1/manifest.json", "{}")
    store.delete(SCHEME + "datasets/d1")
    assert not store.exists(SCHEME + "datasets/d1/manifest.json")
    assert not store.exists(ref.uri)
    store.delete(SCHEME + "datasets/never-there")  # missing is fine


def test_missing_and_escapes_are_refused(store: Storage, tmp_path: Path) -> None:
    with pytest.raises(ArtifactMissing):
        store.local_path(SCHEME + "blobs/00/none.bin")
    with pytest.raises(ArtifactMissing):
        store.local_dir(SCHEME + "datasets/none/data")
    for uri in (
        SCHEME + "../evil",
        SCHEME + "blobs/../../evil",
        SCHEME + "/etc/passwd",
        SCHEME,
        "file:///etc/passwd",
    ):
        with pytest.raises(Invalid):
            store.local_path(uri)
        with pytest.raises(Invalid):
            store.delete(uri)
    with pytest.raises(Invalid):
        store.put_bytes(b"x", "/../../evil")
    with pytest.raises(Invalid):
        store.publish(tmp_path / "nothing", "../outside")


def test_too_large_keeps_nothing(store: Storage) -> None:
    with pytest.raises(TooLarge):
        store.put_stream(io.BytesIO(b"x" * 4096), ".bin", max_bytes=1024)
    assert not _leftovers(store)
    if isinstance(store, S3Store):
        assert store.keys() == []
    else:
        assert not [p for p in (store.root / "blobs").rglob("*") if p.is_file()]


def test_job_dir_is_local(store: Storage) -> None:
    d = store.job_dir("job1")
    assert d.is_dir() and d.name == "job1"
    (d / "checkpoint.pt").write_bytes(b"x")
    ref = store.publish(d / "checkpoint.pt", "jobs/job1/checkpoint.pt")
    assert store.read_bytes(ref.uri) == b"x"
    with pytest.raises(Invalid):
        store.job_dir("..")


# ============================================================================ S3 specifics
def test_s3_reads_are_cached_by_sha256_and_verified(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    writer = open_store(s3_server.settings(bucket, tmp_path / "a"))
    reader = open_store(s3_server.settings(bucket, tmp_path / "b"))  # another host
    assert isinstance(reader, S3Store)
    ref = writer.put_bytes(os.urandom(1 << 20), ".pt")
    first = reader.local_path(ref.uri, ref.sha256)
    assert reader.cache.downloads == 1 and first.parent == reader.cache.root
    assert reader.local_path(ref.uri, ref.sha256) == first  # warm: no download
    assert reader.local_path(ref.uri) == first  # digest from the object's metadata
    assert reader.cache.downloads == 1
    # an object whose bytes do not match what the database recorded is refused, not cached
    s3_server.client().put_object(
        Bucket=bucket, Key="artifacts/blobs/xx/bad.pt", Body=b"tampered", Metadata={}
    )
    with pytest.raises(Invalid, match="sha256"):
        reader.local_path(SCHEME + "blobs/xx/bad.pt", "0" * 64)
    assert not list(reader.cache.root.glob("0000*"))


def test_cache_is_bounded_lru_and_spares_pinned_entries(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache", max_bytes=3000)

    def add(data: bytes) -> tuple[str, Path]:
        src = tmp_path / "src"
        src.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        return sha, cache.add_file(sha, src, move=True)

    def present(sha: str) -> bool:  # without touching it (get() would)
        return (cache.root / sha).is_file()

    a, _ = add(b"a" * 1000)
    time.sleep(0.01)
    b, _ = add(b"b" * 1000)
    time.sleep(0.01)
    assert cache.get(a) is not None  # touched: b is now the least recently used
    time.sleep(0.01)
    with cache.holding():  # a job reading b: pinned until the block ends
        assert cache.get(b) is not None
        c, _ = add(b"c" * 1500)  # 3500 > 3000: b is pinned, so a goes
        assert [present(x) for x in (a, b, c)] == [False, True, True]
    time.sleep(0.01)
    d, _ = add(b"d" * 1000)  # b is free again and the least recently used
    assert [present(x) for x in (b, c, d)] == [False, True, True]
    assert cache.size() <= 3000


def test_s3_settings_accept_the_standard_aws_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPAAT_ARTIFACTS", "s3://bucket-1/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-value")
    s = Settings()
    assert s.object_storage and s.s3_endpoint_url == "http://minio:9000"
    assert s.s3_region == "eu-west-1" and s.s3_access_key_id == "id"
    assert s.s3_secret_access_key is not None
    assert s.s3_secret_access_key.get_secret_value() == "hunter2-value"
    assert "hunter2-value" not in repr(s)
    with pytest.raises(ValueError):
        Settings(artifacts="s3://")
    with pytest.raises(ValueError, match="absolute"):
        Settings(environment="production", artifacts="s3://bucket-1/x", cache_dir="rel")


# ============================================================================ interrupted uploads
def test_an_upload_that_fails_midway_leaves_the_previous_checkpoint(
    s3_server: S3Server, tmp_path: Path
) -> None:
    store = open_store(s3_server.settings(s3_server.new_bucket(), tmp_path))
    assert isinstance(store, S3Store)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(os.urandom(1 << 20))
    good = store.publish(ckpt, "jobs/j/checkpoint.pt")
    ckpt.write_bytes(os.urandom(20 << 20))  # multipart (> 8 MB): several parts

    sent = [0]

    def fail_midway(n: int) -> None:
        sent[0] += n
        if sent[0] > 9 << 20:
            raise RuntimeError("network gone")

    with pytest.raises(Exception, match="network gone"):
        store.publish(ckpt, "jobs/j/checkpoint.pt", callback=fail_midway)
    assert sent[0] > 9 << 20  # it did fail in the middle
    assert store.stat(good.uri) == good  # the previous, complete checkpoint
    resumed = tmp_path / "host-b" / "checkpoint.pt"
    assert store.fetch(good.uri, resumed) == good and sha256_file(resumed) == good.sha256


_KILLED_UPLOADER = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from app.core.settings import Settings
    from app.services.storage import open_store
    store = open_store(Settings(**{settings!r}))
    sent, lock = [0, False], threading.Lock()
    def slow(n):  # called from boto3's upload threads
        with lock:
            sent[0] += n
            first = sent[0] > (6 << 20) and not sent[1]
            sent[1] = sent[1] or first
        if first:
            print("MIDWAY", flush=True)
        if sent[1]:
            time.sleep(60)
    store.publish(Path({path!r}), "jobs/k/checkpoint.pt", callback=slow)
    """
)


def test_a_worker_killed_midupload_leaves_no_half_checkpoint(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket()
    settings = s3_server.settings(bucket, tmp_path)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(os.urandom(24 << 20))
    fields = {
        k: (v.get_secret_value() if hasattr(v, "get_secret_value") else str(v))
        for k, v in settings.model_dump().items()
        if k.startswith(("artifacts", "s3_", "cache_dir", "scratch_dir"))
    }
    script = _KILLED_UPLOADER.format(tests=str(ROOT / "tests"), settings=fields, path=str(ckpt))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"MIDWAY"  # parts are on the server, not completed
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = open_store(settings)
    assert store.stat(SCHEME + "jobs/k/checkpoint.pt") is None  # invisible: a resume starts over
    assert store.fetch(SCHEME + "jobs/k/checkpoint.pt", tmp_path / "resume.pt") is None
    assert "artifacts/jobs/k/checkpoint.pt" not in s3_server.objects(bucket)


# ============================================================================ a job's files
def test_job_files_move_a_run_between_hosts(s3_server: S3Server, tmp_path: Path) -> None:
    from worker.job_files import RESUME_FILES, JobFiles

    bucket = s3_server.new_bucket()
    host_a = open_store(s3_server.settings(bucket, tmp_path / "a"))
    host_b = open_store(s3_server.settings(bucket, tmp_path / "b"))
    on_a = JobFiles(host_a, "job1", host_a.job_dir("job1"))
    for name in RESUME_FILES:
        (on_a.folder / name).write_bytes(os.urandom(1000))
    on_a.save()
    on_b = JobFiles(host_b, "job1", host_b.job_dir("job1"))
    assert on_b.folder != on_a.folder and on_b.restore()
    for name in RESUME_FILES:
        assert (on_b.folder / name).read_bytes() == (on_a.folder / name).read_bytes(), name
    # the same host resumes without downloading (the local copies match the objects)
    before = {n: (on_a.folder / n).stat().st_mtime_ns for n in RESUME_FILES}
    assert on_a.restore()
    assert {n: (on_a.folder / n).stat().st_mtime_ns for n in RESUME_FILES} == before
    # a job with nothing in the store starts fresh: leftovers of a dead attempt are dropped
    fresh = JobFiles(host_b, "job2", host_b.job_dir("job2"))
    for name in RESUME_FILES:
        (fresh.folder / name).write_bytes(b"stale")
    assert not fresh.restore()
    assert not any((fresh.folder / n).exists() for n in RESUME_FILES)
    fresh.discard_local()
    assert not fresh.folder.exists()


def test_job_files_are_the_store_itself_for_a_directory(tmp_path: Path) -> None:
    from worker.job_files import JobFiles

    store = ArtifactStore(tmp_path / "artifacts")
    files = JobFiles(store, "job1", store.job_dir("job1"))
    assert files.folder == store.root / "jobs" / "job1" and not files.restore()
    (files.folder / "checkpoint.pt").write_bytes(b"x")
    files.save()  # nothing to do: already in the store
    assert files.restore() and store.read_bytes(SCHEME + "jobs/job1/checkpoint.pt") == b"x"
    files.discard_local()  # never deletes the store's own folder
    assert files.folder.is_dir()
