"""Issue 14, the careless and the hostile client: each case found on the real stack is a test here,
through the ASGI app on SQLite and on the real PostgreSQL (the NUL byte only fails there).

One text policy (app.core.text_policy, applied by app.api.input_policy to every path, query and
body field): NUL, other control characters, line breaks and bidirectional overrides are refused
with a 422 naming the field, and nothing is stored. Datasets are checked at upload for what
training needs; jobs that cannot run are refused at submission; errors name what to change.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import test_api
from PIL import Image
from test_api import (
    API,
    SMALL,
    Api,
    folder_files,
    ham_files,
    image_bytes,
    new_dataset,
    safetensors_bytes,
    trained_model,
    upload_dataset,
    upload_model,
    zip_bytes,
)

from app.services.errors import Invalid

# test_api's fixtures: the app on SQLite and on the real PostgreSQL, its stored state.
database_url = test_api.database_url
make_api = test_api.make_api
api = test_api.api

NUL_ID = "a%00b"
# Every route with an id in its path (the 12 endpoints of the report and their siblings).
ID_PATHS = [
    ("get", f"{API}/jobs/{NUL_ID}", "job_id"),
    ("post", f"{API}/jobs/{NUL_ID}/cancel", "job_id"),
    ("get", f"{API}/jobs/{NUL_ID}/events", "job_id"),
    ("get", f"{API}/datasets/{NUL_ID}", "dataset_id"),
    ("delete", f"{API}/datasets/{NUL_ID}", "dataset_id"),
    ("get", f"{API}/models/{NUL_ID}", "model_id"),
    ("get", f"{API}/models/{NUL_ID}/weights", "model_id"),
    ("get", f"{API}/models/{NUL_ID}/report", "model_id"),
    ("get", f"{API}/audits/{NUL_ID}", "audit_id"),
]


def _refused(r: Any, loc: list[Any], words: str = "control character") -> None:
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == loc, error
    assert words in error["msg"], error


# ============================================================================ text policy
@pytest.mark.parametrize(("method", "path", "param"), ID_PATHS)
def test_nul_in_a_path_id_is_a_422_naming_it(api: Api, method: str, path: str, param: str) -> None:
    before = api.stored_state()
    r = getattr(api.client, method)(path)
    _refused(r, ["path", param])
    assert api.stored_state() == before


def test_control_characters_in_query_parameters(api: Api) -> None:
    _refused(api.client.get(f"{API}/jobs", params={"kind": "train\x00"}), ["query", "kind"])
    r = api.client.get(f"{API}/audits", params={"model_id": "x\u202e"})
    _refused(r, ["query", "model_id"], "bidirectional")
    # an undeclared parameter is covered too (routes added later need nothing)
    r = api.client.get(f"{API}/datasets", params={"anything": "a\nb"})
    _refused(r, ["query", "anything"], "line break")


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        (f"{API}/jobs/train", {"dataset_id": "abc\u0000def"}, ["body", "dataset_id"]),
        (f"{API}/jobs/train", {"name": "a\u0000b"}, ["body", "name"]),
        (f"{API}/jobs/train", {"config": {"method": "dp\u0007aat"}}, ["body", "config", "method"]),
        (f"{API}/jobs/evaluate", {"model_id": "abc\u0000def"}, ["body", "model_id"]),
        (
            f"{API}/audits",
            {"model_id": "m", "thresholds": [{"metric": "accuracy@0\u0000"}]},
            ["body", "thresholds", 0, "metric"],
        ),
    ],
)
def test_nul_in_json_bodies_is_a_422_naming_the_field(
    api: Api, path: str, body: dict[str, Any], loc: list[Any]
) -> None:
    """Before: 500 on PostgreSQL (psycopg.DataError), or 201 and a job failing at its end."""
    before = api.stored_state()
    _refused(api.client.post(path, json=body), loc)
    assert api.stored_state() == before and api.sent == []


def test_nul_in_a_key_label_is_a_422(make_api: Callable[..., Api]) -> None:
    from app.services import api_keys

    api = make_api(auth="on")
    with api.session() as s:
        _row, admin = api_keys.create_key(s, owner="ops", scopes=["admin"])
        s.commit()
    before = api.stored_state()
    body = {"owner": "team", "scopes": ["read"], "label": "a\u0000"}
    r = api.client.post(f"{API}/keys", json=body, headers={"X-API-Key": admin})
    _refused(r, ["body", "label"])
    assert api.stored_state() == before
    # an anonymous client learns nothing: 401 before any check of its input
    assert api.client.get(f"{API}/jobs/{NUL_ID}").status_code == 401


def test_nul_in_a_job_name_is_refused_at_submission(api: Api) -> None:
    """Before: 201, trained, then failed with 1,433 characters of SQL in ``error``."""
    dataset = new_dataset(api)
    r = api.client.post(f"{API}/jobs/train", json={"dataset_id": dataset["id"], "name": "a\x00b"})
    _refused(r, ["body", "name"])
    assert api.sent == []
    r = api.client.post(f"{API}/jobs/train", json={"dataset_id": dataset["id"], "name": "ok"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("ham\x00probe", "control character (U+0000"),
        ("ham\u202egpj.exe\nDROP TABLE", "bidirectional control character (U+202E"),
        ("two\nlines", "line break"),
        ("x" * 201, "at most 200 characters"),
    ],
)
def test_dataset_names_are_single_line_printable(api: Api, name: str, words: str) -> None:
    before = api.stored_state()
    r = upload_dataset(api, zip_bytes(ham_files()), data={"name": name})
    _refused(r, ["body", "name"], words)
    assert api.stored_state() == before


def test_json_inside_a_form_field_is_checked_as_json(api: Api) -> None:
    before = api.stored_state()
    description = json.dumps({**SMALL, "name": "x\u0000"}, indent=2)  # pretty-printed is fine
    r = upload_model(api, safetensors_bytes(), description)
    _refused(r, ["body", "description", "name"])
    assert api.stored_state() == before
    r = upload_model(api, safetensors_bytes(), json.dumps({**SMALL, "name": "fine"}, indent=2))
    assert r.status_code == 201, r.text


def test_a_very_long_file_name_is_a_clear_422(api: Api) -> None:
    """Before: 400 ``Invalid multipart data.`` (the multipart parser's header limit)."""
    r = upload_dataset(api, zip_bytes(ham_files()), filename="a" * 5000 + ".zip")
    _refused(r, ["body", "file"], "file name) is 5004 characters long; the limit is 255")
    assert "rename the file" in r.json()["detail"][0]["msg"]


def test_valid_unicode_is_accepted(api: Api) -> None:
    r = upload_dataset(api, zip_bytes(ham_files()), data={"name": "Dermatologie Zürich 皮膚 ✓"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "Dermatologie Zürich 皮膚 ✓"


# ============================================================================ errors
def test_job_errors_are_short_and_carry_no_sql_or_paths() -> None:
    """What the worker stores on a failed job (worker.runner._fail)."""
    from sqlalchemy.exc import DataError

    from app.services import public_errors

    sql = DataError(
        "INSERT INTO models (id, name) VALUES (%(id)s, %(name)s)", {"name": "a\x00b"}, Exception()
    )
    stored = public_errors.job_error(sql, "abc123")
    assert "INSERT" not in stored and "abc123" in stored and len(stored) < 120
    path = Invalid("data path /srv/artifacts/datasets/1234/data is not a directory")
    stored = public_errors.job_error(path, "r1")
    assert "/srv" not in stored and "data is not a directory" in stored
    from models.nets import build_model

    with pytest.raises(ValueError) as config_error:
        build_model("no_such_net", 3)
    assert "no_such_net" in public_errors.job_error(config_error.value, "r2")
    assert "no_such_net" not in public_errors.job_error(ValueError("no_such_net"), "r3")


def test_an_unexpected_error_answers_a_reference_not_its_text(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from app.services import datasets

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("SELECT secret FROM datasets -- /srv/dpaat/artifacts")

    monkeypatch.setattr(datasets, "list_datasets", broken)
    client = TestClient(api.client.app, raise_server_exceptions=False)
    r = client.get(f"{API}/datasets")
    assert r.status_code == 500
    reference = r.headers["X-Error-Reference"]
    assert r.json() == {"detail": f"internal server error (reference {reference})"}
    assert any(reference in rec.getMessage() for rec in caplog.records)


# ============================================================================ datasets
def _ham(per_class: int, classes: tuple[str, ...]) -> dict[str, bytes]:
    return ham_files(per_class=per_class, classes=classes)


def test_a_dataset_too_small_to_train_is_refused_at_upload(api: Api) -> None:
    """Before: 201, then the training job failed with ``DataError: empty dataset``."""
    before = api.stored_state()
    r = upload_dataset(api, zip_bytes(_ham(2, ("mel", "nv"))))
    assert r.status_code == 422, r.text
    assert "too few images to train on: 4 (mel 2, nv 2)" in r.json()["detail"]
    assert "DPAAT_MIN_DATASET_IMAGES" in r.json()["detail"]
    files = _ham(4, ("mel", "nv", "bcc"))  # then keep one bcc image (ISIC_02...)
    lines = files["labels.csv"].decode().splitlines()
    files["labels.csv"] = ("\n".join(lines[:-3]) + "\n").encode()
    files = {k: v for k, v in files.items() if not any(f"ISIC_0200{i:03d}" in k for i in (1, 2, 3))}
    r = upload_dataset(api, zip_bytes(files))
    assert r.status_code == 422, r.text
    assert "too few images in class(es) bcc (bcc 1, mel 4, nv 4)" in r.json()["detail"]
    assert api.stored_state() == before


def test_the_minimums_are_settable_and_every_split_part_gets_images(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(min_dataset_images=4)
    r = upload_dataset(api, zip_bytes(_ham(2, ("mel", "nv"))))
    assert r.status_code == 201, r.text
    with api.session() as s:
        from app.db.tables import Dataset
        from app.services import datasets

        row = s.get(Dataset, r.json()["id"])
        assert row is not None
        manifest = json.loads(datasets.manifest_path(row, api.store).read_text())
    sizes = {part: len(names) for part, names in manifest["parts"].items()}
    assert sizes == {"train": 2, "val": 1, "test": 1}, sizes


def test_labels_with_a_bom_upper_case_extensions_and_deep_folders(api: Api) -> None:
    """Before: ``missing columns ['image_id']``, ``missing image``, ``no images in the class
    folders``."""
    files = ham_files()
    files = {
        ("export/2026/ham/" + k).replace(".jpg", ".JPG"): v
        for k, v in files.items()
        if k != "labels.csv"
    }
    files["export/2026/ham/labels.csv"] = b"\xef\xbb\xbf" + ham_files()["labels.csv"]
    files["__MACOSX/export/._labels.csv"] = b"junk"
    r = upload_dataset(api, zip_bytes(files))
    assert r.status_code == 201, r.text
    assert r.json()["num_samples"] == 12 and r.json()["has_masks"]


def test_evaluating_a_model_whose_dataset_was_deleted_is_refused_at_submission(
    api: Api,
) -> None:
    """Before: 201, then ``failed: ... data path /.../data is not a directory``."""
    dataset = new_dataset(api)
    model_id = trained_model(api, dataset["id"])
    # the dataset id recorded on the model: what the training job used
    assert api.client.delete(f"{API}/datasets/{dataset['id']}").status_code == 204
    r = api.client.post(f"{API}/jobs/evaluate", json={"model_id": model_id})
    assert r.status_code == 409, r.text
    assert "was trained on has been deleted; name a dataset_id" in r.json()["detail"]
    assert api.sent == []


def test_a_batch_error_names_the_image(api: Api) -> None:
    """Before: a 422 without saying which image."""
    model_id = upload_model(api, safetensors_bytes(), SMALL).json()["id"]
    files = [
        ("files", ("good.png", image_bytes("PNG"), "image/png")),
        ("files", ("scan.jpg", image_bytes("PNG"), "image/png")),
        ("files", ("broken scan.jpg", image_bytes()[:300], "image/jpeg")),
    ]
    r = api.client.post(f"{API}/models/{model_id}/predict/batch", files=files)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("image 2 (broken scan.jpg): the image is truncated")
    files[2] = ("files", ("notes.txt", b"hello, world", "image/jpeg"))
    r = api.client.post(f"{API}/models/{model_id}/predict/batch", files=files)
    assert r.status_code == 415, r.text
    assert r.json()["detail"] == "image 2 (notes.txt): not a JPEG or PNG image"


# ============================================================================ images
def _png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_16_bit_dataset_is_stored_scaled_not_white(api: Api) -> None:
    """Before: 35 of 36 stored images were solid white."""
    ramp = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0..61380
    files = {name: _png16(ramp) for name in folder_files(per_class=3)}
    r = upload_dataset(api, zip_bytes(files))
    assert r.status_code == 201, r.text
    stored = sorted(api.store.root.rglob("*.png"))
    assert len(stored) == 6
    expected = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    for path in stored:
        with Image.open(path) as im:
            assert im.mode == "L"
            assert np.array_equal(np.asarray(im), expected), path
