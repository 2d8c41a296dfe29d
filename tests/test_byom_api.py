"""Bring your own model through the HTTP contract (ASGI app, SQLite): ONNX and torchvision/timm
uploads, each bad upload refused with a 4xx that says what to change and nothing stored, the
export endpoint, prediction on an ONNX model, and the checks of a fine-tuning request.
The worker side of the same paths runs on the real stack in tests/test_byom_fullstack.py.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from test_api import ham_files, image_bytes, zip_bytes

from app.core.settings import Settings
from app.db.migrate import upgrade
from app.db.tables import Base
from app.main import create_app

API = "/api/v1"
CLASSES = ["akiec", "bcc", "nv"]  # test_api.ham_files' classes
TINY = {"framework": "onnx", "architecture": "small_cnn", "classes": CLASSES, "image_size": 32}
SQUEEZE = {"framework": "torchvision", "architecture": "squeezenet1_1", "classes": CLASSES}


@functools.cache
def tiny_onnx(k: int = 3) -> bytes:
    from models.export import onnx_bytes
    from models.nets import build_model

    return onnx_bytes(build_model("small_cnn", k).eval(), 32)


@functools.cache
def torchvision_weights(name: str, k: int) -> bytes:
    import torchvision
    from safetensors.torch import save

    net = torchvision.models.get_model(name, weights=None, num_classes=k)
    return save({n: t.contiguous() for n, t in net.state_dict().items()})


def shrink_onnx() -> bytes:
    """A valid graph whose last operator (Shrink) onnx2torch cannot convert."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], [0.1] * 9)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["z"]),
        helper.make_node("Shrink", ["z"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [w],
    )  # fmt: skip
    return bytes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )


def external_data_onnx(tmp: Path) -> bytes:
    """The tiny graph saved with its weights in a side file (only the .onnx is uploaded)."""
    import onnx

    model = onnx.load_from_string(tiny_onnx())
    onnx.save_model(
        model, str(tmp / "ext.onnx"), save_as_external_data=True, location="ext.bin",
        size_threshold=0,
    )  # fmt: skip
    return (tmp / "ext.onnx").read_bytes()


def pickle_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


class App:
    def __init__(self, client: TestClient, root: Path) -> None:
        self.client, self.root = client, root

    def upload(self, weights: bytes, description: dict[str, Any] | str, name: str) -> Any:
        desc = description if isinstance(description, str) else json.dumps(description)
        return self.client.post(
            f"{API}/models",
            files={"weights": (name, weights, "application/octet-stream")},
            data={"description": desc},
        )

    def stored(self) -> tuple[dict[str, int], set[str]]:
        sessionmaker = self.client.app.state.sessionmaker  # type: ignore[attr-defined]
        with sessionmaker() as s:
            counts = {
                t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables
            }
        return counts, {str(p) for p in self.root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    tmp = tmp_path_factory.mktemp("byom")
    url = f"sqlite:///{tmp / 'b.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        artifact_dir=tmp / "artifacts",
        data_roots=[tmp],
        auth="off",
        predict_steps=1,
        max_upload_mb=64,
    )
    with TestClient(create_app(settings, dispatcher=lambda job_id, kind: None)) as client:
        yield App(client, tmp / "artifacts")


def _missing_image_size() -> dict[str, Any]:
    return {k: v for k, v in TINY.items() if k != "image_size"}


