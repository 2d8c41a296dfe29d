"""The one training loop shared by every method (see :mod:`models.training.methods`).

Each epoch draws its batch order, augmentation and attack starts from generators seeded by
``(seed, epoch)`` (:mod:`models.training.batching`), and ends by writing ``out_dir/checkpoint.pt``
atomically. A run whose ``out_dir`` already holds a checkpoint resumes from it and produces the
same weights, bit for bit, as an uninterrupted run on the same device. Cancellation
(``hooks.should_stop()``) is checked before every step and leaves the last completed epoch's
checkpoint untouched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.attacks import per_sample_ce
from models.data import DataBundle, DataError, ImageDataset, load_bundle, to_float
from models.nets import Classifier
from models.streaming import sequential_parts
from models.training import batching, dpaat, validation
from models.training.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_trained_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sha256_file,
    write_text_atomic,
)
from models.training.config import TrainConfig
from models.training.finetune import initial_model
from models.training.hooks import StopOnly, TrainingHooks
from models.training.methods import Method, make_method

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"
BEST_NAME = "best.pt"
# Settings that may change between the run and its resume: where things are, not what is trained.
# The data itself is checked through its manifest sha256 and sizes instead.
RESUME_MAY_DIFFER = ("device", "data_root", "manifest")
PROGRESS_ENV = "DPAAT_PROGRESS"  # "0" hides the progress bar, "1" shows it even without a tty
EVAL_BATCH = 256


@dataclass
class TrainResult:
    """What a call to :func:`train` ended with."""

    status: str  # "completed" | "stopped"
    checkpoint: str  # path of the last checkpoint (out_dir/checkpoint.pt)
    checkpoint_sha256: str
    epochs_done: int
    history: list[dict[str, Any]]
    model_info: dict[str, Any]  # arch, classes, image_size, method, num_params
    best_checkpoint: str = ""  # out_dir/best.pt: the best epoch by cfg.best_by (the model to use)
    best_checkpoint_sha256: str = ""
    best_epoch: int = 0
    best_by: str = ""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python; deterministic cuDNN kernels (resume must be bit-exact)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def show_progress() -> bool:
    flag = os.environ.get(PROGRESS_ENV)
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


@torch.no_grad()
def clean_metrics(
    model: nn.Module,
    data: ImageDataset,
    device: torch.device,
    autocast: bool,
    channels_last: bool,
) -> dict[str, float | None]:
    """Clean accuracy, balanced accuracy (mean recall over the classes present) and mean CE."""
    if len(data) == 0:
        return {"val_acc": None, "val_bacc": None, "val_loss": None}
    was_training = model.training
    model.eval()
    preds, losses = [], []
    parts = sequential_parts(len(data), EVAL_BATCH)
    for idx, images in zip(parts, data.batches(parts), strict=True):
        x = prepare(images.to(device), channels_last)
        y = data.labels[idx].to(device)
        with autocast_context(device, autocast):
            logits = model(x)
        preds.append(logits.argmax(1).cpu())
        losses.append(per_sample_ce(logits, y).cpu())
    model.train(was_training)
    pred, y = torch.cat(preds), data.labels
    recalls = [
        float((pred[y == c] == c).double().mean())
        for c in range(len(data.classes))
        if bool((y == c).any())
    ]
    return {
        "val_acc": float((pred == y).double().mean()),
        "val_bacc": sum(recalls) / len(recalls),
        "val_loss": float(torch.cat(losses).double().mean()),
    }


def autocast_context(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def prepare(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 batch -> float in [0, 1], in the memory format the model runs in."""
    x = to_float(images)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def reference_tau(
    model: nn.Module,
    data: ImageDataset,
    z: float,
    device: torch.device,
    statistic: str = "median_mad",
    quantile: float = 0.9,
) -> tuple[float, int]:
    """amat_external's fixed criterion: median + z * 1.4826 * MAD (or the configured statistic) of
    the reference model's clean CE on the correctly classified samples of ``data`` (the validation
    part). Returns (tau, count)."""
    model.to(device).eval()
    kept = []
    parts = sequential_parts(len(data), EVAL_BATCH)
    with torch.no_grad():
        for idx, images in zip(parts, data.batches(parts), strict=True):
            x = to_float(images.to(device))
            y = data.labels[idx].to(device)
            logits = model(x)
            kept.append(per_sample_ce(logits, y)[logits.argmax(1) == y].cpu())
    losses = torch.cat(kept) if kept else torch.zeros(0)
    if losses.numel() == 0:
        raise ValueError(
            "amat_external: the reference model classifies no validation sample correctly"
        )
    return dpaat.threshold(losses, z, statistic, quantile), int(losses.numel())


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    # a field added after the checkpoint was written counts as its default (the old behaviour)
    defaults = TrainConfig().to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    keys = sorted((set(saved) | set(now)) - set(RESUME_MAY_DIFFER))
    return [
        f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in keys
        if saved.get(k) != now.get(k)
    ]


