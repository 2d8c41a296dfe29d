"""Bring your own model on the real stack (Postgres, Redis, `dpaat serve`, a `dpaat worker`), the
way a hospital team would: a torchvision ResNet-18 from their notebook (random weights here, 7
classes) exported to ONNX with `dpaat export` and uploaded, evaluated, used for prediction and
audited with `dpaat audit`, matching the same network uploaded as safetensors; a timm model
audited from safetensors + model.json; DPAAT fine-tuning from the uploaded model (same classes,
and a fresh head for a dataset with fewer); the fine-tuned model exported and audited again with
the same metrics. Sized for 2 CPU cores: 32 px, a few real HAM10000 images per class, FGSM + PGD-2.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack_support import ROOT, Stack, ham_archive, running_stack
from test_audit_fullstack import _env, client

pytestmark = [pytest.mark.fullstack, pytest.mark.realdata]

HAM7 = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
PER_CLASS = 6
EVAL = {"eps_list": [0, 1], "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 2}]}
AUDIT_ARGS = ["--eps", "0,1", "--attacks", "fgsm,pgd:2", "--poll", "0.5", "--timeout", "300"]
LOOSE = ["--threshold", "balanced_accuracy>=0.0", "--threshold", "accuracy@1>=0.0"]
FINETUNE = {"method": "dpaat", "epochs": 1, "batch_size": 16, "pgd_steps": 2}


def seven_class_archive(ham_root: Path) -> bytes:
    """A class-per-folder zip of real HAM10000 images, PER_CLASS per class, one per lesion."""
    picked: dict[str, list[str]] = {c: [] for c in HAM7}
    lesions: set[str] = set()
    with (ham_root / "labels.csv").open() as f:
        for row in csv.DictReader(f):
            if len(picked[row["dx"]]) < PER_CLASS and row["lesion_id"] not in lesions:
                lesions.add(row["lesion_id"])
                picked[row["dx"]].append(row["image_id"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for dx, ids in picked.items():
            for image_id in ids:
                zf.write(ham_root / "images" / f"{image_id}.jpg", f"{dx}/{image_id}.jpg")
    return buf.getvalue()


def dpaat(*args: str) -> subprocess.CompletedProcess[str]:
    """The full `dpaat` command line (ML extra installed), as a user's notebook machine has it."""
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(postgres_url, redis_url, tmp_path_factory.mktemp("byom-fs")) as s:
        yield s


