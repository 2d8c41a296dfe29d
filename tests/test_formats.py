"""The dataset formats users have (models/formats.py): HAM10000, ISIC 2019, ISIC 2020 and class
folders load with the classes and groups of their label files, written here in each format's exact
column layout; malformed files are refused with the rows named; an ISIC 2019 archive uploaded
through the API is accepted and trains, and the model records the data's classes."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.data import build_manifest, load_bundle
from models.formats import DataError, LabelFileError, load_samples

ISIC2019_COLUMNS = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC2019_META = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
ISIC2020_COLUMNS = [
    "image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
    "diagnosis", "benign_malignant", "target",
]  # fmt: skip


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def csv_text(columns: list[str], rows: list[list[str]]) -> str:
    return "\n".join(",".join(r) for r in [columns, *rows]) + "\n"


def one_hot(dx: str) -> list[str]:
    return ["1.0" if c == dx else "0.0" for c in ISIC2019_COLUMNS[1:]]


def isic2019_files(
    per_class: dict[str, int], lesions: int = 2, image_dir: str = "ISIC_2019_Training_Input"
) -> dict[str, bytes | str]:
    """ISIC 2019 as shipped: one-hot ground truth, metadata with lesion ids (every third image
    has none, as in the real file), images in ISIC_2019_Training_Input/."""
    rows, meta, files = [], [], {}
    n = 0
    for k, (dx, count) in enumerate(per_class.items()):
        for i in range(count):
            name = f"ISIC_{n:07d}"
            rows.append([name, *one_hot(dx)])
            lesion = "" if n % 3 == 2 else f"BCN_{k:02d}{i // lesions:04d}"
            meta.append([name, "55.0", "anterior torso", lesion, "female"])
            files[f"{image_dir}/{name}.jpg"] = jpeg((30 * k, 100, 150))
            n += 1
    files["ISIC_2019_Training_GroundTruth.csv"] = csv_text(ISIC2019_COLUMNS, rows)
    files["ISIC_2019_Training_Metadata.csv"] = csv_text(ISIC2019_META, meta)
    return files


def isic2020_files(
    patients: int = 12, per_patient: int = 3, v2: bool = False
) -> dict[str, bytes | str]:
    rows, files = [], {}
    for p in range(patients):
        for i in range(per_patient):
            name = f"ISIC_{p:05d}{i:02d}"
            target = int(p % 3 == 0)  # a third of the patients have malignant lesions
            rows.append(
                [name, f"IP_{p:07d}", "male", "45.0", "torso",
                 "melanoma" if target else "nevus", "malignant" if target else "benign",
                 str(target)]
                + ([f"IL_{p:05d}{i // 2:02d}"] if v2 else [])
            )  # fmt: skip
            files[f"train/{name}.jpg"] = jpeg((200 * target, 90, 90))
    columns = ISIC2020_COLUMNS + (["lesion_id"] if v2 else [])
    name = "ISIC_2020_Training_GroundTruth_v2.csv" if v2 else "ISIC_2020_Training_GroundTruth.csv"
    files[name] = csv_text(columns, rows)
    return files


# --------------------------------------------------------------------------- loading
def test_ham10000_keeps_its_seven_classes_and_groups_by_lesion(tmp_path: Path) -> None:
    rows = [["ISIC_0000001", "mel", "HAM_1"], ["ISIC_0000002", "mel", "HAM_1"]]
    rows += [["ISIC_0000003", "nv", "HAM_2"]]
    reordered = [[r[2], r[0], r[1]] for r in rows]  # HAM10000's own column order
    files: dict[str, bytes | str] = {
        "HAM10000_metadata.csv": csv_text(["lesion_id", "image_id", "dx"], reordered),
        **{f"images/{r[0]}.jpg": jpeg((1, 2, 3)) for r in rows},
    }
    data = load_samples(write(tmp_path, files))
    assert data.format == "ham10000"
    assert data.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert [(Path(s.image).stem, s.label, s.group) for s in data.samples] == [
        ("ISIC_0000001", 4, "HAM_1"), ("ISIC_0000002", 4, "HAM_1"), ("ISIC_0000003", 5, "HAM_2"),
    ]  # fmt: skip


def test_isic2019_classes_come_from_the_header_and_groups_from_the_metadata(
    tmp_path: Path,
) -> None:
    per_class = {"MEL": 6, "NV": 9, "BCC": 4, "AK": 3, "BKL": 3, "DF": 3, "VASC": 3, "SCC": 3}
    data = load_samples(write(tmp_path, isic2019_files(per_class)))
    assert data.format == "isic2019" and data.name == "isic2019"
    # UNK is in the header but no training image has it: not a class
    assert data.classes == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    assert data.counts() == per_class
    by_name = {Path(s.image).stem: s for s in data.samples}
    assert by_name["ISIC_0000000"].label == 0 and by_name["ISIC_0000006"].label == 1
    assert by_name["ISIC_0000000"].group == by_name["ISIC_0000001"].group == "BCN_000000"
    assert by_name["ISIC_0000002"].group == "ISIC_0000002", "an empty lesion_id groups nothing"
    manifest = build_manifest(data, seed=0)
    assert tuple(manifest.classes) == data.classes
    part_of = {name: part for part, names in manifest.parts.items() for name in names}
    for lesion in {s.group for s in data.samples}:
        parts = {part_of[Path(s.image).name] for s in data.samples if s.group == lesion}
        assert len(parts) == 1, f"lesion {lesion} is in {parts}"
    # the bundle (and so a model trained on it) carries the data's classes
    bundle = load_bundle(tmp_path, 16, tmp_path / "split.json", parts=("train",))
    assert bundle.classes == data.classes and bundle.train.classes == data.classes
    assert bundle.train.images_at([0, 1]).shape == (2, 3, 16, 16)


def test_isic2019_unk_is_a_class_when_images_have_it(tmp_path: Path) -> None:
    data = load_samples(write(tmp_path, isic2019_files({"MEL": 2, "NV": 2, "UNK": 2})))
    assert data.classes == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
    assert data.counts()["UNK"] == 2 and data.counts()["BCC"] == 0


def test_isic2019_without_metadata_and_under_labels_csv(tmp_path: Path) -> None:
    files = isic2019_files({"MEL": 2, "NV": 3}, image_dir="images")
    del files["ISIC_2019_Training_Metadata.csv"]
    files["labels.csv"] = files.pop("ISIC_2019_Training_GroundTruth.csv")  # detected by columns
    data = load_samples(write(tmp_path, files))
    assert data.format == "isic2019" and data.counts()["NV"] == 3
    assert all(s.group == Path(s.image).stem for s in data.samples)


def test_isic2019_rows_that_are_not_one_hot_are_named(tmp_path: Path) -> None:
    files = isic2019_files({"MEL": 3, "NV": 3})
    text = str(files["ISIC_2019_Training_GroundTruth.csv"]).splitlines()
    text[1] = "ISIC_0000000," + ",".join(["1.0", "1.0"] + ["0.0"] * 7)  # two classes
    text[2] = "ISIC_0000001," + ",".join(["0.0"] * 9)  # none
    text[3] = "ISIC_0000002," + ",".join(["0.5"] + ["0.0"] * 8)  # not 0/1
    files["ISIC_2019_Training_GroundTruth.csv"] = "\n".join(text) + "\n"
    with pytest.raises(LabelFileError) as e:
        load_samples(write(tmp_path, files))
    message = str(e.value)
    assert message.startswith("ISIC_2019_Training_GroundTruth.csv: 3 row(s) rejected;"), message
    assert "line 2 ISIC_0000000: MEL=1.0,NV=1.0" in message
    assert "line 3 ISIC_0000001: all 0" in message
    assert "line 4 ISIC_0000002: MEL=0.5" in message


@pytest.mark.parametrize("v2", [False, True])
def test_isic2020_binary_target_grouped_by_patient(tmp_path: Path, v2: bool) -> None:
    data = load_samples(write(tmp_path, isic2020_files(v2=v2)))
    assert data.format == "isic2020" and data.classes == ("benign", "malignant")
    assert data.counts() == {"benign": 24, "malignant": 12}
    assert {s.group for s in data.samples} == {f"IP_{p:07d}" for p in range(12)}
    manifest = build_manifest(data, seed=0)
    patient_parts: dict[str, set[str]] = {}
    groups = {Path(s.image).name: s.group for s in data.samples}
    for part, names in manifest.parts.items():
        for name in names:
            patient_parts.setdefault(groups[name], set()).add(part)
    assert all(len(p) == 1 for p in patient_parts.values()), patient_parts
    assert all(manifest.parts[p] for p in ("train", "val", "test"))


def test_isic2020_bad_target_and_missing_image_are_reported(tmp_path: Path) -> None:
    files = isic2020_files(patients=3)
    lines = str(files["ISIC_2020_Training_GroundTruth.csv"]).splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",yes"
    lines.append(lines[2].replace("ISIC_0000001", "ISIC_9999999"))
    files["ISIC_2020_Training_GroundTruth.csv"] = "\n".join(lines) + "\n"
    with pytest.raises(LabelFileError, match=r"2 row\(s\) rejected") as e:
        load_samples(write(tmp_path, files))
    assert "bad target (0 or 1) (1): line 2 ISIC_0000000: 'yes'" in str(e.value)
    assert "missing image (1): line 11 ISIC_9999999" in str(e.value)


def test_class_folders_and_unknown_label_files(tmp_path: Path) -> None:
    data = load_samples(
        write(tmp_path / "f", {"b/x.png": jpeg((1, 1, 1)), "a/y.jpg": jpeg((2, 2, 2))})
    )
    assert data.format == "class_folders" and data.classes == ("a", "b")
    write(tmp_path / "u", {"labels.csv": "file,diagnosis\nx,mel\n"})
    with pytest.raises(DataError, match=r"unknown label file layout .*see docs/datasets.md"):
        load_samples(tmp_path / "u")
    write(
        tmp_path / "m",
        {**isic2019_files({"MEL": 1, "NV": 1}), "ISIC_2019_Training_Metadata.csv": "image,age\n"},
    )
    with pytest.raises(DataError, match="missing columns image and lesion_id"):
        load_samples(tmp_path / "m")


# --------------------------------------------------------------------------- through the API
@pytest.fixture
def client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, list[str]]]:
    """An embedded deployment (SQLite, artifacts under tmp_path) whose dispatcher records jobs."""
    from app.core.settings import get_settings
    from app.db.migrate import upgrade
    from app.db.session import dispose_engines
    from app.main import create_app

    for name in ("BROKER_URL", "DPAAT_BROKER_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPAAT_DATABASE_URL", f"sqlite:///{tmp_path / 'dpaat.db'}")
    monkeypatch.setenv("DPAAT_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    dispose_engines()
    settings = get_settings()
    upgrade(settings.database_url)
    app = create_app(settings)
    sent: list[str] = []
    with TestClient(app) as c:
        app.state.dispatcher = lambda job_id, kind: sent.append(job_id)
        yield c, sent
    get_settings.cache_clear()
    dispose_engines()


def test_an_isic2019_archive_uploads_and_trains(client: tuple[TestClient, list[str]]) -> None:
    from worker import runner

    c, sent = client
    per_class = {"MEL": 8, "NV": 12, "BCC": 8}
    files = isic2019_files(per_class)
    for line in str(files["ISIC_2019_Training_GroundTruth.csv"]).splitlines()[1:]:
        assert line.count("1.0") == 1 and line.count(",") == 9  # the file's exact layout
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"ISIC_2019/{name}", data)
    r = c.post("/api/v1/datasets", files={"file": ("isic.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 201, r.text
    body = r.json()
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert body["layout"] == "isic2019" and body["classes"] == classes
    assert body["class_counts"] == {**dict.fromkeys(classes, 0), **per_class}

    config = {"epochs": 1, "image_size": 16, "batch_size": 8, "method": "standard"}
    r = c.post("/api/v1/jobs/train", json={"dataset_id": body["id"], "config": config})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    sent.remove(job_id)
    assert runner.run_train_job(job_id, "test-worker") == "succeeded"
    model_id = c.get(f"/api/v1/jobs/{job_id}").json()["result"]["model_id"]
    model = c.get(f"/api/v1/models/{model_id}").json()
    assert model["classes"] == classes, json.dumps(model)[:300]


def test_a_malformed_isic2019_archive_is_refused_with_the_rows(
    client: tuple[TestClient, list[str]],
) -> None:
    c, _ = client
    files = isic2019_files({"MEL": 8, "NV": 8})
    text = str(files["ISIC_2019_Training_GroundTruth.csv"]).replace(
        "ISIC_0000003,1.0,0.0", "ISIC_0000003,1.0,1.0", 1
    )
    files["ISIC_2019_Training_GroundTruth.csv"] = text
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    r = c.post("/api/v1/datasets", files={"file": ("isic.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(
        "ISIC_2019_Training_GroundTruth.csv: 1 row(s) rejected, nothing was stored;"
    ), detail
    assert "line 5 ISIC_0000003: MEL=1.0,NV=1.0" in detail
    assert c.get("/api/v1/datasets").json()["total"] == 0