class Run:
    """The model, optimizer, scheduler, method and history of one training run."""

    def __init__(
        self,
        cfg: TrainConfig,
        bundle: DataBundle,
        out_dir: Path,
        device: torch.device,
        reference: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.bundle, self.out_dir, self.device = cfg, bundle, out_dir, device
        self.ckpt_path = out_dir / CHECKPOINT_NAME
        self.reference = reference
        train = bundle.train
        k = len(bundle.classes)
        torch.manual_seed(cfg.seed)  # the same initial weights for every method of a seed
        model: Classifier = initial_model(cfg, list(bundle.classes)).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = self.make_optimizer()
        self.steps_per_epoch = len(batching.batches(torch.arange(len(train)), cfg.batch_size))
        self.scheduler = self.make_scheduler()
        weight = (
            batching.class_weights(train.labels, k, cfg.class_weight_power).to(device)
            if cfg.class_weights
            else None
        )
        tau = None if reference is None else float(reference["tau"])
        self.method: Method = make_method(cfg, len(train), k, weight, tau)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        self.best_path = out_dir / BEST_NAME
        self.best_by = validation.best_criterion(cfg.best_by, cfg.method)
        self.robust_idx = validation.stratified_subset(bundle.val.labels, cfg.robust_val_samples)
        self.model_info: dict[str, Any] = {
            "arch": cfg.arch,
            "classes": list(bundle.classes),
            "image_size": cfg.image_size,
            "method": cfg.method,
            "num_params": sum(p.numel() for p in model.parameters()),
        }
        self.dataset_info: dict[str, Any] = {
            "name": bundle.name,
            "manifest_sha256": bundle.manifest_sha256,
            "classes": list(bundle.classes),
            "train_size": len(train),
            "val_size": len(bundle.val),
        }

    def make_optimizer(self) -> torch.optim.Optimizer:
        c, params = self.cfg, self.model.parameters()
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        """``cosine`` steps once per epoch; ``onecycle`` once per batch (its warm-up matters in
        the first epoch, when a per-epoch step would be too coarse)."""
        c = self.cfg
        if c.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=c.epochs)
        if c.scheduler == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer,
                max_lr=c.lr,
                epochs=c.epochs,
                steps_per_epoch=self.steps_per_epoch,
                pct_start=0.3,
            )
        return None

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "model_info": self.model_info,
            "dataset": self.dataset_info,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": rng_state(),
            "method": self.method.state_dict(),
            "reference": self.reference,
            "history": self.history,
        }

    def save(self) -> str:
        sha = save_checkpoint(self.state(), self.ckpt_path)
        write_text_atomic(self.out_dir / HISTORY_NAME, json.dumps(self.history, indent=1))
        return sha

    def restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.method.load_state_dict(saved["method"])
        self.history = list(saved["history"])
        self.epoch = int(saved["epoch"])
        set_rng_state(saved["rng"])

    def result(self, status: str) -> TrainResult:
        best = self.best_path if self.best_path.is_file() else self.ckpt_path
        return TrainResult(
            status=status,
            checkpoint=str(self.ckpt_path),
            checkpoint_sha256=sha256_file(self.ckpt_path),
            epochs_done=self.epoch,
            history=[dict(r) for r in self.history],
            model_info=dict(self.model_info),
            best_checkpoint=str(best),
            best_checkpoint_sha256=sha256_file(best),
            best_epoch=best_epoch(self.history, self.best_by),
            best_by=self.best_by,
        )

    def save_best(self) -> None:
        """Copy this epoch's checkpoint to best.pt when it is the best so far (ties: the later)."""
        if best_epoch(self.history, self.best_by) == self.epoch:
            tmp = self.best_path.with_suffix(".tmp")
            shutil.copyfile(self.ckpt_path, tmp)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.best_path)

    # ------------------------------------------------------------------ training
    def fit(self, hooks: TrainingHooks) -> TrainResult:
        while self.epoch < self.cfg.epochs:
            if not self.run_epoch(hooks):
                return self.result("stopped")
        return self.result("completed")

    def run_epoch(self, hooks: TrainingHooks) -> bool:
        """Train one epoch, validate, checkpoint. False when stopped (nothing of the epoch kept)."""
        cfg, train, device = self.cfg, self.bundle.train, self.device
        e = self.epoch  # 0-based here; 1-based in history and hooks
        start = time.perf_counter()
        torch.manual_seed(batching.derived_seed(cfg.seed, e, "global"))  # dropout and the like
        order = batching.epoch_order(
            train.labels, batching.generator(cfg.seed, e, "order"), cfg.balanced_sampler
        )
        parts = batching.batches(order, cfg.batch_size)
        aug_gen = batching.generator(cfg.seed, e, "augment")
        attack_gen = batching.generator(cfg.seed, e, "attack")
        lr = float(self.optimizer.param_groups[0]["lr"])
        sums = {"loss": 0.0, "n": 0, "clean": 0, "clean_n": 0, "adv": 0, "adv_n": 0}
        metrics: dict[str, float] = {}
        self.model.train()
        bar = tqdm(
            total=len(parts),
            desc=f"{cfg.method} epoch {e + 1}/{cfg.epochs}",
            disable=not show_progress(),
            leave=False,
        )
        try:
            # the batches are read (decoded by DataLoader workers) in the order drawn above
            for step, (idx, batch) in enumerate(zip(parts, train.batches(parts), strict=True), 1):
                if hooks.should_stop():
                    return False
                images = batch.to(device)
                if cfg.augment:
                    images = batching.augment(images, aug_gen)
                x = prepare(images, cfg.channels_last)
                y = train.labels[idx].to(device)
                self.optimizer.zero_grad(set_to_none=True)
                with autocast_context(device, cfg.bf16):
                    out = self.method.batch(self.model, x, y, idx, attack_gen)
                out.loss.backward()
                self.optimizer.step()
                if cfg.scheduler == "onecycle":
                    assert self.scheduler is not None
                    self.scheduler.step()
                loss = float(out.loss.detach())
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"{cfg.method}: loss {loss} at epoch {e + 1}, step {step}; try a lower lr"
                    )
                sums["loss"] += loss * out.n
                sums["n"] += out.n
                if out.clean_correct is not None:
                    sums["clean"] += out.clean_correct
                    sums["clean_n"] += out.n
                if out.adv_correct is not None:
                    sums["adv"] += out.adv_correct
                    sums["adv_n"] += out.n
                metrics = running_metrics(sums)
                hooks.on_step(e + 1, step, len(parts), metrics)
                bar.set_postfix({k: round(v, 3) for k, v in metrics.items()}, refresh=False)
                bar.update()
        finally:
            bar.close()
        train_seconds = time.perf_counter() - start
        if self.scheduler is not None and cfg.scheduler != "onecycle":
            self.scheduler.step()
        extra = self.method.end_epoch()
        val = clean_metrics(self.model, self.bundle.val, device, cfg.bf16, cfg.channels_last)
        t_robust = time.perf_counter()
        val |= validation.robust_metrics(
            self.model, self.bundle.val, self.robust_idx, cfg.robust_val_eps,
            cfg.robust_val_steps, device,
        )  # fmt: skip
        val["robust_val_seconds"] = time.perf_counter() - t_robust
        record: dict[str, Any] = {
            "epoch": e + 1,
            "lr": lr,
            "loss": sums["loss"] / max(sums["n"], 1),
            "train_acc": metrics.get("train_acc"),
            **({"adv_acc": metrics["adv_acc"]} if "adv_acc" in metrics else {}),
            **val,
            **extra,
            "train_seconds": train_seconds,
        }
        self.epoch = e + 1
        self.history.append(record)
        record["seconds"] = time.perf_counter() - start  # before the checkpoint, so it is saved
        self.save()
        self.save_best()
        log.info("epoch %d/%d: %s", e + 1, cfg.epochs, summary(record))
        hooks.on_epoch_end(e + 1, dict(record))
        return True