@pytest.fixture(scope="module")
def datasets(stack: Stack, ham_root: Path) -> dict[str, str]:
    """Dataset ids: ``seven`` (the 7 HAM10000 classes) and ``three`` (bkl, mel, nv)."""
    ids = {}
    archives = {"seven": seven_class_archive(ham_root), "three": ham_archive(ham_root)}
    for key, archive in archives.items():
        r = stack.http.post(
            stack.url("/datasets"), files={"file": (f"{key}.zip", archive, "application/zip")}
        )
        assert r.status_code == 201, r.text
        ids[key] = str(r.json()["id"])
    assert stack.http.get(stack.url(f"/datasets/{ids['seven']}")).json()["classes"] == HAM7
    return ids


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What a user brings: a ResNet-18 (safetensors + model.json, and the ONNX archive that
    `dpaat export` makes of it) and a timm resnet10t (safetensors + model.json)."""
    import timm
    import torch
    import torchvision
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("byom-files")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=7)
    save_file(net.state_dict(), str(tmp / "resnet18.safetensors"))
    description = {"framework": "torchvision", "architecture": "resnet18", "classes": HAM7,
                   "image_size": 32, "name": "resnet18-st"}  # fmt: skip
    (tmp / "resnet18.json").write_text(json.dumps(description))
    args = ["export", str(tmp / "resnet18.safetensors"), "--model-info", str(tmp / "resnet18.json")]
    done = dpaat(*args, "--format", "onnx", "--out", str(tmp / "onnx.zip"))
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(tmp / "onnx.zip") as z:
        z.extractall(tmp / "onnx")
    timm_net = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    save_file(timm_net.state_dict(), str(tmp / "timm.safetensors"))
    timm_description = {**description, "framework": "timm", "architecture": "resnet10t"}
    (tmp / "timm.json").write_text(json.dumps({**timm_description, "name": "resnet10t"}))
    return {
        "st": tmp / "resnet18.safetensors",
        "st_json": tmp / "resnet18.json",
        "onnx": tmp / "onnx" / "model.onnx",
        "onnx_json": tmp / "onnx" / "model.json",
        "timm": tmp / "timm.safetensors",
        "timm_json": tmp / "timm.json",
    }


def upload(stack: Stack, weights: Path, description: Path) -> dict[str, Any]:
    r = stack.http.post(
        stack.url("/models"),
        files={"weights": (weights.name, weights.read_bytes(), "application/octet-stream")},
        data={"description": description.read_text()},
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def evaluated(stack: Stack, model_id: str, dataset_id: str) -> dict[str, Any]:
    r = stack.http.post(
        stack.url("/jobs/evaluate"), json={"model_id": model_id, "dataset_id": dataset_id, **EVAL}
    )
    assert r.status_code == 201, r.text
    job = stack.wait_status(r.json()["id"], {"succeeded", "failed"}, 300)
    assert job["status"] == "succeeded", job["error"]
    report: dict[str, Any] = stack.http.get(stack.url(f"/models/{model_id}/report")).json()
    return report["report"]  # type: ignore[no-any-return]


def accuracies(report: dict[str, Any]) -> dict[str, Any]:
    """The figures two runs of the same network must agree on exactly."""
    return {
        "clean": (report["clean"]["accuracy"], report["clean"]["balanced_accuracy"]),
        "robust": {k: (v["accuracy"], v["per_attack"]) for k, v in report["robust"].items()},
    }


def predict(stack: Stack, model_id: str, image: bytes) -> dict[str, Any]:
    r = stack.http.post(
        stack.url(f"/models/{model_id}/predict"),
        files={"file": ("x.jpg", image, "image/jpeg")},
        params={"cap": 2, "gradcam": "true"},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def audit_upload(
    stack: Stack, weights: Path, description: Path, dataset_id: str, out: Path
) -> dict[str, Any]:
    args = ["audit", "--weights", str(weights), "--model-info", str(description)]
    args += ["--dataset", dataset_id, *AUDIT_ARGS, *LOOSE, "--out", str(out)]
    result = client(args, _env(stack))
    assert result.returncode == 0, result.stderr[-3000:]
    doc: dict[str, Any] = json.loads((out / "audit.json").read_text())
    return doc


def test_onnx_resnet18_matches_its_safetensors_twin_evaluated_predicted_and_audited(
    stack: Stack, datasets: dict[str, str], files: dict[str, Path], ham_root: Path, tmp_path: Path
) -> None:
    st = upload(stack, files["st"], files["st_json"])
    onnx = upload(stack, files["onnx"], files["onnx_json"])
    assert onnx["weights_format"] == "onnx" and onnx["info"]["onnx_max_abs_diff"] <= 1e-4
    st_report = evaluated(stack, st["id"], datasets["seven"])
    onnx_report = evaluated(stack, onnx["id"], datasets["seven"])
    assert accuracies(onnx_report) == accuracies(st_report)
    # Grad-CAM found a layer in the ONNX graph (class folders have no masks: no focus score)
    assert onnx_report["lesion_focus_unavailable"] is None
    image = next((ham_root / "images").glob("*.jpg")).read_bytes()
    a, b = predict(stack, st["id"], image), predict(stack, onnx["id"], image)
    assert a["class"] == b["class"] and b["gradcam_png"]
    assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in HAM7) <= 1e-4
    doc = audit_upload(stack, files["onnx"], files["onnx_json"], datasets["seven"], tmp_path / "a")
    assert doc["audit"]["passed"] is True
    assert accuracies(doc) == accuracies(st_report)


def test_timm_model_uploaded_as_safetensors_is_audited(
    stack: Stack, datasets: dict[str, str], files: dict[str, Path], tmp_path: Path
) -> None:
    doc = audit_upload(stack, files["timm"], files["timm_json"], datasets["seven"], tmp_path / "a")
    assert doc["audit"]["passed"] is True
    assert doc["model"]["architecture"] == "timm/resnet10t"
    assert doc["lesion_focus_unavailable"] is None


def _train(stack: Stack, **body: Any) -> dict[str, Any]:
    r = stack.http.post(stack.url("/jobs/train"), json=body)
    assert r.status_code == 201, r.text
    job = stack.wait_status(r.json()["id"], {"succeeded", "failed"}, 300)
    assert job["status"] == "succeeded", job["error"]
    return job


def _weights(stack: Stack, model_id: str) -> dict[str, Any]:
    from safetensors.torch import load

    r = stack.http.get(stack.url(f"/models/{model_id}/export"), params={"format": "safetensors"})
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        return {"description": json.loads(z.read("model.json")),
                "state": load(z.read("model.safetensors")), "zip": r.content}  # fmt: skip


def test_dpaat_fine_tuning_from_an_uploaded_model_then_export_and_audit(
    stack: Stack, datasets: dict[str, str], files: dict[str, Path], tmp_path: Path
) -> None:
    source = upload(stack, files["st"], files["st_json"])
    job = _train(stack, dataset_id=datasets["seven"], init_model_id=source["id"], config=FINETUNE)
    assert job["params"]["config"]["lr"] == 0.01  # the fine-tuning default
    tuned = job["result"]["model_id"]
    before, after = _weights(stack, source["id"]), _weights(stack, tuned)
    assert after["description"]["framework"] == "torchvision"
    assert after["description"]["training_method"] == "dpaat"
    assert before["state"].keys() == after["state"].keys()
    changed = [k for k, v in before["state"].items() if not (after["state"][k] == v).all()]
    assert "fc.weight" in changed and "conv1.weight" in changed
    # a dataset with fewer classes: a clear 422, unless the head is replaced
    r = stack.http.post(
        stack.url("/jobs/train"),
        json={"dataset_id": datasets["three"], "init_model_id": source["id"], "config": FINETUNE},
    )
    assert r.status_code == 422 and "replace_head" in r.text
    job3 = _train(
        stack, dataset_id=datasets["three"], init_model_id=source["id"], replace_head=True,
        config=FINETUNE,
    )  # fmt: skip
    three = _weights(stack, job3["result"]["model_id"])
    assert three["description"]["classes"] == ["bkl", "mel", "nv"]
    assert list(three["state"]["fc.weight"].shape) == [3, 512]
    # the service's model, exported and audited as an upload: the same metrics as audited in place
    registered = tmp_path / "registered"
    args = ["audit", "--model", tuned, "--dataset", datasets["seven"], *AUDIT_ARGS, *LOOSE]
    result = client([*args, "--out", str(registered)], _env(stack))
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(io.BytesIO(after["zip"])) as z:
        z.extractall(tmp_path / "export")
    doc = audit_upload(
        stack, tmp_path / "export" / "model.safetensors", tmp_path / "export" / "model.json",
        datasets["seven"], tmp_path / "exported",
    )  # fmt: skip
    in_place = json.loads((registered / "audit.json").read_text())
    assert accuracies(doc) == accuracies(in_place)
    # `dpaat export MODEL_ID --server`: the robust model as ONNX, accepted back by the server
    out = tmp_path / "robust.zip"
    args = ["export", tuned, "--server", stack.base_url, "--key", stack.api_key, "--format", "onnx"]
    done = dpaat(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(out) as z:
        z.extractall(tmp_path / "robust")
    assert json.loads((tmp_path / "robust" / "model.json").read_text())["framework"] == "onnx"
    upload(stack, tmp_path / "robust" / "model.onnx", tmp_path / "robust" / "model.json")
