"""The training loop: every method, bit-exact resume, cancellation, checkpoints, config checks.

Runs on the generated 32 px dataset (84 training images) with small_cnn and 2-step PGD.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from models.data import DataBundle, load_bundle
from models.training import (
    METHODS,
    CheckpointError,
    TrainConfig,
    TrainingHooks,
    batching,
    dpaat,
    load_checkpoint,
    load_trained_model,
    train,
)
from models.training.trainer import TrainResult, reference_tau

LIMIT = 60


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return load_bundle(None, 32, limit=LIMIT)


def quick(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "image_size": 32,
        "limit": LIMIT,
        "epochs": 1,
        "batch_size": 32,
        "pgd_steps": 2,
        "bisection_steps": 3,
        "device": "cpu",
    }
    return TrainConfig(**{**base, **kw})


class Recorder(TrainingHooks):
    """Records calls; stops before step ``stop_at = (epoch, step)`` would run."""

    def __init__(self, stop_at: tuple[int, int] | None = None) -> None:
        self.steps: list[tuple[int, int, int]] = []
        self.epochs: list[tuple[int, dict[str, Any]]] = []
        self.stop_at = stop_at
        self.next = (1, 1)

    def on_step(
        self, epoch: int, step: int, steps_per_epoch: int, metrics: dict[str, float]
    ) -> None:
        assert all(isinstance(v, float) for v in metrics.values())
        self.steps.append((epoch, step, steps_per_epoch))
        self.next = (epoch, step + 1) if step < steps_per_epoch else (epoch + 1, 1)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        self.epochs.append((epoch, record))

    def should_stop(self) -> bool:
        return self.next == self.stop_at


def without_timings(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in history]


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert torch.equal(a["method"]["eps"], b["method"]["eps"])
    assert a["method"]["tau_history"] == b["method"]["tau_history"]
    assert without_timings(a["history"]) == without_timings(b["history"])


# --------------------------------------------------------------------------- resume and stop
def test_resume_after_a_stop_is_bit_exact(data: DataBundle, tmp_path: Path) -> None:
    cfg = quick(method="dpaat", epochs=2)
    straight = train(cfg, tmp_path / "straight", data=data)
    assert straight.status == "completed" and straight.epochs_done == 2
    # tau starts at ln K and then follows the losses collected in the previous epoch
    first, second = straight.history
    assert first["tau"] == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert second["tau"] == first["tau_next"] != first["tau"] and first["collected"] > 0

    # stop in the middle of epoch 2: its first step has already changed the weights in memory
    hooks = Recorder(stop_at=(2, 2))
    stopped = train(cfg, tmp_path / "resumed", hooks, data=data)
    assert stopped.status == "stopped" and stopped.epochs_done == 1
    assert [e for e, _ in hooks.epochs] == [1]
    saved = load_checkpoint(stopped.checkpoint)
    assert saved["epoch"] == 1 and len(saved["history"]) == 1

    resumed = train(cfg, tmp_path / "resumed", data=data)
    assert resumed.status == "completed" and resumed.epochs_done == 2
    assert_same_state(load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint))
    # the radii moved away from their initial value, so the comparison above means something
    assert not torch.all(load_checkpoint(resumed.checkpoint)["method"]["eps"] == 1.0)

    again = train(cfg, tmp_path / "resumed", data=data)  # a finished run is not trained again
    assert again.status == "completed" and again.checkpoint_sha256 == resumed.checkpoint_sha256


def test_onecycle_warms_up_within_the_epoch_and_resumes_bit_exact(
    data: DataBundle, tmp_path: Path
) -> None:
    cfg = quick(method="standard", epochs=3, batch_size=16, scheduler="onecycle", lr=0.08)
    straight = train(cfg, tmp_path / "straight", data=data)
    lrs = [r["lr"] for r in straight.history]  # the lr each epoch started with
    # per-batch steps: a low start (max_lr / 25), the peak inside the run, and an end far below
    assert lrs[0] == pytest.approx(0.08 / 25)
    assert lrs[1] > lrs[0] and lrs[1] > lrs[2]
    hooks = Recorder(stop_at=(2, 2))
    assert train(cfg, tmp_path / "resumed", hooks, data=data).status == "stopped"
    resumed = train(cfg, tmp_path / "resumed", data=data)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    per_epoch = hooks.steps[0][2]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3 * per_epoch
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_robust_validation_every_epoch_and_the_best_epoch_kept(
    data: DataBundle, tmp_path: Path
) -> None:
    cfg = quick(method="pgd_at", epochs=3, robust_val_samples=8, robust_val_steps=2)
    result = train(cfg, tmp_path, data=data)
    hist = result.history
    assert all(0 <= r["robust_val_acc"] <= 1 and r["robust_val_bacc"] is not None for r in hist)
    assert all(r["robust_val_acc"] <= r["val_acc"] + 1e-9 for r in hist)  # PGD never helps
    # auto: the adversarial methods keep their best robust epoch (ties: the later one)
    assert result.best_by == "robust_val_bacc"
    scores = [r["robust_val_bacc"] for r in hist]
    assert result.best_epoch == max(range(1, 4), key=lambda e: (scores[e - 1], e))
    best = load_checkpoint(result.best_checkpoint)
    assert best["epoch"] == result.best_epoch and len(best["history"]) == result.best_epoch
    assert result.best_checkpoint_sha256 != result.checkpoint_sha256 or result.best_epoch == 3
    # "last" keeps the last epoch; the criterion needs the robust check to be on
    last = train(quick(method="standard", epochs=2, best_by="last"), tmp_path / "last", data=data)
    assert last.best_epoch == 2 and last.best_checkpoint_sha256 == last.checkpoint_sha256
    with pytest.raises(ValueError, match="robust_val_eps"):
        quick(best_by="robust_val_acc", robust_val_eps=0.0).validate()


def test_stop_before_the_first_epoch_leaves_a_valid_checkpoint(
    data: DataBundle, tmp_path: Path
) -> None:
    hooks = Recorder(stop_at=(1, 1))
    result = train(quick(method="pgd_at"), tmp_path, hooks, data=data)
    assert result.status == "stopped" and result.epochs_done == 0 and hooks.steps == []
    model, info = load_trained_model(result.checkpoint)
    assert not model.training and info["epochs_done"] == 0
    finished = train(quick(method="pgd_at"), tmp_path, data=data)
    assert finished.status == "completed" and finished.epochs_done == 1


def test_resume_with_other_settings_is_refused(data: DataBundle, tmp_path: Path) -> None:
    train(quick(method="standard"), tmp_path, data=data)
    with pytest.raises(ValueError, match=r"lr: saved 0\.05, now 0\.1"):
        train(quick(method="standard", lr=0.1), tmp_path, data=data)
    other_data = load_bundle(None, 32, limit=LIMIT + 10)
    with pytest.raises(ValueError, match="other data"):
        train(quick(method="standard"), tmp_path, data=other_data)


# --------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_epoch(method: str, data: DataBundle, tmp_path: Path) -> None:
    hooks = Recorder()
    result = train(quick(method=method), tmp_path, hooks, data=data)
    assert result.status == "completed" and result.epochs_done == 1
    (record,) = result.history
    for key in ("loss", "val_acc", "val_bacc", "val_loss", "seconds"):
        assert isinstance(record[key], float) and torch.isfinite(torch.tensor(record[key])), key
    assert 0 <= record["val_bacc"] <= 1
    steps = len(batching.batches(torch.arange(len(data.train)), 32))
    assert hooks.steps == [(1, s, steps) for s in range(1, steps + 1)]
    assert [e for e, _ in hooks.epochs] == [1] and hooks.epochs[0][1] == record
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    assert result.model_info["method"] == method and result.model_info["num_params"] > 0
    if method in ("dpaat", "amat_external", "iaat_flip"):
        eps = load_checkpoint(result.checkpoint)["method"]["eps"]
        assert len(eps) == len(data.train)
        assert bool((eps >= 0).all()) and bool((eps <= 8).all())
        assert sum(record["eps_hist"]["counts"]) == len(data.train)
        assert record["eps_mean"] == pytest.approx(float(eps.double().mean()))
        assert 0 <= record["broken_frac"] <= 1
    if method == "amat_external":
        assert (tmp_path / "reference" / "checkpoint.pt").is_file()
        assert record["tau"] == record["tau_next"]
    if method == "pgd_at":  # adversarial-only: the clean batch is never classified
        assert record["train_acc"] is None and 0 <= record["adv_acc"] <= 1


def test_amat_external_tau_comes_from_the_reference_on_validation(
    data: DataBundle, tmp_path: Path
) -> None:
    ref = train(quick(method="standard"), tmp_path / "ref", data=data)
    cfg = quick(method="amat_external", reference_checkpoint=ref.checkpoint)
    result = train(cfg, tmp_path / "amat", data=data)
    model, _ = load_trained_model(ref.checkpoint)
    with torch.no_grad():
        logits = model(data.val.images.float() / 255)
    ok = logits.argmax(1) == data.val.labels
    losses = torch.nn.functional.cross_entropy(logits, data.val.labels, reduction="none")[ok]
    expected = dpaat.robust_threshold(losses, z=2.0)
    assert reference_tau(model, data.val, 2.0, torch.device("cpu"))[0] == pytest.approx(expected)
    (record,) = result.history
    assert record["tau"] == pytest.approx(expected) and record["tau_next"] == record["tau"]
    assert load_checkpoint(result.checkpoint)["method"]["tau_history"] == pytest.approx([expected])


def test_imbalance_options_and_memory_format_run(data: DataBundle, tmp_path: Path) -> None:
    options: list[dict[str, Any]] = [
        {"method": "standard", "class_weights": True},
        {"method": "dpaat", "balanced_sampler": True, "channels_last": True, "optimizer": "adam"},
    ]
    for i, extra in enumerate(options):
        result = train(quick(lr=0.01, **extra), tmp_path / str(i), data=data)
        assert result.status == "completed" and result.history[0]["loss"] > 0


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_plain_tensors_and_loads_as_the_trained_model(
    data: DataBundle, tmp_path: Path
) -> None:
    result = train(quick(method="standard", epochs=2), tmp_path, data=data)
    raw = torch.load(result.checkpoint, map_location="cpu", weights_only=True)  # no pickled objects
    assert raw["epoch"] == 2 and isinstance(raw["rng"]["numpy"]["keys"], torch.Tensor)
    model, info = load_trained_model(result.checkpoint)
    assert not model.training
    assert info["classes"] == list(data.classes) and info["image_size"] == 32
    assert info["config"] == quick(method="standard", epochs=2).to_dict()
    with torch.no_grad():
        pred = model(data.val.images.float() / 255).argmax(1)
    assert float((pred == data.val.labels).double().mean()) == pytest.approx(
        result.history[-1]["val_acc"]
    )


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


def test_bad_checkpoint_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"format": "dpaat-checkpoint/1", "x": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_trained_model(bare)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "fgsm_at"}, "method"),
        ({"arch": "resnet1000"}, "arch"),
        ({"eps_max": -1.0}, "eps_max"),
        ({"eps_min": 4.0, "eps_max": 2.0}, "eps_min"),
        ({"beta": 1.5}, "beta"),
        ({"tau_momentum": 1.0}, "tau_momentum"),
        ({"epochs": 0}, "epochs"),
        ({"pgd_steps": 2.5}, "pgd_steps"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 9.0}, "delta"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"device": "tpu"}, "device"),
        ({"class_weights": True, "balanced_sampler": True}, "choose one"),
        ({"method": "dpaat", "reference_checkpoint": "x.pt"}, "reference_checkpoint"),
        ({"method": "dpaat", "eps_max": 0.0}, "eps_max > 0"),
    ],
)
def test_bad_config_is_a_clear_value_error(
    changes: dict[str, Any], message: str, tmp_path: Path
) -> None:
    cfg = replace(TrainConfig(), **changes)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path)


def test_config_dict_round_trip_rejects_unknown_keys() -> None:
    cfg = TrainConfig(method="trades", eps_max=4.0, limit=100)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown training config field.*'epoch'"):
        TrainConfig.from_dict({"epoch": 3})
    TrainConfig().validate()
    assert TrainConfig().step_delta == 1.0


# --------------------------------------------------------------------------- batching
def test_augment_applies_a_seeded_symmetry_per_image() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = batching.augment(images, torch.Generator().manual_seed(1))
    again = batching.augment(images, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and torch.equal(out, again)
    used = set()
    for img, res in zip(images, out, strict=True):
        variants = [torch.rot90(v, r, dims=(-2, -1)) for v in (img, img.flip(-1)) for r in range(4)]
        matches = [i for i, v in enumerate(variants) if torch.equal(v, res)]
        assert matches, "each output is a rotation/mirror of its own input"
        used.add(matches[0])
    assert len(used) > 2  # not the same transform for the whole batch
    floats = batching.augment(images.float() / 255, torch.Generator().manual_seed(1))
    assert torch.equal((floats * 255).round().to(torch.uint8), out)


def test_epoch_order_is_derived_from_seed_and_epoch() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    a = batching.epoch_order(labels, batching.generator(0, 3, "order"))
    assert torch.equal(a, batching.epoch_order(labels, batching.generator(0, 3, "order")))
    assert not torch.equal(a, batching.epoch_order(labels, batching.generator(0, 4, "order")))
    assert sorted(a.tolist()) == list(range(100))
    balanced = batching.epoch_order(labels, batching.generator(0, 3, "order"), balanced=True)
    minority = int((labels[balanced] == 1).sum())
    assert 30 <= minority <= 70  # about half, against 10 in plain order
    torch.testing.assert_close(
        batching.class_weights(labels, 3), torch.tensor([100 / 270, 100 / 30, 0.0])
    )
    # the square root: the minority still weighs 3x more per sample, not 9x, at the same mean
    sqrt = batching.class_weights(labels, 3, power=0.5)
    torch.testing.assert_close(sqrt[1] / sqrt[0], torch.tensor(3.0))
    torch.testing.assert_close((sqrt[labels]).mean(), torch.tensor(2 / 3))
    assert [len(b) for b in batching.batches(torch.arange(65), 32)] == [32, 33]


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU on this machine: the bf16 / "
    "channels_last CUDA path is only exercised where torch.cuda.is_available()",
)
def test_cuda_bf16_channels_last_path(data: DataBundle, tmp_path: Path) -> None:
    cfg = quick(method="dpaat", device="cuda", bf16=True, channels_last=True, epochs=2)
    result: TrainResult = train(cfg, tmp_path, data=data)
    assert result.status == "completed"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    model, _ = load_trained_model(result.checkpoint)  # CUDA-trained weights load on the CPU
    assert next(model.parameters()).device.type == "cpu"