def best_epoch(history: list[dict[str, Any]], best_by: str) -> int:
    """The epoch (1-based) with the highest ``best_by`` value (the later one on ties; the last
    epoch for "last" or when no epoch has the value); 0 before the first epoch."""
    if not history:
        return 0
    scored = [(r.get(best_by), r["epoch"]) for r in history]
    valid = [(v, e) for v, e in scored if isinstance(v, int | float)]
    if best_by == "last" or not valid:
        return int(history[-1]["epoch"])
    return int(max(valid)[1])


def running_metrics(sums: dict[str, float]) -> dict[str, float]:
    out = {"loss": sums["loss"] / max(sums["n"], 1)}
    if sums["clean_n"]:
        out["train_acc"] = sums["clean"] / sums["clean_n"]
    if sums["adv_n"]:
        out["adv_acc"] = sums["adv"] / sums["adv_n"]
    return out


def summary(record: dict[str, Any]) -> str:
    """One log line: scalars rounded, the eps histogram as its counts."""
    parts = []
    for k, v in record.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif k == "eps_hist":
            parts.append(f"eps_hist={v['counts']}")
        elif v is not None:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def check_data(saved: dict[str, Any], run: Run) -> None:
    before, now = saved.get("dataset") or {}, run.dataset_info
    diffs = [
        f"{k}: saved {before.get(k)!r}, now {now[k]!r}" for k in now if before.get(k) != now[k]
    ]
    if diffs:
        raise DataError(f"{run.ckpt_path} was trained on other data ({'; '.join(diffs)})")


