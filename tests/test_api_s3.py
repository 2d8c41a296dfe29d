"""Issue 15: the API on S3-compatible storage (a real moto server process): dataset uploads become
ONE archive object plus the manifest, refused uploads store nothing, model weights round-trip
through the bucket with their sha256, another host reads a dataset from its own cache, and deleting
a dataset removes its objects. SQLite and PostgreSQL (test_api's fixtures)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import test_api
from s3_support import S3Server
from test_api import API, SMALL, Api, ham_files, safetensors_bytes, upload_dataset, zip_bytes

from app.core.settings import Settings
from app.db.tables import Dataset
from app.services import datasets, thumbnails
from app.services.storage import open_store
from app.services.storage_s3 import S3Store

database_url = test_api.database_url
make_api = test_api.make_api


def _s3(server: S3Server, bucket: str, host: Path) -> dict[str, object]:
    env = server.env(bucket)
    return {
        "artifacts": env["DPAAT_ARTIFACTS"],
        "s3_endpoint_url": env["DPAAT_S3_ENDPOINT_URL"],
        "s3_region": env["DPAAT_S3_REGION"],
        "s3_access_key_id": env["DPAAT_S3_ACCESS_KEY_ID"],
        "s3_secret_access_key": env["DPAAT_S3_SECRET_ACCESS_KEY"],
        "cache_dir": host / "cache",
        "scratch_dir": host / "scratch",
    }


def test_the_api_keeps_everything_in_the_bucket(
    make_api: Callable[..., Api], s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket()
    api = make_api(**_s3(s3_server, bucket, tmp_path / "api-host"))
    assert isinstance(api.client.app.state.store, S3Store)  # type: ignore[attr-defined]

    # a refused upload stores nothing
    bad = upload_dataset(api, zip_bytes({"labels.csv": b"image_id,dx\nISIC_1,zzz\n"}))
    assert 400 <= bad.status_code < 500, bad.text
    assert s3_server.objects(bucket) == {}

    r = upload_dataset(api, zip_bytes(ham_files()))
    assert r.status_code == 201, r.text
    ds = r.json()
    keys = set(s3_server.objects(bucket))
    assert keys == {
        f"artifacts/datasets/{ds['id']}/data.tar",
        f"artifacts/datasets/{ds['id']}/manifest.json",
    }
    assert not api.settings.artifact_dir.exists()  # no local artifact directory at all
    assert api.client.get("/health/ready").json()["checks"]["storage"] == "ok"

    # another host (an empty cache) reads the same dataset: one download, then warm
    other = open_store(Settings(**_s3(s3_server, bucket, tmp_path / "worker-host")))
    assert isinstance(other, S3Store)
    with api.session() as s:
        row = s.get(Dataset, ds["id"])
        assert row is not None
        root = datasets.dataset_root(row, other)
        assert (root / "labels.csv").is_file() and len(list((root / "images").iterdir())) == 12
        assert datasets.manifest_path(row, other).is_file()
        assert datasets.dataset_root(row, other) == root and other.cache.downloads == 2
        assert sum(thumbnails.split_sizes(row, other).values()) == 12
        assert thumbnails.count(row, other) > 0

    # model weights: in the bucket, served back byte for byte
    weights = safetensors_bytes()
    r = api.client.post(
        f"{API}/models",
        files={"weights": ("w.safetensors", weights, "application/octet-stream")},
        data={"description": json.dumps(SMALL)},
    )
    assert r.status_code == 201, r.text
    model = r.json()
    served = api.client.get(f"{API}/models/{model['id']}/weights")
    assert served.status_code == 200 and served.content == weights
    assert hashlib.sha256(weights).hexdigest() == model["checkpoint_sha256"]
    blobs = [k for k in s3_server.objects(bucket) if k.startswith("artifacts/blobs/")]
    assert len(blobs) == 1 and blobs[0].endswith(".safetensors")

    # deleting the dataset deletes its objects
    assert api.client.delete(f"{API}/datasets/{ds['id']}").status_code == 204
    assert not [k for k in s3_server.objects(bucket) if "/datasets/" in k]


def test_readiness_fails_fast_when_the_bucket_cannot_be_reached(
    make_api: Callable[..., Api], s3_server: S3Server, tmp_path: Path
) -> None:
    """A missing bucket, then a server that is gone: 503 naming the storage, within seconds (the
    probe tries once; the work's client would retry for up to a minute)."""
    settings = _s3(s3_server, "no-such-bucket", tmp_path / "api-host")
    api = make_api(**settings)
    r = api.client.get("/health/ready")
    assert r.status_code == 503 and r.json()["checks"]["database"] == "ok"
    assert r.json()["checks"]["storage"].startswith("error: ClientError"), r.json()

    gone = make_api(**{**settings, "s3_endpoint_url": "http://127.0.0.1:1"})
    started = time.monotonic()
    r = gone.client.get("/health/ready")
    assert r.status_code == 503 and r.json()["checks"]["storage"].startswith("error"), r.json()
    assert time.monotonic() - started < 10
