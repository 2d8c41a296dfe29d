"""The HTTP contract of every endpoint, through the ASGI app, on SQLite and on the real Postgres.

The dispatcher is replaced by a recorder: these tests assert that a job is sent, not that it runs
(the worker's full-stack tests run it). Bad input must give a clear 4xx and leave stored data as
it was: ``stored_state`` compares table row counts and the files of the artifact store.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app.core.settings import Settings, default_data_roots
from app.db.migrate import upgrade
from app.db.session import make_engine
from app.db.tables import Base, Job
from app.db.testing import fresh_postgres_database, truncate_all
from app.main import create_app
from app.services import jobs, models_registry
from app.services.storage import ArtifactStore

API = "/api/v1"
OTHER = {"X-API-Key": "someone-else"}


# ============================================================================ fixtures
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('api') / 'api.db'}"
        upgrade(url)
        yield url
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        upgrade(url)
        yield url


@dataclass
class Api:
    client: TestClient
    settings: Settings
    sent: list[tuple[str, str]] = field(default_factory=list)

    @property
    def store(self) -> ArtifactStore:
        store: ArtifactStore = self.client.app.state.store  # type: ignore[attr-defined]
        return store

    def session(self) -> Session:
        session: Session = self.client.app.state.sessionmaker()  # type: ignore[attr-defined]
        return session

    def stored_state(self) -> tuple[dict[str, int], set[str]]:
        """Row counts of every table and every file of the artifact store."""
        with self.session() as s:
            counts = {
                t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables
            }
        files = {str(p.relative_to(self.store.root)) for p in self.store.root.rglob("*")}
        return counts, files


@pytest.fixture
def make_api(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    clients: list[TestClient] = []
    data_root = tmp_path / "server-data"
    data_root.mkdir()
    engine = make_engine(database_url)
    truncate_all(engine)
    engine.dispose()

    def build(**overrides: Any) -> Api:
        values: dict[str, Any] = {
            "database_url": database_url,
            "artifact_dir": tmp_path / f"artifacts{len(clients)}",
            "data_roots": [data_root],
            "sse_poll_seconds": 0.02,
            "predict_steps": 2,
            # Keys and scopes are tested in test_auth.py; here OTHER's header is another owner.
            "auth": "off",
        }
        values.update(overrides)
        settings = Settings(**values)
        api = Api(TestClient(create_app(settings)), settings)
        api.client.app.state.dispatcher = lambda job_id, kind: api.sent.append((job_id, kind))  # type: ignore[attr-defined]
        api.client.__enter__()
        clients.append(api.client)
        return api

    yield build
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


# ============================================================================ builders
def image_bytes(
    fmt: str = "JPEG", size: int = 32, colour: tuple[int, int, int] = (200, 80, 60)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def targz_bytes(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def ham_files(
    per_class: int = 4, classes: tuple[str, ...] = ("akiec", "bcc", "nv")
) -> dict[str, bytes]:
    """A tiny dataset in the HAM10000 layout: labels.csv, images/, masks/."""
    rows = ["image_id,dx,lesion_id"]
    files: dict[str, bytes] = {}
    for c, dx in enumerate(classes):
        for i in range(per_class):
            image_id = f"ISIC_{c:02d}{i:05d}"
            rows.append(f"{image_id},{dx},HAM_{c:02d}{i:05d}")
            files[f"images/{image_id}.jpg"] = image_bytes(colour=(40 * c, 90, 120))
            files[f"masks/{image_id}_segmentation.png"] = image_bytes("PNG", colour=(255, 255, 255))
    files["labels.csv"] = ("\n".join(rows) + "\n").encode()
    return files


def folder_files(
    classes: tuple[str, ...] = ("benign", "malignant"), per_class: int = 3
) -> dict[str, bytes]:
    return {
        f"mydata/{c}/img{i}.png": image_bytes("PNG", colour=(100 * k, 50, 50))
        for k, c in enumerate(classes)
        for i in range(per_class)
    }


def upload_dataset(api: Api, archive: bytes, filename: str = "data.zip", **kw: Any) -> Any:
    return api.client.post(
        f"{API}/datasets", files={"file": (filename, archive, "application/octet-stream")}, **kw
    )


def new_dataset(api: Api) -> dict[str, Any]:
    r = upload_dataset(api, zip_bytes(ham_files()))
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def safetensors_bytes(arch: str = "small_cnn", num_classes: int = 3) -> bytes:
    from safetensors.torch import save_model

    from models.nets import build_model

    model = build_model(arch, num_classes)
    path = Path(f"/tmp/dpaat-test-{arch}-{num_classes}-{threading.get_ident()}.safetensors")
    save_model(model, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def upload_model(api: Api, weights: bytes, description: dict[str, Any] | str, **kw: Any) -> Any:
    desc = description if isinstance(description, str) else json.dumps(description)
    return api.client.post(
        f"{API}/models",
        files={"weights": ("w.safetensors", weights, "application/octet-stream")},
        data={"description": desc},
        **kw,
    )


CLASSES = ["akiec", "bcc", "nv"]
SMALL: dict[str, Any] = {"architecture": "small_cnn", "classes": CLASSES, "image_size": 32}


def trained_model(api: Api, dataset_id: str | None = None, owner: str = "local") -> str:
    """A model registered the way the worker does it: a finished training job + checkpoint."""
    with api.session() as s:
        job = jobs.create_job(
            s, owner=owner, kind="train", params={"dataset_id": dataset_id, "config": {}}
        )
        jobs.claim_job(s, job.id, "w1", 60)
        ckpt = api.store.dir_for("jobs", job.id) / "checkpoint.pt"
        ckpt.write_bytes(b"not really a checkpoint")
        model = models_registry.register_trained_model(
            s,
            job,
            ckpt,
            {
                "arch": "small_cnn",
                "classes": ["akiec", "bcc", "nv"],
                "image_size": 32,
                "method": "dpaat",
            },
            store=api.store,
        )
        jobs.finish_job(s, job.id, "w1", {"model_id": model.id})
        return model.id


# ============================================================================ datasets
def test_upload_ham_layout_zip(api: Api) -> None:
    r = upload_dataset(api, zip_bytes(ham_files()), filename="../../ham small.zip")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["layout"] == "ham10000" and body["source"] == "upload"
    assert body["class_counts"]["akiec"] == 4 and body["class_counts"]["mel"] == 0
    assert body["num_samples"] == 12 and body["has_masks"] is True
    assert body["name"] == "ham small"  # the client's name is only a label
    assert len(body["manifest_sha256"]) == 64 and len(body["archive_sha256"]) == 64
    stored = api.store.root / "datasets" / body["id"]
    assert (stored / "manifest.json").is_file() and (stored / "data" / "labels.csv").is_file()
    assert api.client.get(f"{API}/datasets/{body['id']}").json() == body
    listing = api.client.get(f"{API}/datasets").json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == body["id"]


def test_upload_class_folders_targz_with_wrapper_folder(api: Api) -> None:
    r = upload_dataset(api, targz_bytes(folder_files()), filename="x.tar.gz", data={"name": "mine"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["layout"] == "class_folders" and body["name"] == "mine"
    assert body["classes"] == ["benign", "malignant"]
    assert body["class_counts"] == {"benign": 3, "malignant": 3} and body["has_masks"] is False


BAD_ARCHIVES: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "zip slip": (lambda: zip_bytes({**ham_files(), "../evil.txt": b"x"}), 422, "'..'"),
    "nested slip": (lambda: zip_bytes({"images/../../evil.txt": b"x"}), 422, "'..'"),
    "absolute path": (lambda: zip_bytes({"/tmp/evil.txt": b"x"}), 422, "absolute"),
    "windows drive": (lambda: zip_bytes({"C:\\evil.txt": b"x"}), 422, "absolute"),
    "zip symlink": (
        lambda: zip_bytes(ham_files(), {"images/link.jpg": "/etc/passwd"}),
        422,
        "link",
    ),
    "tar symlink": (
        lambda: targz_bytes(folder_files(), {"mydata/benign/l.png": "/etc"}),
        422,
        "link",
    ),
    "tar slip": (lambda: targz_bytes({"../evil.txt": b"x"}), 422, "'..'"),
    "not an archive": (lambda: b"just some text, not an archive", 415, "zip or .tar.gz"),
    "truncated zip": (lambda: zip_bytes(ham_files())[:300], 422, "damaged"),
    "not a dataset": (lambda: zip_bytes({"readme.txt": b"hello"}), 422, "not a dataset"),
    "fake image": (
        lambda: zip_bytes({**ham_files(), "images/ISIC_0000000.jpg": b"GIF89a.."}),
        422,
        "not a JPEG or PNG",
    ),
    "one class": (lambda: zip_bytes(ham_files(classes=("nv",))), 422, "two classes"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_are_refused_and_nothing_is_stored(
    api: Api, case: str, tmp_path: Path
) -> None:
    make, status, message = BAD_ARCHIVES[case]
    before = api.stored_state()
    r = upload_dataset(api, make())
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert api.stored_state() == before
    assert not (api.store.root.parent / "evil.txt").exists()
    assert not Path("/tmp/evil.txt").exists()


def test_archive_limits(make_api: Callable[..., Api]) -> None:
    api = make_api(max_archive_entries=5, max_archive_extracted_mb=1)
    before = api.stored_state()
    r = upload_dataset(api, zip_bytes(ham_files()))
    assert r.status_code == 413 and "more than 5 entries" in r.json()["detail"]
    bomb = zip_bytes({"a/x.png": b"\0" * (3 << 20)})  # a few KB compressed, 3 MB expanded
    assert len(bomb) < 100_000
    r = upload_dataset(api, bomb)
    assert r.status_code == 413 and "expands to more than 1 MB" in r.json()["detail"]
    assert api.stored_state() == before


def test_upload_size_limit_before_reading_the_body(make_api: Callable[..., Api]) -> None:
    api = make_api(max_upload_mb=1)
    before = api.stored_state()
    r = upload_dataset(api, b"PK\x03\x04" + b"\0" * (2 << 20))
    assert r.status_code == 413 and "limit of 1 MB" in r.json()["detail"]
    assert api.stored_state() == before


def test_register_directory_under_a_data_root(api: Api) -> None:
    root = api.settings.data_roots[0] / "derm"
    for name, data in folder_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    r = api.client.post(f"{API}/datasets/register", json={"path": str(root / "mydata")})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["source"] == "registered" and body["name"] == "mydata" and body["num_samples"] == 6
    # Deleting a registered dataset never touches the directory itself.
    assert api.client.delete(f"{API}/datasets/{body['id']}").status_code == 204
    assert len(list((root / "mydata").rglob("*.png"))) == 6


def test_register_refuses_paths_outside_the_roots(api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    for name, data in folder_files().items():
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        (outside / name).write_bytes(data)
    link = api.settings.data_roots[0] / "sneaky"
    link.symlink_to(outside / "mydata")
    before = api.stored_state()
    for path, message in [
        (str(outside / "mydata"), "not under a data root"),
        (str(link), "not under a data root"),  # resolved before the check
        (str(api.settings.data_roots[0] / "x" / ".." / ".." / "outside"), "not under a data root"),
        ("relative/path", "absolute"),
        (str(api.settings.data_roots[0] / "missing"), "not a directory"),
    ]:
        r = api.client.post(f"{API}/datasets/register", json={"path": path})
        assert r.status_code == 422 and message in r.json()["detail"], (path, r.text)
    assert api.stored_state() == before


def test_delete_dataset(api: Api) -> None:
    ds = new_dataset(api)
    folder = api.store.root / "datasets" / ds["id"]
    assert folder.is_dir()
    assert api.client.delete(f"{API}/datasets/{ds['id']}", headers=OTHER).status_code == 404
    assert api.client.delete(f"{API}/datasets/{ds['id']}").status_code == 204
    assert api.client.get(f"{API}/datasets/{ds['id']}").status_code == 404
    assert not folder.exists()
    assert api.client.delete(f"{API}/datasets/{ds['id']}").status_code == 404


def test_dataset_in_use_cannot_be_deleted(api: Api) -> None:
    ds = new_dataset(api)
    r = api.client.post(f"{API}/jobs/train", json={"dataset_id": ds["id"]})
    assert r.status_code == 201
    job_id = r.json()["id"]
    before = api.stored_state()
    r = api.client.delete(f"{API}/datasets/{ds['id']}")
    assert r.status_code == 409 and "unfinished job" in r.json()["detail"]
    assert api.stored_state() == before
    api.client.post(f"{API}/jobs/{job_id}/cancel")
    assert api.client.delete(f"{API}/datasets/{ds['id']}").status_code == 204
    job = api.client.get(f"{API}/jobs/{job_id}").json()
    assert job["dataset_id"] is None and job["params"]["dataset_id"] == ds["id"]


def test_datasets_are_private_to_their_owner(api: Api) -> None:
    ds = new_dataset(api)
    assert api.client.get(f"{API}/datasets/{ds['id']}", headers=OTHER).status_code == 404
    assert api.client.get(f"{API}/datasets", headers=OTHER).json()["total"] == 0
    r = upload_dataset(api, zip_bytes(ham_files()), headers=OTHER)
    assert r.status_code == 201
    assert api.client.get(f"{API}/datasets").json()["total"] == 1
    assert api.client.get(f"{API}/datasets", headers=OTHER).json()["total"] == 1


def test_dataset_pagination(api: Api) -> None:
    ids = [new_dataset(api)["id"] for _ in range(3)]
    page = api.client.get(f"{API}/datasets", params={"limit": 2, "offset": 0}).json()
    rest = api.client.get(f"{API}/datasets", params={"limit": 2, "offset": 2}).json()
    assert (
        page["total"] == rest["total"] == 3 and len(page["items"]) == 2 and len(rest["items"]) == 1
    )
    assert {i["id"] for i in page["items"] + rest["items"]} == set(ids)
    assert api.client.get(f"{API}/datasets", params={"limit": 0}).status_code == 422


# ============================================================================ jobs
def test_submit_train_job(api: Api) -> None:
    ds = new_dataset(api)
    r = api.client.post(
        f"{API}/jobs/train",
        json={"dataset_id": ds["id"], "config": {"method": "pgd_at", "epochs": 2, "eps_max": 4}},
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["kind"] == "train" and job["dataset_id"] == ds["id"]
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert api.sent == [(job["id"], "train")]
    config = job["params"]["config"]
    assert config["method"] == "pgd_at" and config["eps_max"] == 4 and config["z"] == 2.0


def test_train_on_generated_data_needs_no_dataset(api: Api) -> None:
    r = api.client.post(f"{API}/jobs/train", json={"config": {"epochs": 1, "limit": 16}})
    assert r.status_code == 201 and r.json()["params"]["dataset_id"] is None


def test_idempotent_submit(api: Api) -> None:
    body = {"config": {"method": "dpaat", "epochs": 1}}
    first = api.client.post(f"{API}/jobs/train", json=body, headers={"Idempotency-Key": "abc"})
    again = api.client.post(f"{API}/jobs/train", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert len(api.sent) == 1  # a replay is not sent twice
    changed = api.client.post(
        f"{API}/jobs/train",
        json={"config": {"method": "dpaat", "epochs": 2}},
        headers={"Idempotency-Key": "abc"},
    )
    assert changed.status_code == 409 and "Idempotency-Key" in changed.json()["detail"]
    other = api.client.post(
        f"{API}/jobs/train", json=body, headers={"Idempotency-Key": "abc", **OTHER}
    )
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert api.client.get(f"{API}/jobs").json()["total"] == 1


INVALID_TRAIN = [
    ({"config": {"method": "magic"}}, "method", "'dpaat'"),
    ({"config": {"eps_max": 100}}, "eps_max", "less than or equal to 64"),
    ({"config": {"eps_max": -1}}, "eps_max", "greater than or equal to 0"),
    ({"config": {"eps_min": 5, "eps_max": 4}}, "config", "must not exceed eps_max"),
    ({"config": {"method": "dpaat", "eps_max": 0}}, "config", "needs eps_max > 0"),
    ({"config": {"arch": "alexnet"}}, "arch", "'small_cnn'"),
    ({"config": {"epochs": 0}}, "epochs", "greater than or equal to 1"),
    ({"config": {"data_root": "/etc"}}, "data_root", "Extra inputs are not permitted"),
    ({"config": {}, "reference_model_id": "x"}, "body", "only used by method 'amat_external'"),
]


@pytest.mark.parametrize(("body", "field_name", "message"), INVALID_TRAIN)
def test_invalid_train_requests(
    api: Api, body: dict[str, Any], field_name: str, message: str
) -> None:
    r = api.client.post(f"{API}/jobs/train", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert any(message in e["msg"] and field_name in map(str, e["loc"]) for e in detail), detail
    assert api.client.get(f"{API}/jobs").json()["total"] == 0 and api.sent == []


def test_submit_with_missing_or_foreign_references(api: Api) -> None:
    ds = new_dataset(api)
    before = api.stored_state()
    r = api.client.post(f"{API}/jobs/train", json={"dataset_id": "0" * 32})
    assert r.status_code == 404 and "dataset" in r.json()["detail"]
    r = api.client.post(f"{API}/jobs/train", json={"dataset_id": ds["id"]}, headers=OTHER)
    assert r.status_code == 404
    r = api.client.post(f"{API}/jobs/evaluate", json={"model_id": "0" * 32})
    assert r.status_code == 404 and "model" in r.json()["detail"]
    assert api.stored_state() == before and api.sent == []


def test_submit_evaluate_job(api: Api) -> None:
    ds = new_dataset(api)
    model_id = trained_model(api, ds["id"])
    r = api.client.post(
        f"{API}/jobs/evaluate",
        json={
            "model_id": model_id,
            "eps_list": [8, 0, 2, 2],
            "attacks": [{"name": "pgd", "steps": 5}],
        },
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["kind"] == "evaluate" and job["model_id"] == model_id
    assert job["params"]["eps_list"] == [0, 2, 8]
    assert api.sent[-1] == (job["id"], "evaluate")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"eps_list": [0, 65]}, "eps must be in [0, 64]"),
        ({"eps_list": []}, "at least 1 item"),
        ({"attacks": [{"name": "deepfool"}]}, "'fgsm'"),
        ({"attacks": [{"name": "pgd", "steps": 0}]}, "greater than or equal to 1"),
        ({"part": "holdout"}, "'test'"),
    ],
)
def test_invalid_evaluate_requests(api: Api, patch: dict[str, Any], message: str) -> None:
    model_id = trained_model(api)
    r = api.client.post(f"{API}/jobs/evaluate", json={"model_id": model_id, **patch})
    assert r.status_code == 422 and message in json.dumps(r.json()["detail"]), r.text
    assert api.client.get(f"{API}/jobs", params={"kind": "evaluate"}).json()["total"] == 0


def test_evaluate_refuses_a_dataset_with_other_classes(api: Api) -> None:
    model_id = trained_model(api)
    r = upload_dataset(api, targz_bytes(folder_files()), filename="x.tar.gz")
    other_ds = r.json()["id"]
    r = api.client.post(f"{API}/jobs/evaluate", json={"model_id": model_id, "dataset_id": other_ds})
    assert r.status_code == 422 and "classes" in r.json()["detail"]


def test_list_jobs_filters_and_pages(api: Api) -> None:
    ids = [
        api.client.post(f"{API}/jobs/train", json={"name": f"j{i}"}).json()["id"] for i in range(3)
    ]
    api.client.post(f"{API}/jobs/{ids[1]}/cancel")
    everything = api.client.get(f"{API}/jobs").json()
    assert everything["total"] == 3 and [j["id"] for j in everything["items"]] == ids[::-1]
    cancelled = api.client.get(f"{API}/jobs", params={"status": "cancelled"}).json()
    assert cancelled["total"] == 1 and cancelled["items"][0]["id"] == ids[1]
    page = api.client.get(f"{API}/jobs", params={"limit": 2, "offset": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == [ids[0]]
    assert api.client.get(f"{API}/jobs", params={"status": "exploded"}).status_code == 422
    assert api.client.get(f"{API}/jobs", headers=OTHER).json()["total"] == 0


def test_job_detail_shows_epochs_and_vital_signs(api: Api) -> None:
    job_id = api.client.post(f"{API}/jobs/train", json={}).json()["id"]
    with api.session() as s:
        jobs.claim_job(s, job_id, "w1", 60)
        jobs.record_progress(s, job_id, {"epoch": 1, "step": 4, "steps_per_epoch": 10})
        for epoch, tau in enumerate([1.9, 1.2]):
            hist = {"edges": [0, 4, 8], "counts": [epoch, 10 - epoch]}
            jobs.record_epoch(
                s,
                job_id,
                epoch,
                {
                    "loss": 1.0 - epoch / 10,
                    "tau": tau,
                    "broken_frac": 0.3,
                    "eps_mean": 2.0,
                    "eps_hist": hist,
                },
            )
    job = api.client.get(f"{API}/jobs/{job_id}").json()
    assert job["status"] == "running" and job["progress"]["step"] == 4
    assert [e["epoch"] for e in job["epochs"]] == [0, 1]
    assert job["vital_signs"]["tau"] == [1.9, 1.2]
    assert job["vital_signs"]["eps_hist"] == {"edges": [0, 4, 8], "counts": [1, 9]}
    assert api.client.get(f"{API}/jobs/{job_id}", headers=OTHER).status_code == 404
    assert api.client.get(f"{API}/jobs/{'f' * 32}").status_code == 404


def test_job_status_is_one_statement_outside_a_transaction(api: Api) -> None:
    """Job status is what clients poll (issue 12): the job and its epochs come from one statement
    (one snapshot, epochs in order whatever order they were recorded in) and, on Postgres, on an
    autocommit connection (no BEGIN/ROLLBACK round trips)."""
    job_id = api.client.post(f"{API}/jobs/train", json={}).json()["id"]
    with api.session() as s:
        for epoch in (2, 0, 1):
            jobs.record_epoch(s, job_id, epoch, {"loss": 1.0 - epoch / 10})
    seen: list[tuple[str, bool]] = []

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        seen.append((statement, getattr(dbapi, "autocommit", False)))

    engine = api.client.app.state.engine  # type: ignore[attr-defined]
    event.listen(engine, "before_cursor_execute", record)
    try:
        job = api.client.get(f"{API}/jobs/{job_id}").json()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert [e["epoch"] for e in job["epochs"]] == [0, 1, 2]
    assert [e["metrics"]["loss"] for e in job["epochs"]] == [1.0, 0.9, 0.8]
    assert len(seen) == 1 and "job_epochs" in seen[0][0], seen
    assert seen[0][1] is (engine.dialect.name == "postgresql")


def test_job_without_dpaat_epochs_has_no_vital_signs(api: Api) -> None:
    job_id = api.client.post(f"{API}/jobs/train", json={"config": {"method": "standard"}}).json()[
        "id"
    ]
    with api.session() as s:
        jobs.record_epoch(s, job_id, 0, {"loss": 1.0})
    assert api.client.get(f"{API}/jobs/{job_id}").json()["vital_signs"] is None


def test_cancel(api: Api) -> None:
    queued, running, done = (
        api.client.post(f"{API}/jobs/train", json={"name": n}).json()["id"] for n in "abc"
    )
    with api.session() as s:
        jobs.claim_job(s, running, "w1", 60)
        jobs.claim_job(s, done, "w1", 60)
        jobs.finish_job(s, done, "w1", {})
    r = api.client.post(f"{API}/jobs/{queued}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    r = api.client.post(f"{API}/jobs/{running}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancel_requested"
    assert api.client.post(f"{API}/jobs/{running}/cancel").json()["status"] == "cancel_requested"
    r = api.client.post(f"{API}/jobs/{done}/cancel")
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]
    assert api.client.post(f"{API}/jobs/{queued}/cancel", headers=OTHER).status_code == 404


def read_events(api: Api, job_id: str, timeout: float = 20.0) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    with api.client.stream("GET", f"{API}/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in r.iter_lines():
            assert time.monotonic() < deadline, "the stream did not end"
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_event_stream_of_a_finished_job_is_one_event(api: Api) -> None:
    job_id = api.client.post(f"{API}/jobs/train", json={}).json()["id"]
    api.client.post(f"{API}/jobs/{job_id}/cancel")
    events = read_events(api, job_id)
    assert [(n, e["status"]) for n, e in events] == [("job", "cancelled")]


def test_event_stream_follows_a_running_job_to_its_end(api: Api) -> None:
    job_id = api.client.post(f"{API}/jobs/train", json={}).json()["id"]
    with api.session() as s:
        jobs.claim_job(s, job_id, "w1", 60)

    def work() -> None:
        with api.session() as s:
            for step in range(3):
                time.sleep(0.15)
                jobs.record_progress(s, job_id, {"step": step})
            jobs.record_epoch(s, job_id, 0, {"loss": 0.5})
            time.sleep(0.15)
            jobs.finish_job(s, job_id, "w1", {"model_id": None})

    worker = threading.Thread(target=work)
    worker.start()
    events = read_events(api, job_id)
    worker.join()
    statuses = [e["status"] for _, e in events]
    assert statuses[0] == "running" and statuses[-1] == "succeeded"
    assert statuses.count("succeeded") == 1
    steps = [e["progress"].get("step") for _, e in events if e["progress"]]
    assert steps == sorted(steps) and len(events) >= 3  # an event per observed change
    assert events[-1][1]["epochs_done"] == 1
    assert len({json.dumps(e, sort_keys=True) for _, e in events}) == len(events)  # no repeats


def test_event_stream_of_unknown_job_is_404(api: Api) -> None:
    assert api.client.get(f"{API}/jobs/{'a' * 32}/events").status_code == 404


def test_dispatch_failure_keeps_the_job_queued(api: Api) -> None:
    def broken(job_id: str, kind: str) -> None:
        raise ConnectionError("broker down")

    api.client.app.state.dispatcher = broken  # type: ignore[attr-defined]
    r = api.client.post(f"{API}/jobs/train", json={})
    assert r.status_code == 201 and r.json()["status"] == "queued"  # the reaper will re-send it


def test_json_body_limit(api: Api) -> None:
    r = api.client.post(
        f"{API}/jobs/train",
        content=b'{"name": "' + b"x" * (2 << 20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]


# ============================================================================ models
def test_upload_list_get_and_download_a_model(api: Api) -> None:
    weights = safetensors_bytes()
    r = upload_model(api, weights, {**SMALL, "name": "ext"})
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["source"] == "uploaded" and model["weights_format"] == "safetensors"
    assert model["checkpoint_sha256"] == hashlib.sha256(weights).hexdigest()
    assert model["classes"] == SMALL["classes"] and model["has_report"] is False
    assert model["info"]["parameters"] > 0
    assert api.client.get(f"{API}/models/{model['id']}").json()["name"] == "ext"
    assert api.client.get(f"{API}/models").json()["total"] == 1
    download = api.client.get(f"{API}/models/{model['id']}/weights")
    assert download.status_code == 200 and download.content == weights
    assert download.headers["etag"].strip('"') == model["checkpoint_sha256"]
    assert api.client.get(f"{API}/models/{model['id']}", headers=OTHER).status_code == 404
    assert api.client.get(f"{API}/models/{model['id']}/weights", headers=OTHER).status_code == 404


def _pickle_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


BAD_MODELS: dict[str, tuple[Callable[[], bytes], Any, int, str]] = {
    "wrong class count": (lambda: safetensors_bytes(num_classes=4), SMALL, 422, "do not match"),
    "other architecture": (
        lambda: safetensors_bytes("resnet18"),
        SMALL,
        422,
        "not part of small_cnn",
    ),
    "pickle": (_pickle_bytes, SMALL, 415, "not a safetensors file"),
    "garbage": (
        lambda: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
        SMALL,
        415,
        "not a safetensors",
    ),
    "bad description json": (safetensors_bytes, "{nope", 422, "json"),
    "unknown architecture": (
        safetensors_bytes,
        {**SMALL, "architecture": "alexnet"},
        422,
        "small_cnn",
    ),
    "duplicate classes": (
        safetensors_bytes,
        {**SMALL, "classes": ["a", "a", "b"]},
        422,
        "distinct",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_uploads(api: Api, case: str) -> None:
    make, description, status, message = BAD_MODELS[case]
    before = api.stored_state()
    r = upload_model(api, make(), description)
    assert r.status_code == status, r.text
    assert message in json.dumps(r.json()["detail"])
    assert api.stored_state() == before


def test_uploaded_models_are_evaluated_on_a_named_dataset(api: Api) -> None:
    ds = new_dataset(api)
    description = {**SMALL, "classes": ds["classes"]}
    weights = safetensors_bytes(num_classes=len(ds["classes"]))
    model_id = upload_model(api, weights, description).json()["id"]
    r = api.client.post(f"{API}/jobs/evaluate", json={"model_id": model_id})
    assert r.status_code == 422 and "needs a dataset_id" in r.json()["detail"]
    assert api.sent == []
    r = api.client.post(f"{API}/jobs/evaluate", json={"model_id": model_id, "dataset_id": ds["id"]})
    assert r.status_code == 201, r.text
    assert len(api.sent) == 1


def test_truncated_safetensors_is_refused(api: Api) -> None:
    weights = safetensors_bytes()
    r = upload_model(api, weights[:-100], SMALL)
    assert r.status_code == 422 and "truncated" in r.json()["detail"]


def test_report_of_a_model(api: Api) -> None:
    model_id = trained_model(api)
    assert api.client.get(f"{API}/models/{model_id}/report").status_code == 404
    job_id = api.client.post(f"{API}/jobs/evaluate", json={"model_id": model_id}).json()["id"]
    md = api.store.dir_for("jobs", job_id) / "report.md"
    md.write_text("# Robustness report\n")
    report = {"verdict": "warn", "clean": {"accuracy": 0.8}, "robust": {}, "checks": []}
    with api.session() as s:
        jobs.claim_job(s, job_id, "w1", 60)
        job = jobs.get_job(s, job_id)
        models_registry.register_evaluation(s, job, model_id, report, {"md": md}, store=api.store)
        jobs.finish_job(s, job_id, "w1", {})
    r = api.client.get(f"{API}/models/{model_id}/report")
    assert r.status_code == 200
    body = r.json()
    assert body["verdict"] == "warn" and body["report"]["clean"]["accuracy"] == 0.8
    assert body["job_id"] == job_id
    r = api.client.get(f"{API}/models/{model_id}/report", params={"format": "md"})
    assert r.status_code == 200 and r.text.startswith("# Robustness report")
    assert r.headers["content-type"].startswith("text/markdown")
    assert api.client.get(f"{API}/models/{model_id}").json()["has_report"] is True
    assert api.client.get(f"{API}/models/{model_id}/report", headers=OTHER).status_code == 404


def test_trained_model_registration_is_idempotent(api: Api) -> None:
    model_id = trained_model(api)
    with api.session() as s:
        model = models_registry.get_model(s, model_id)
        assert model.training_method == "dpaat" and model.weights_format == "checkpoint"
        job = s.get(Job, model.job_id)
        assert job is not None
        again = models_registry.register_trained_model(
            s,
            job,
            api.store.path(model.weights_uri),
            {"arch": "small_cnn", "classes": ["a"], "image_size": 32},
            store=api.store,
        )
        assert again.id == model_id


# ============================================================================ predict
def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # 36 Mpx in a few KB
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()[:-600]


BAD_IMAGES: dict[str, tuple[Callable[[], bytes], str, int, str]] = {
    "text": (lambda: b"hello, I am not an image", "image/png", 415, "not a JPEG or PNG"),
    "gif": (lambda: image_bytes("GIF"), "image/gif", 415, "content type"),
    "gif as octet-stream": (
        lambda: image_bytes("GIF"),
        "application/octet-stream",
        415,
        "not a JPEG",
    ),
    "pdf content type": (image_bytes, "application/pdf", 415, "content type"),
    "truncated jpeg": (truncated_jpeg, "image/jpeg", 422, "truncated or corrupt"),
    "decompression bomb": (bomb_png, "image/png", 413, "pixels"),
    "empty": (lambda: b"", "image/png", 422, "empty"),
    "tiny": (lambda: image_bytes(size=2), "image/jpeg", 422, ">= 8 pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_refused_before_the_model(api: Api, case: str) -> None:
    make, content_type, status, message = BAD_IMAGES[case]
    model_id = trained_model(api)  # a fake checkpoint: any attempt to load it would fail
    before = api.stored_state()
    r = api.client.post(
        f"{API}/models/{model_id}/predict", files={"file": ("x", make(), content_type)}
    )
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert api.client.app.state.predictions.cached() == []  # type: ignore[attr-defined]
    assert api.stored_state() == before


def test_predict_limits_and_missing_model(make_api: Callable[..., Api]) -> None:
    api = make_api(max_image_mb=1, max_batch_images=2)
    model_id = trained_model(api)
    big = b"\xff\xd8\xff" + b"\0" * ((1 << 20) + 10)
    r = api.client.post(
        f"{API}/models/{model_id}/predict", files={"file": ("x.jpg", big, "image/jpeg")}
    )
    assert r.status_code == 413 and "limit of 1 MB" in r.json()["detail"]
    files = [("files", (f"{i}.png", image_bytes("PNG"), "image/png")) for i in range(3)]
    r = api.client.post(f"{API}/models/{model_id}/predict/batch", files=files)
    assert r.status_code == 413 and "at most 2 images" in r.json()["detail"]
    r = api.client.post(
        f"{API}/models/{'0' * 32}/predict",
        files={"file": ("x.png", image_bytes("PNG"), "image/png")},
    )
    assert r.status_code == 404
    r = api.client.post(
        f"{API}/models/{model_id}/predict",
        files={"file": ("x.png", image_bytes("PNG"), "image/png")},
        headers=OTHER,
    )
    assert r.status_code == 404
    r = api.client.post(f"{API}/models/{model_id}/predict", json={"image": "base64..."})
    assert r.status_code == 422


def test_predict_with_an_uploaded_model(api: Api) -> None:
    """Runs the real models.api.predict (torch) on a small untrained CNN."""
    import models.attacks

    if not hasattr(models.attacks, "robustness_score"):
        pytest.fail("models.attacks.robustness_score is missing: models.api.predict cannot run")
    model_id = upload_model(api, safetensors_bytes(), SMALL).json()["id"]
    r = api.client.post(
        f"{API}/models/{model_id}/predict",
        params={"gradcam": "true", "cap": 8, "eps": [1, 4]},
        files={"file": ("lesion.jpg", image_bytes(), "image/jpeg")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == model_id and body["index"] == 0
    assert body["class"] in CLASSES
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-3
    rob = body["robustness"]
    assert 0 <= rob["score"] <= 1 and rob["cap"] == 8 and set(rob["stable_at"]) == {"1", "4"}
    assert rob["eps_star"] is None or 0 < rob["eps_star"] <= 8
    assert base64.b64decode(body["gradcam_png"]).startswith(b"\x89PNG")
    files = [
        ("files", (f"{i}.png", image_bytes("PNG", colour=(i * 60, 40, 40)), "image/png"))
        for i in range(2)
    ]
    r = api.client.post(f"{API}/models/{model_id}/predict/batch", files=files)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["index"] for p in predictions] == [0, 1]
    assert all(p["gradcam_png"] is None for p in predictions)
    for p in predictions:
        assert p["top_probability"] == max(p["probabilities"].values())
        assert isinstance(p["warnings"], list)
    sha = api.client.get(f"{API}/models/{model_id}").json()["checkpoint_sha256"]
    assert api.client.app.state.predictions.cached() == [sha]  # type: ignore[attr-defined]
    # The in-process worker batched and counted them (/metrics).
    text = api.client.get("/metrics").text
    assert "dpaat_predict_batch_images_count 2.0" in text, text
    assert 'dpaat_predict_requests_total{outcome="ok"} 2.0' in text
    assert "dpaat_predict_queue_depth 0.0" in text


def white_600x450() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (600, 450), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_plain_white_image_never_gets_an_unqualified_score(api: Api) -> None:
    """Issue 11 item 7: a white 600x450 picture got score 1.0 with nothing to say it is no
    dermoscopy photograph."""
    model_id = upload_model(api, safetensors_bytes(), SMALL).json()["id"]
    r = api.client.post(
        f"{API}/models/{model_id}/predict",
        files={"file": ("white.png", white_600x450(), "image/png")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"near_uniform_image", "tiny_lesion_area"} <= set(body["warnings"]), body
    assert body["top_probability"] == max(body["probabilities"].values())
    # A real lesion photograph gets none of the image warnings.
    roots = default_data_roots()
    lesion = next((roots[0] / "images").glob("ISIC_*.jpg"), None) if roots else None
    if lesion is not None:
        r = api.client.post(
            f"{API}/models/{model_id}/predict",
            files={"file": ("lesion.jpg", lesion.read_bytes(), "image/jpeg")},
        )
        assert r.status_code == 200, r.text
        assert not {"near_uniform_image", "tiny_lesion_area", "extreme_aspect_ratio"} & set(
            r.json()["warnings"]
        )


@pytest.mark.parametrize("cap", ["1e-300", "0", "-1", "0.5", "65", "nan", "inf"])
def test_a_cap_outside_its_range_is_refused(api: Api, cap: str) -> None:
    model_id = trained_model(api)
    before = api.stored_state()
    r = api.client.post(
        f"{API}/models/{model_id}/predict",
        params={"cap": cap},
        files={"file": ("x.png", image_bytes("PNG"), "image/png")},
    )
    assert r.status_code == 422, r.text
    assert "cap" in r.text
    assert api.client.app.state.predictions.cached() == []  # type: ignore[attr-defined]
    assert api.stored_state() == before


def test_the_score_fields_are_documented(api: Api) -> None:
    schemas = api.client.get("/openapi.json").json()["components"]["schemas"]
    rob = schemas["Robustness"]["properties"]
    assert "not a proof" in rob["eps_star"]["description"]
    assert "not a confidence" in rob["score"]["description"]
    assert "above `cap`" in rob["stable_at"]["description"]
    warnings = schemas["Prediction"]["properties"]["warnings"]["description"]
    for code in (
        "low_confidence",
        "near_uniform_image",
        "extreme_aspect_ratio",
        "tiny_lesion_area",
    ):
        assert code in warnings


# ============================================================================ health, metrics, docs
def test_health_and_metrics(api: Api) -> None:
    assert api.client.get("/health/live").json() == {"status": "ok"}
    ready = api.client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert ready.json()["checks"]["storage"] == "ok"  # a probe file written in the directory
    job_id = api.client.post(f"{API}/jobs/train", json={}).json()["id"]
    api.client.get(f"{API}/jobs/{job_id}")
    text = api.client.get("/metrics").text
    assert 'dpaat_jobs{status="queued"} 1.0' in text
    assert 'route="/api/v1/jobs/{job_id}"' in text and job_id not in text
    assert (
        'dpaat_http_requests_total{method="POST",route="/api/v1/jobs/train",status="201"}' in text
    )
    assert "dpaat_http_request_duration_seconds_bucket" in text


def test_readiness_names_the_failing_part(make_api: Callable[..., Api]) -> None:
    api = make_api(broker_url="redis://127.0.0.1:1/0")
    r = api.client.get("/health/ready")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"].startswith("error")
    assert api.client.get("/health/live").status_code == 200


def test_openapi_documents_every_endpoint(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("post", "/api/v1/datasets"),
        ("get", "/api/v1/datasets"),
        ("post", "/api/v1/datasets/register"),
        ("get", "/api/v1/datasets/{dataset_id}"),
        ("delete", "/api/v1/datasets/{dataset_id}"),
        ("post", "/api/v1/jobs/train"),
        ("post", "/api/v1/jobs/evaluate"),
        ("get", "/api/v1/jobs"),
        ("get", "/api/v1/jobs/{job_id}"),
        ("post", "/api/v1/jobs/{job_id}/cancel"),
        ("get", "/api/v1/jobs/{job_id}/events"),
        ("post", "/api/v1/models"),
        ("get", "/api/v1/models"),
        ("get", "/api/v1/models/{model_id}"),
        ("get", "/api/v1/models/{model_id}/weights"),
        ("get", "/api/v1/models/{model_id}/report"),
        ("post", "/api/v1/models/{model_id}/predict"),
        ("post", "/api/v1/models/{model_id}/predict/batch"),
        ("get", "/health/live"),
        ("get", "/health/ready"),
        ("get", "/metrics"),
    }
    present = {(m, p) for p, ops in paths.items() for m in ops}
    assert expected <= present
    for method, path in expected:
        op = paths[path][method]
        assert op.get("summary"), (method, path)
        if "{" in path and path.startswith(API):
            assert "404" in op["responses"], (method, path)
    schemas = spec["components"]["schemas"]
    assert schemas["TrainJobRequest"].get("examples")
    assert schemas["EvaluateJobRequest"].get("examples")