def train(
    config: TrainConfig,
    out_dir: str | Path,
    hooks: TrainingHooks | None = None,
    data: DataBundle | None = None,
) -> TrainResult:
    """Train ``config.method`` and checkpoint ``out_dir/checkpoint.pt`` after every epoch.

    Resumes from that checkpoint when it exists (bit-exact on the same device); a checkpoint of a
    different config is an error (ValueError). ``data`` overrides loading the data named by the
    config (tests, benchmarks). With ``hooks.should_stop()`` True the run returns status "stopped"
    and the checkpoint holds the last completed epoch (epoch 0 = the initial weights).
    """
    config.validate()
    hooks = hooks or TrainingHooks()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    ckpt_path = out / CHECKPOINT_NAME
    saved = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if saved is not None:
        diffs = config_differences(saved["config"], config.to_dict())
        if diffs:
            raise ValueError(
                f"{ckpt_path} holds a run with other settings ({'; '.join(diffs)}); "
                "use another output folder or the same settings to resume"
            )
    bundle = (
        data
        if data is not None
        else load_bundle(
            config.data_root,
            config.image_size,
            config.manifest,
            seed=config.seed,
            limit=config.limit,
        )
    )
    if len(bundle.train) < 2:
        raise DataError("the training part needs at least 2 images")
    if bundle.train.image_size != config.image_size:
        raise ValueError(
            f"data is {bundle.train.image_size} px but image_size is {config.image_size}"
        )
    reference = None
    if config.method == "amat_external":
        if saved is not None:
            reference = saved["reference"]
        else:
            found = external_reference(config, out, hooks, bundle, device)
            if isinstance(found, TrainResult):
                return found  # the reference run was stopped: resume continues it
            reference = found
    run = Run(config, bundle, out, device, reference)
    if saved is not None:
        check_data(saved, run)
        run.restore(saved)
    else:
        run.save()  # epoch 0: a stop before the first epoch ends still leaves a valid checkpoint
    return run.fit(hooks)


def external_reference(
    cfg: TrainConfig, out: Path, hooks: TrainingHooks, bundle: DataBundle, device: torch.device
) -> dict[str, Any] | TrainResult:
    """amat_external's reference: ``cfg.reference_checkpoint``, or a ``standard`` model trained
    first in ``out/reference`` with the same settings (a TrainResult when that run was stopped)."""
    if cfg.reference_checkpoint is not None:
        path = Path(cfg.reference_checkpoint)
    else:
        ref_cfg = replace(cfg, method="standard", reference_checkpoint=None)
        result = train(ref_cfg, out / "reference", StopOnly(hooks), data=bundle)
        if result.status != "completed":
            return result
        path = Path(result.checkpoint)
    model, info = load_trained_model(path)
    if list(info["classes"]) != list(bundle.classes):
        raise ValueError(
            f"reference model classes {info['classes']} differ from the data's "
            f"{list(bundle.classes)}"
        )
    tau, count = reference_tau(
        model, bundle.val, cfg.z, device, cfg.tau_statistic, cfg.tau_quantile
    )
    return {"checkpoint": str(path), "sha256": sha256_file(path), "tau": tau, "val_samples": count}
