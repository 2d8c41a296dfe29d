"""Bring your own model, without a server: torchvision/timm networks from safetensors, ONNX graphs
converted to PyTorch, the export archive, fine-tuning's initial weights and Grad-CAM's layer.

Everything is tiny (32 px, a handful of generated images, FGSM + PGD-2) so the file runs in
seconds; the same paths through the real service are in tests/test_byom_fullstack.py.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from app.schemas.models import ModelDescription
from models.api import evaluate, load_model, predict
from models.evaluation.gradcam import cam_unavailable, grad_cam
from models.export import export_archive
from models.nets import Classifier, build_model
from models.onnx_import import OnnxError, check_onnx

SEVEN = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SYNTH = ["class0", "class1", "class2"]  # the generated dataset's classes
ATTACKS = [{"name": "fgsm"}, {"name": "pgd", "steps": 2}]


def unzip(archive: bytes, into: Path) -> dict[str, Any]:
    """Extract an export archive; returns its model.json (checked against the API's schema)."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        names = sorted(z.namelist())
        assert names[0] == "model.json" and len(names) == 2, names
        z.extractall(into)
    description: dict[str, Any] = json.loads((into / "model.json").read_text())
    ModelDescription.model_validate(description)  # one schema, whoever wrote the file
    return description


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A torchvision ResNet-18 with random weights and 7 classes, saved as a user would."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    save_file(net.state_dict(), str(path))
    info = {"framework": "torchvision", "architecture": "resnet18", "classes": SEVEN}
    return path, {**info, "image_size": 32}


def test_resnet18_as_onnx_matches_the_safetensors_upload(
    resnet: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, info = resnet
    native = load_model(path, info=dict(info))
    description = unzip(export_archive(native.model, native.info, "onnx"), tmp_path)
    assert description["framework"] == "onnx" and description["classes"] == SEVEN
    summary = check_onnx(tmp_path / "model.onnx", dict(description))
    assert summary["onnx_max_abs_diff"] <= 1e-4
    converted = load_model(tmp_path / "model.onnx", info=description)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (converted.model(x) - native.model(x)).abs().max() <= 1e-4
    # white-box attacks need gradients through the converted graph
    xg = x.clone().requires_grad_(True)
    converted.model(xg).logsumexp(1).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # Grad-CAM finds a feature map in the converted graph and agrees with torchvision's layer4
    assert cam_unavailable(converted.model, x) is None
    assert (grad_cam(converted.model, x) - grad_cam(native.model, x)).abs().max() < 1e-3


def test_timm_model_from_safetensors_is_evaluated_with_lesion_focus(tmp_path: Path) -> None:
    import timm

    net = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    info = {"framework": "timm", "architecture": "resnet10t", "classes": SYNTH, "image_size": 32}
    report = evaluate(
        tmp_path / "w.safetensors", tmp_path / "eval", info=dict(info), limit=12,
        eps_list=[0, 2], attacks=ATTACKS, batch_size=16,
    )  # fmt: skip
    assert report["model"]["architecture"] == "timm/resnet10t"
    assert report["lesion_focus"] is not None and report["lesion_focus_unavailable"] is None
    assert (tmp_path / "eval" / "gradcam_montage.png").is_file()


def test_vit_gets_no_lesion_focus_and_a_reason() -> None:
    import timm

    from models.data import synthetic_dataset
    from models.evaluation import evaluate_model

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8
    )
    model = Classifier(vit, None, "timm/vit_tiny_patch16_224").eval()
    data = synthetic_dataset(n=6, size=32)
    report = evaluate_model(
        model, data, eps_list=(0.0, 1.0), attacks=({"name": "fgsm"},),
        model_info={"classes": SYNTH}, dataset_info={"name": "synthetic"},
    )  # fmt: skip
    assert report["lesion_focus"] is None
    assert "token sequence" in report["lesion_focus_unavailable"]
    loaded = type("L", (), {"model": model, "classes": SYNTH, "image_size": 32, "info": {}})()
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 90, 80)).save(png, format="PNG")
    (result,) = predict(loaded, [png.getvalue()], steps=1, eps_list=(1.0,), cap=2, gradcam=True)  # type: ignore[arg-type]
    assert result["gradcam_png"] is None and result["class"] in SYNTH


def test_native_model_with_aliased_tensors_exports_as_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file as plain_save

    model = build_model("small_cnn", 3).eval()
    with pytest.raises(RuntimeError, match="share memory"):  # the bug the export avoids
        plain_save(model.state_dict(), str(tmp_path / "plain.safetensors"))
    info = {"arch": "small_cnn", "classes": SYNTH, "image_size": 32, "method": "dpaat",
            "config": {"data_root": "/srv/secret/data"}}  # fmt: skip
    description = unzip(export_archive(model, info, "safetensors"), tmp_path)
    assert description == {
        "description_version": 1, "framework": "dpaat", "architecture": "small_cnn",
        "classes": SYNTH, "image_size": 32, "training_method": "dpaat",
    }  # fmt: skip
    assert b"/srv/secret" not in (tmp_path / "model.safetensors").read_bytes()
    back = load_model(tmp_path / "model.safetensors", info=description)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model(x), model(x))


def test_onnx_refusals_name_the_problem(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    def graph(op: str, k: int = 3) -> Any:
        w = helper.make_tensor("w", TensorProto.FLOAT, [3, k], [0.1] * (3 * k))
        nodes = [
            helper.make_node("GlobalAveragePool", ["input"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["z"]),
            helper.make_node(op, ["z"], ["logits"]),
        ]
        g = helper.make_graph(
            nodes, "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", k])],
            [w],
        )  # fmt: skip
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    info = {"classes": SYNTH, "image_size": 32}
    onnx.save(graph("Relu"), str(tmp_path / "ok.onnx"))
    assert check_onnx(tmp_path / "ok.onnx", dict(info))["onnx_max_abs_diff"] <= 1e-4
    onnx.save(graph("Shrink"), str(tmp_path / "shrink.onnx"))
    with pytest.raises(OnnxError, match=r"unsupported ONNX operator.*Shrink"):
        check_onnx(tmp_path / "shrink.onnx", dict(info))
    onnx.save(graph("Relu", k=4), str(tmp_path / "four.onnx"))
    with pytest.raises(OnnxError, match="classes: the description lists 3 classes"):
        check_onnx(tmp_path / "four.onnx", dict(info))
    with pytest.raises(OnnxError, match="image_size"):
        check_onnx(tmp_path / "ok.onnx", {**info, "image_size": 64})


def test_fine_tuning_starts_from_the_given_weights(
    resnet: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from models.training.config import TrainConfig
    from models.training.finetune import initial_model

    path, info = resnet
    source = load_model(path, info=dict(info))
    base = {"arch": "torchvision/resnet18", "image_size": 32, "init_checkpoint": str(path)}
    cfg = TrainConfig(**base, init_model=dict(info))  # type: ignore[arg-type]
    cfg.validate()
    model = initial_model(cfg, SEVEN).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source.model(x))
    with pytest.raises(ValueError, match="set replace_head"):
        initial_model(cfg, SYNTH)
    fresh = initial_model(TrainConfig(**base, init_model=dict(info), replace_head=True), SYNTH)  # type: ignore[arg-type]
    assert fresh.backbone.fc.out_features == 3
    assert torch.equal(fresh.backbone.conv1.weight, source.model.backbone.conv1.weight)