# (weights, file name, description, status, words the message must hold)
BAD: dict[str, tuple[Callable[[Path], bytes], str, Any, int, str]] = {
    "corrupt onnx": (lambda _t: tiny_onnx()[:3000], "m.onnx", TINY, 415, "not an ONNX model"),
    "unsupported operator": (lambda _t: shrink_onnx(), "m.onnx", TINY, 422, "Shrink"),
    "output width != classes": (lambda _t: tiny_onnx(4), "m.onnx", TINY, 422, "outputs shape"),
    "external data": (external_data_onnx, "m.onnx", TINY, 422, "external data"),
    "pickle renamed .onnx": (lambda _t: pickle_bytes(), "m.onnx", TINY, 415, "not an ONNX"),
    "unknown architecture": (
        lambda _t: torchvision_weights("squeezenet1_1", 3), "w.safetensors",
        {**SQUEEZE, "framework": "timm", "architecture": "no_such_net", "image_size": 32},
        422, "not a timm model",
    ),
    "tensor shape mismatch": (
        lambda _t: torchvision_weights("squeezenet1_1", 4), "w.safetensors",
        {**SQUEEZE, "image_size": 32}, 422, "classifier.1.weight: [4, 512, 1, 1] != [3, 512, 1, 1]",
    ),
    "description missing a field": (
        lambda _t: tiny_onnx(), "m.onnx", _missing_image_size(), 422, "image_size",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_uploads_are_refused_and_nothing_is_stored(app: App, case: str, tmp_path: Path) -> None:
    make, name, description, status, words = BAD[case]
    weights = make(tmp_path)
    before = app.stored()
    r = app.upload(weights, description, name)
    assert r.status_code == status, r.text
    assert words in json.dumps(r.json()["detail"]), r.text
    assert app.stored() == before


def test_onnx_model_is_registered_predicts_and_exports_itself(app: App) -> None:
    r = app.upload(tiny_onnx(), {**TINY, "name": "tiny onnx"}, "m.onnx")
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["weights_format"] == "onnx" and model["architecture"] == "onnx"
    assert model["info"]["onnx_max_abs_diff"] <= 1e-4 and model["info"]["framework"] == "onnx"
    r = app.client.post(
        f"{API}/models/{model['id']}/predict",
        files={"file": ("x.png", image_bytes("PNG"), "image/png")},
        params={"gradcam": "true", "cap": 2},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class"] in CLASSES and body["robustness"]["cap"] == 2
    assert body["gradcam_png"]  # the Grad-CAM layer was found in the converted graph
    r = app.client.get(f"{API}/models/{model['id']}/export", params={"format": "onnx"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert z.read("model.onnx") == tiny_onnx()
        assert json.loads(z.read("model.json"))["classes"] == CLASSES
    r = app.client.get(f"{API}/models/{model['id']}/export", params={"format": "safetensors"})
    assert r.status_code == 422 and "exports as ONNX only" in r.text
    assert app.client.get(f"{API}/models/{model['id']}/export?format=pt").status_code == 422


def test_torchvision_upload_export_and_upload_again(app: App) -> None:
    from safetensors.torch import load

    weights = torchvision_weights("squeezenet1_1", 3)
    r = app.upload(weights, {**SQUEEZE, "image_size": 32, "gradcam_layer": "features"}, "w.st")
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["architecture"] == "torchvision/squeezenet1_1"
    assert model["info"]["mean"] == [0.485, 0.456, 0.406]  # ImageNet's by default
    r = app.client.get(f"{API}/models/{model['id']}/export", params={"format": "safetensors"})
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        description = json.loads(z.read("model.json"))
        exported = z.read("model.safetensors")
    assert description["framework"] == "torchvision" and description["gradcam_layer"] == "features"
    assert load(exported).keys() == load(weights).keys()
    assert all((load(exported)[k] == v).all() for k, v in load(weights).items())
    again = app.upload(exported, description, "model.safetensors")
    assert again.status_code == 201, again.text


def test_fine_tuning_requests_are_checked_when_submitted(app: App) -> None:
    r = app.client.post(
        f"{API}/datasets", files={"file": ("d.zip", zip_bytes(ham_files()), "application/zip")}
    )
    assert r.status_code == 201, r.text
    dataset_id, seven = r.json()["id"], r.json()["classes"]  # the HAM10000 layout's 7 classes
    same = app.upload(
        torchvision_weights("squeezenet1_1", 7), {**SQUEEZE, "classes": seven, "image_size": 32},
        "w",
    )  # fmt: skip
    other = app.upload(torchvision_weights("squeezenet1_1", 3), {**SQUEEZE, "image_size": 32}, "w")
    onnx_model = app.upload(tiny_onnx(), TINY, "m.onnx")

    def submit(**body: Any) -> Any:
        return app.client.post(f"{API}/jobs/train", json={"dataset_id": dataset_id, **body})

    r = submit(init_model_id=same.json()["id"], config={"method": "dpaat", "epochs": 1})
    assert r.status_code == 201, r.text
    config = r.json()["params"]["config"]
    assert (config["lr"], config["scheduler"]) == (0.01, "onecycle")  # fine-tuning defaults
    r = submit(init_model_id=same.json()["id"], config={"lr": 0.2, "scheduler": "cosine"})
    assert r.json()["params"]["config"]["lr"] == 0.2  # what the request sets is kept
    r = submit(init_model_id=other.json()["id"])
    assert r.status_code == 422 and "set replace_head: true" in r.text
    r = submit(init_model_id=other.json()["id"], replace_head=True)
    assert r.status_code == 201, r.text
    r = submit(init_model_id=onnx_model.json()["id"])
    assert r.status_code == 422 and "ONNX model cannot be fine-tuned" in r.text
    assert submit(replace_head=True).status_code == 422
    assert submit(init_model_id="0" * 32).status_code == 404
    r = submit(pretrained="imagenet", config={"arch": "resnet18"})
    assert r.status_code == 422 and "DPAAT_PRETRAINED_DIR" in r.text


def test_imagenet_weights_come_only_from_the_administrators_directory(
    app: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.settings import get_settings
    from app.services import job_params

    monkeypatch.setenv("DPAAT_PRETRAINED_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        (tmp_path / "resnet18.safetensors").write_bytes(torchvision_weights("resnet18", 1000))
        r = app.client.post(
            f"{API}/jobs/train", json={"pretrained": "imagenet", "config": {"arch": "resnet18"}}
        )
        assert r.status_code == 201, r.text
        assert job_params.imagenet_weights("resnet18") == tmp_path / "resnet18.safetensors"
        r = app.client.post(
            f"{API}/jobs/train", json={"pretrained": "imagenet", "config": {"arch": "resnet50"}}
        )
        assert r.status_code == 422 and "no ImageNet weights for resnet50" in r.text
    finally:
        get_settings.cache_clear()
