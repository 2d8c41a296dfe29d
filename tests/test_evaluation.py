"""Evaluation: Grad-CAM and lesion focus, validity checks (each can fail), the report contract and
its renderings. A small CNN at 32 px on generated data, trained for a few dozen steps here."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.attacks import FGSM, PGD, make_attack, per_sample_ce
from models.data import TensorImageDataset, load_bundle, synthetic_dataset, to_float
from models.evaluation import (
    build_attack,
    evaluate_model,
    grad_cam,
    lesion_focus,
    plot_curve,
    render_markdown,
    write_report,
)
from models.evaluation import checks as ck
from models.evaluation.evaluate import _labels, curve_auc, worst_case
from models.evaluation.gradcam import CENTRED_GRID, cam_grid
from models.nets import Classifier, build_model

EPS = (0.0, 1.0, 2.0, 4.0, 8.0)
ATTACKS = ({"name": "fgsm"}, {"name": "pgd", "steps": 5})
CONTRACT = {
    "model": dict,
    "dataset": dict,
    "threat_model": dict,
    "clean": dict,
    "robust": dict,
    "curve_auc": float,
    "lesion_focus": dict,
    "checks": list,
    "verdict": str,
    "versions": dict,
    "timings": dict,
}
METRIC_KEYS = {"accuracy", "balanced_accuracy", "map", "auroc", "recall", "confusion_matrix"}


def _info(ds: TensorImageDataset) -> tuple[dict[str, Any], dict[str, Any]]:
    model_info = {"arch": "small_cnn", "classes": list(ds.classes), "image_size": ds.image_size,
                  "checkpoint_sha256": "0" * 64, "method": "standard"}  # fmt: skip
    dataset_info = {"name": "synthetic", "split": "test", "manifest_sha256": "synthetic"}
    return model_info, dataset_info


@pytest.fixture(scope="module")
def trained() -> tuple[Classifier, TensorImageDataset]:
    """small_cnn trained for 40 Adam steps: accurate on the generated blobs, not robust."""
    torch.manual_seed(0)
    train = synthetic_dataset(n=192, size=32, num_classes=3, seed=1)
    model = build_model("small_cnn", 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(train), (32,), generator=g)
        loss = F.cross_entropy(model(to_float(train.images[idx])), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)  # so tests can assert that evaluation leaves .grad alone
    model.eval()
    return model, synthetic_dataset(n=96, size=32, num_classes=3, seed=2)


@pytest.fixture(scope="module")
def evaluated(trained) -> tuple[dict[str, Any], list[tuple[str, float]]]:
    model, test = trained
    calls: list[tuple[str, float]] = []
    model_info, dataset_info = _info(test)
    report = evaluate_model(
        model, test, eps_list=EPS, attacks=ATTACKS, batch_size=128, model_info=model_info,
        dataset_info=dataset_info, progress=lambda s, f: calls.append((s, f)), check_samples=48,
    )  # fmt: skip
    return report, calls


def _small(ds: TensorImageDataset, n: int) -> TensorImageDataset:
    assert ds.masks is not None
    return TensorImageDataset(ds.images[:n], ds.labels[:n], ds.classes, ds.masks[:n])


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# --------------------------------------------------------------------------- bad models
class Wrapped(nn.Module):
    """Base for deliberately broken models: keeps the classifier's cam_layer."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.cam_layer = inner.cam_layer


class SoftmaxOut(Wrapped):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


class Quantised(Wrapped):
    """Rounds the input to 16 levels: a step function, so input gradients are exactly zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 16) / 16)


class StuckDropout(nn.Module):
    """Dropout that refuses eval mode (an MC-dropout style layer left on)."""

    def train(self, mode: bool = True) -> StuckDropout:
        return super().train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, self.training)


class NoisyLogits(Wrapped):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.drop = StuckDropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.inner(x))


class PlainDropout(Wrapped):
    """A correct model with dropout: fine in eval mode, random in train mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.inner(x))


class NaNGrad(Wrapped):
    """Finite outputs, NaN input gradients (d/dx sqrt(|x - x|) = 0 * inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + torch.sqrt((x - x).abs()).sum(dim=(1, 2, 3))[:, None]


class Constant(nn.Module):
    """Always predicts class 0, whatever the input."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(k))
        with torch.no_grad():
            self.bias[0] = 5.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x * 0) keeps the input gradient a dense zero tensor (PGD writes into it in place)
        return self.bias.expand(len(x), -1) + (x * 0).sum(dim=(1, 2, 3))[:, None]


class IgnoresEps:
    """An attack that perturbs its input even at eps = 0."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        return (x + 0.01).clamp(0, 1)


# --------------------------------------------------------------------------- Grad-CAM
def test_grad_cam_shape_range_and_leaves_model_alone(trained) -> None:
    model, test = trained
    x = to_float(test.images[:10])
    model.train()  # BN in train mode would update running stats on any forward
    bn = copy.deepcopy({k: v.clone() for k, v in model.state_dict().items()})
    flags = [p.requires_grad for p in model.parameters()]
    hooks = _hook_count(model)
    try:
        cam = grad_cam(model, x, batch_size=4)
        assert model.training, "grad_cam must restore the model's mode"
    finally:
        model.eval()
    assert cam.shape == (10, 32, 32) and cam.dtype == torch.float32
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert torch.allclose(cam.flatten(1).amax(1), torch.ones(10))  # normalised per image
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn.items()), "BN stats changed"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert _hook_count(model) == hooks
    # batching does not change the maps; the predicted class is the default target
    assert torch.allclose(grad_cam(model, x, batch_size=64), cam, atol=1e-5)
    pred = model(x).argmax(1)
    assert torch.allclose(grad_cam(model, x, class_idx=pred), cam, atol=1e-5)
    other = grad_cam(model, x, class_idx=(pred + 1) % 3)
    assert not torch.allclose(other, cam, atol=1e-2)


class SignedMap(nn.Module):
    """cam_layer outputs x - 0.5 (1 channel): positive on bright pixels, negative on dark ones;
    class 0's logit is its mean, class 1's the opposite."""

    def __init__(self) -> None:
        super().__init__()
        self.cam_layer = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.cam_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.cam_layer(x - 0.5).mean(dim=(2, 3))
        return torch.cat([pooled, -pooled], dim=1)


def test_grad_cam_keeps_only_positive_evidence() -> None:
    """ReLU, not |.|: the dark half counts against class 0 and must get no CAM mass."""
    x = torch.full((1, 1, 8, 8), 0.25)
    x[..., :4] = 1.0  # left half bright: mean(x - 0.5) > 0, so class 0 is predicted
    cam = grad_cam(SignedMap(), x, batch_size=1)
    assert torch.allclose(cam[0, 1:-1, :3], torch.ones(6, 3))  # away from the interpolated edge
    assert torch.equal(cam[0, :, 5:], torch.zeros(8, 3))


def test_grad_cam_removes_hook_on_error(trained) -> None:
    model, _ = trained
    hooks = _hook_count(model)
    with pytest.raises(RuntimeError):
        grad_cam(model, torch.rand(2, 5, 32, 32))  # wrong channel count fails inside forward
    assert _hook_count(model) == hooks
    with pytest.raises(ValueError, match="no Grad-CAM layer"):
        grad_cam(nn.Linear(3, 3), torch.rand(2, 3))


def test_lesion_focus_reference_values() -> None:
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 2:6] = True  # a quarter of the image
    assert torch.allclose(lesion_focus(mask.float(), mask), torch.ones(3))
    assert torch.allclose(lesion_focus(torch.ones(3, 8, 8), mask), torch.full((3,), 0.25))
    outside = (~mask).float()
    assert torch.allclose(lesion_focus(outside, mask), torch.zeros(3))
    looking = mask.float() + 0.1  # mostly on the lesion: between uniform and perfect
    f = lesion_focus(looking, mask)
    assert bool((f > 0.25).all()) and bool((f < 1).all())
    assert torch.isnan(lesion_focus(torch.zeros(3, 8, 8), mask)).all()
    with pytest.raises(ValueError, match="shape"):
        lesion_focus(torch.ones(3, 8, 8), mask[:, :4])


def test_cam_grid_is_the_explained_layers_own_map() -> None:
    """ResNet-18's last block is 2 x 2 at 64 px: too coarse to single out a centred lesion (the
    cpu64 preset), 7 x 7 at 224 px (the gpu preset)."""
    net = build_model("resnet18", 7)
    assert cam_grid(net, torch.rand(1, 3, 64, 64)) == (2, 2)
    assert cam_grid(net, torch.rand(1, 3, 224, 224)) == (7, 7)
    assert min(cam_grid(net, torch.rand(1, 3, 224, 224))) >= CENTRED_GRID
    assert net.training and all(p.requires_grad for p in net.parameters())  # state restored
    with pytest.raises(ValueError, match="no Grad-CAM layer"):
        cam_grid(nn.Linear(3, 3), torch.rand(2, 3))


def test_trained_model_looks_at_the_lesion(trained) -> None:
    model, test = trained
    assert test.masks is not None
    focus = lesion_focus(grad_cam(model, to_float(test.images)), test.masks)
    uniform = lesion_focus(torch.ones(len(test), 32, 32), test.masks)  # = mask area fraction
    assert float(focus.nanmean()) > float(uniform.mean()) + 0.03


# --------------------------------------------------------------------------- checks, unit level
def test_check_logits_flags_probabilities(trained) -> None:
    model, test = trained
    x = to_float(test.images[:32])
    with torch.no_grad():
        logits = model(x)
    assert ck.check_logits(logits, 3)["status"] == "pass"
    assert ck.check_logits(torch.log_softmax(logits, 1), 3)["status"] == "pass"
    assert ck.check_logits(torch.softmax(logits, 1), 3)["status"] == "fail"
    assert ck.check_logits(torch.sigmoid(logits), 3)["status"] == "warn"
    assert ck.check_logits(logits[:, :2], 3)["status"] == "fail"
    assert ck.check_logits(logits * float("nan"), 3)["status"] == "fail"


def test_check_eval_deterministic(trained) -> None:
    model, test = trained
    x = to_float(test.images[:16])
    assert ck.check_eval_deterministic(model, x, given_training=False)["status"] == "pass"
    assert ck.check_eval_deterministic(model, x, given_training=True)["status"] == "warn"
    noisy = NoisyLogits(model).eval()
    res = ck.check_eval_deterministic(noisy, x, given_training=False)
    assert res["status"] == "fail" and "train mode" in res["detail"] and "differ" in res["detail"]
    model.eval()


def test_check_gradients(trained) -> None:
    model, test = trained
    x, y = to_float(test.images[:16]), test.labels[:16]
    assert ck.check_gradients(model, x, y)["status"] == "pass"
    res = ck.check_gradients(Quantised(model).eval(), x, y)
    assert res["status"] == "fail" and "zero" in res["detail"]
    res = ck.check_gradients(NaNGrad(model).eval(), x, y)
    assert res["status"] == "fail" and "NaN" in res["detail"]
    assert all(p.grad is None for p in model.parameters())


def test_check_large_eps(trained) -> None:
    model, test = trained
    x, y = to_float(test.images[:24]), test.labels[:24]
    assert ck.check_large_eps(model, x, y, steps=5)["status"] == "pass"
    res = ck.check_large_eps(Constant().eval(), x, y, steps=5)
    assert res["status"] == "fail" and "64/255" in res["detail"]


def test_check_eps_zero(trained) -> None:
    model, test = trained
    x, y = to_float(test.images[:8]), test.labels[:8]
    good = {"fgsm": FGSM(model), "pgd": PGD(model, steps=2)}
    assert ck.check_eps_zero(good, x, y)["status"] == "pass"
    res = ck.check_eps_zero({**good, "bad": IgnoresEps()}, x, y)
    assert res["status"] == "fail" and "bad" in res["detail"] and "pgd" not in res["detail"]


def test_check_monotone_and_budget() -> None:
    flat = {"worst case": [(0.0, 0.9), (1.0, 0.8), (2.0, 0.8)]}
    assert ck.check_monotone(flat, 100)["status"] == "pass"
    one = {"worst case": [(0.0, 0.9), (1.0, 0.8), (2.0, 0.81)]}
    assert ck.check_monotone(one, 100)["status"] == "warn"
    res = ck.check_monotone({**flat, "pgd": [(0.0, 0.9), (1.0, 0.5), (2.0, 0.7)]}, 100)
    assert res["status"] == "fail" and "pgd" in res["detail"]
    assert ck.check_budget(0.0, 0.0)["status"] == "pass"
    assert ck.check_budget(1e-8, 0.0)["status"] == "pass"  # float rounding
    assert ck.check_budget(1 / 255, 0.0)["status"] == "fail"
    assert ck.check_budget(0.0, 0.01)["status"] == "fail"


def test_check_iterative_vs_fgsm() -> None:
    names = {"fgsm": "fgsm", "pgd": "pgd", "square": "square"}
    t, f = True, False
    ok = {
        2.0: {
            "pgd": torch.tensor([t, t, f, f]),
            "fgsm": torch.tensor([t, f, f, f]),
            "square": torch.tensor([f, f, t, f]),  # black-box: not this check's business
        }
    }
    assert ck.check_iterative_vs_fgsm(ok, names, 4)["status"] == "pass"
    weak = {2.0: {**ok[2.0], "fgsm": torch.tensor([t, f, t, t])}}  # fools 2 that PGD missed
    res = ck.check_iterative_vs_fgsm(weak, names, 4)
    assert res["status"] == "fail" and "2 sample" in res["detail"] and "2/255" in res["detail"]
    one = {2.0: {**ok[2.0], "fgsm": torch.tensor([t, f, f, t])}}  # one sample: random-start noise
    assert ck.check_iterative_vs_fgsm(one, names, 4)["status"] == "warn"
    res = ck.check_iterative_vs_fgsm({2.0: {"pgd": ok[2.0]["pgd"]}}, {"pgd": "pgd"}, 4)
    assert res["status"] == "warn" and "not checked" in res["detail"]


def test_check_black_box() -> None:
    names = {"fgsm": "fgsm", "pgd": "pgd", "square": "square"}
    n = 50
    pgd = torch.zeros(n, dtype=torch.bool)
    pgd[:10] = True
    ok = {2.0: {"fgsm": pgd.clone(), "pgd": pgd, "square": pgd[torch.randperm(n)] & pgd}}
    assert ck.check_black_box(ok, names, n)["status"] == "pass"
    masked = torch.zeros(n, dtype=torch.bool)
    masked[5:30] = True  # square fools 20 samples no white-box attack fooled
    res = ck.check_black_box({2.0: {"fgsm": pgd, "pgd": pgd, "square": masked}}, names, n)
    assert res["status"] == "fail" and "20 sample" in res["detail"]
    one = pgd.clone()
    one[40] = True
    assert (
        ck.check_black_box({2.0: {"fgsm": pgd, "pgd": pgd, "square": one}}, names, n)["status"]
        == "warn"
    )
    res = ck.check_black_box({2.0: {"pgd": pgd}}, {"pgd": "pgd"}, n)
    assert res["status"] == "warn" and "not checked" in res["detail"]


def test_verdict_is_worst_status() -> None:
    p, w, f = (ck.result(s, s, "") for s in ("pass", "warn", "fail"))
    assert ck.verdict([p, p]) == "pass"
    assert ck.verdict([p, w, p]) == "warn"
    assert ck.verdict([w, f, p]) == "fail"
    with pytest.raises(ValueError):
        ck.result("x", "ok", "")


# --------------------------------------------------------------------------- checks, end to end
@pytest.mark.parametrize(
    ("wrap", "check", "status"),
    [
        (SoftmaxOut, "returns_logits", "fail"),
        (Quantised, "gradients_finite_nonzero", "fail"),
        (NoisyLogits, "eval_mode_deterministic", "fail"),
        (PlainDropout, "eval_mode_deterministic", "warn"),  # handed over in train mode
    ],
)
def test_bad_model_fails_the_right_check(trained, wrap, check: str, status: str) -> None:
    model, test = trained
    bad = wrap(model).train(wrap is PlainDropout)
    small = _small(test, 32)
    report = evaluate_model(
        bad, small, eps_list=(0, 8), attacks=({"name": "fgsm"}, {"name": "pgd", "steps": 2}),
        gradcam=False, model_info={"classes": list(small.classes)}, dataset_info={},
        check_samples=24,
    )  # fmt: skip
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name[check]["status"] == status, by_name[check]
    assert report["verdict"] == status
    assert bad.training == (wrap is PlainDropout), "evaluate_model must restore the mode"
    if wrap is PlainDropout:  # evaluated in eval mode: dropout off, so the model itself is fine
        assert report["clean"]["accuracy"] > 0.8
    model.eval()


def test_square_exposes_gradient_masking(trained) -> None:
    """White-box attacks see zero gradients on the quantised model; the black-box one does not."""
    model, test = trained
    bad = Quantised(model).eval()
    report = evaluate_model(
        bad, _small(test, 32), eps_list=(0, 16),
        attacks=({"name": "pgd", "steps": 2}, {"name": "square", "n_queries": 60}),
        gradcam=False, model_info={}, dataset_info={}, check_samples=16,
    )  # fmt: skip
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["black_box_not_stronger"] == "fail", report["checks"]
    per_attack = report["robust"]["16"]["per_attack"]
    assert per_attack["square"]["accuracy"] < per_attack["pgd"]["accuracy"]


# --------------------------------------------------------------------------- the report
def test_report_has_the_contract_sections(evaluated, trained) -> None:
    report, _ = evaluated
    _, test = trained
    for key, typ in CONTRACT.items():
        assert isinstance(report[key], typ), key
    m = report["model"]
    assert m["architecture"] == "small_cnn" and m["classes"] == list(test.classes)
    assert m["input_size"] == 32 and m["checkpoint_sha256"] == "0" * 64
    d = report["dataset"]
    assert d["samples"] == 96 and d["split"] == "test" and d["manifest_sha256"] == "synthetic"
    assert d["class_counts"] == {"class0": 32, "class1": 32, "class2": 32}
    tm = report["threat_model"]
    assert tm["norm"] == "linf" and tm["eps"] == list(EPS) and tm["eps_unit"] == "1/255"
    assert [a["name"] for a in tm["attacks"]] == ["fgsm", "pgd"]
    assert tm["attacks"][1]["steps"] == 5
    assert METRIC_KEYS.issubset(report["clean"])
    assert set(report["robust"]) == {"0", "1", "2", "4", "8"}
    for key, r in report["robust"].items():
        assert r["eps"] == float(key) and METRIC_KEYS.issubset(r)
        assert set(r["per_attack"]) == {"fgsm", "pgd"}
        assert set(r["recall"]) == set(test.classes)
    lf = report["lesion_focus"]
    assert 0 <= lf["clean"] <= 1 and 0 <= lf["adversarial"] <= 1 and lf["eps"] == 2.0
    assert {c["status"] for c in report["checks"]} <= {"pass", "warn", "fail"}
    assert report["verdict"] == ck.verdict(report["checks"])
    v = report["versions"]
    assert {"python", "torch", "torchvision", "numpy", "dpaat", "seed"}.issubset(v)
    t = report["timings"]
    assert t["total_s"] > 0 and set(t["attacks_s"]) == {"fgsm", "pgd"}
    assert t["total_s"] >= sum(t["attacks_s"].values())


def test_report_json_round_trip(evaluated) -> None:
    report, _ = evaluated
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report


def test_robust_numbers_are_consistent(evaluated, trained) -> None:
    report, _ = evaluated
    model, test = trained
    rows = [report["robust"][k] for k in ("0", "1", "2", "4", "8")]
    accs = [r["accuracy"] for r in rows]
    assert rows[0]["accuracy"] == report["clean"]["accuracy"]
    assert all(b <= a for a, b in itertools.pairwise(accs)), accs
    assert report["clean"]["accuracy"] > 0.9 and accs[-1] < 0.6  # accurate, not robust
    for r in rows:  # the worst case is at least as strong as every single attack
        assert all(r["accuracy"] <= pa["accuracy"] + 1e-12 for pa in r["per_attack"].values())
    # cascade order: PGD first on every clean-correct sample, then FGSM on PGD's survivors only;
    # per-attack figures are cumulative, the last one is the worst case
    assert report["threat_model"]["order"] == ["pgd", "fgsm"] and report["threat_model"]["cascade"]
    at4 = report["robust"]["4"]
    assert at4["per_attack"]["fgsm"]["accuracy"] == at4["accuracy"]
    assert at4["per_attack"]["fgsm"]["attacked"] == round(at4["per_attack"]["pgd"]["accuracy"] * 96)
    # FGSM is deterministic: recompute PGD's survivors it breaks independently
    x, y = to_float(test.images), test.labels
    adv = FGSM(model)(x, y, 4 / 255)
    with torch.no_grad():
        fgsm_ok = (model(adv).argmax(1) == y) & (model(x).argmax(1) == y)
    assert at4["accuracy"] <= float(fgsm_ok.float().mean())
    pairs = zip(itertools.pairwise(EPS), itertools.pairwise(accs), strict=True)
    expected_auc = sum((e1 - e0) * (a0 + a1) / 2 for (e0, e1), (a0, a1) in pairs) / 8
    assert report["curve_auc"] == pytest.approx(expected_auc)
    by_name = {c["name"]: c["status"] for c in report["checks"]}
    assert "fail" not in by_name.values(), report["checks"]
    for name in ("returns_logits", "eval_mode_deterministic", "gradients_finite_nonzero",
                 "eps_zero_identity", "perturbation_budget", "large_eps_breaks_model"):  # fmt: skip
        assert by_name[name] == "pass", name
    assert by_name["black_box_not_stronger"] == "warn"  # no square attack in this run


def test_cascade_gives_the_same_per_sample_outcome_in_less_work(trained) -> None:
    """Every attack (random starts, restarts, targets, Square's random squares included) runs only
    on the samples still robust, and each sample ends exactly as in the uncascaded run."""
    model, test = trained
    x, y = to_float(test.images[:48]), test.labels[:48]
    specs = {
        "pgd": {"name": "pgd", "steps": 3, "restarts": 2},
        "apgd-ce": {"name": "apgd-ce", "steps": 4},
        "fgsm": {"name": "fgsm"},
        "square": {"name": "square", "n_queries": 30},
    }
    with torch.no_grad():
        logits = model(x)
    ok, loss, probs = logits.argmax(1) == y, per_sample_ce(logits, y), logits.softmax(1)
    for eps in (4.0, 8.0):
        runs = {}
        for cascade in (False, True):
            atk = {lbl: make_attack(model=model, **sp) for lbl, sp in specs.items()}
            runs[cascade] = worst_case(model, atk, x, y, eps, ok, loss, probs, cascade)
        plain, cas = runs[False], runs[True]
        assert torch.equal(plain.broken, cas.broken), eps
        assert 0 < int(cas.broken.sum()) < len(x)  # the comparison means something
        for lbl in specs:
            # the cascade only skips samples something had already fooled
            assert not bool((cas.fooled[lbl] & ~plain.fooled[lbl]).any()), lbl
        assert sum(cas.attacked.values()) < sum(plain.attacked.values())
        assert cas.attacked["pgd"] == int(ok.sum())


def test_progress_reports_stages_in_order(evaluated) -> None:
    _, calls = evaluated
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and fractions[0] >= 0 and calls[-1] == ("done", 1.0)
    stages = [s for s, _ in calls]
    assert stages.index("clean") < stages.index("attacks") < stages.index("checks")
    # a report (the worker's stop check) after every attack on every chunk and after every
    # check, so a cancellation waits for one attack, not for all of them on a chunk
    positive = [e for e in EPS if e > 0]
    assert stages.count("attacks") == len(positive) * len(ATTACKS)  # one chunk of 96
    assert stages.count("checks") >= 9


def test_evaluate_restores_train_mode_and_bn(trained) -> None:
    model, test = trained
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        report = evaluate_model(
            model, _small(test, 16), eps_list=(0, 2), attacks=({"name": "fgsm"},),
            model_info={}, dataset_info={}, check_samples=16,
        )  # fmt: skip
        assert model.training
    finally:
        model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["eval_mode_deterministic"] == "warn"


def test_bad_arguments(trained) -> None:
    model, test = trained
    kw: dict[str, Any] = {"model_info": {}, "dataset_info": {}}
    with pytest.raises(ValueError, match="eps_list"):
        evaluate_model(model, test, eps_list=(-1,), **kw)
    with pytest.raises(ValueError, match="attack"):
        evaluate_model(model, test, attacks=(), **kw)
    with pytest.raises(ValueError, match="classes"):
        evaluate_model(model, test, model_info={"classes": ["a", "b", "c"]}, dataset_info={})
    with pytest.raises(ValueError, match="nope"):
        build_attack({"name": "nope"}, model)
    assert _labels([{"name": "pgd"}, {"name": "fgsm"}, {"name": "pgd"}]) == [
        "pgd-1",
        "fgsm",
        "pgd-2",
    ]
    assert curve_auc([(0.0, 1.0), (2.0, 0.0)]) == pytest.approx(0.5)
    assert curve_auc([(2.0, 0.4)]) is None


# --------------------------------------------------------------------------- renderings
def test_write_report_files(evaluated, tmp_path: Path) -> None:
    report, _ = evaluated
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "plot"}
    assert json.loads(Path(paths["json"]).read_text()) == report
    md = Path(paths["markdown"]).read_text()
    assert "![Robustness curve](robustness_curve.png)" in md
    headings = ["Summary", "Per-class recall", "Accuracy per attack", "Validity checks"]
    for heading in [*headings, "Lesion focus", "Threat model", "Versions"]:
        assert f"## {heading}" in md, heading
    acc8 = report["robust"]["8"]["accuracy"]
    assert f"| 8 | {acc8:.3f} |" in md
    assert "| clean | " in md and "| class1 | 32 |" in md
    for c in report["checks"]:
        assert f"| {c['name']} | {c['status'].upper()} |" in md
    assert "melanoma recall" not in md  # no 'mel' class here
    png = Path(paths["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with Image.open(paths["plot"]) as im:
        assert im.size[0] >= 600 and im.size[1] >= 400
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_plot_draws_the_report_numbers(evaluated, tmp_path: Path) -> None:
    report, _ = evaluated
    drawn = plot_curve(report, tmp_path / "one.png", labels=["net"])
    rows = [report["robust"][k] for k in ("0", "1", "2", "4", "8")]
    assert drawn["net"]["eps"] == list(EPS)
    assert drawn["net"]["accuracy"] == [r["accuracy"] for r in rows]
    assert drawn["net"]["balanced_accuracy"] == [r["balanced_accuracy"] for r in rows]
    other = copy.deepcopy(report)
    for r in other["robust"].values():
        r["accuracy"] = r["accuracy"] / 2
    both = plot_curve([report, other], tmp_path / "two.png", labels=["a", "b"])
    assert both["b"]["accuracy"] == [r["accuracy"] / 2 for r in rows]
    assert (tmp_path / "two.png").stat().st_size > 10_000
    with pytest.raises(ValueError):
        plot_curve([report, other], tmp_path / "x.png", labels=["only one"])


def test_markdown_handles_missing_values(evaluated) -> None:
    report = copy.deepcopy(evaluated[0])
    report["lesion_focus"] = None
    report["robust"]["8"]["auroc"] = None
    md = render_markdown(report, plot_name=None)
    assert "Not computed" in md and "![" not in md and "None" not in md.split("## Versions")[0]


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_data_report_with_masks(ham_root: Path, tmp_path: Path) -> None:
    bundle = load_bundle(ham_root, 32, tmp_path / "manifest.json", limit=100, parts=("test",))
    test = bundle.test
    assert test.has_masks and len(test) == 100
    torch.manual_seed(0)
    model = build_model("small_cnn", len(bundle.classes)).eval()
    report = evaluate_model(
        model,
        test,
        eps_list=(0, 1, 2),
        attacks=({"name": "fgsm"}, {"name": "pgd", "steps": 3}),
        model_info={"arch": "small_cnn", "classes": list(bundle.classes), "image_size": 32},
        dataset_info={
            "name": bundle.name,
            "split": "test",
            "manifest_sha256": bundle.manifest_sha256,
        },
        check_samples=32,
    )
    lf = report["lesion_focus"]
    assert lf is not None and lf["samples"] == 100
    for key in ("clean", "adversarial"):
        assert isinstance(lf[key], float) and 0.0 <= lf[key] <= 1.0
    # recomputed from the real masks directly
    x, masks = to_float(test.images_at(slice(None))), test.masks_at(slice(None))
    focus = lesion_focus(grad_cam(model, x), masks)
    assert lf["clean"] == pytest.approx(float(focus.nanmean()), abs=1e-5)
    ok = focus[torch.isfinite(focus)]
    half = 1.959964 * float(ok.std()) / len(ok) ** 0.5
    clean_iv = lf["intervals"]["clean"]
    assert (clean_iv["low"], clean_iv["high"]) == pytest.approx(
        (lf["clean"] - half, lf["clean"] + half), abs=1e-4
    )
    assert lf["intervals"]["adversarial"]["low"] < lf["adversarial"]
    # the baseline a map that localises nothing gets, and the size of the map explained
    uniform = lesion_focus(torch.ones_like(masks, dtype=torch.float32), masks)
    assert lf["uniform_map"] == pytest.approx(float(uniform.mean()), abs=1e-5)
    assert 0.05 < lf["uniform_map"] < 0.9 and lf["cam_grid"] == list(cam_grid(model, x))
    assert report["dataset"]["name"] == "ham10000" and report["dataset"]["has_masks"]
    assert len(report["dataset"]["manifest_sha256"]) == 64
    assert set(report["clean"]["recall"]) == set(bundle.classes)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    for key in CONTRACT:
        assert key in report
    md = Path(write_report(report, tmp_path / "out")["markdown"]).read_text()
    assert "melanoma recall" in md and "uniform map" in md
    assert all(math.isfinite(r["accuracy"]) for r in report["robust"].values())
