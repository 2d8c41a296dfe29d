"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain Python values (dicts, lists, str, numbers, None), so
loading one never unpickles an arbitrary object. NumPy's and Python's RNG states are converted to
tensors and lists for that reason.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from models.nets import Classifier, build_model

FORMAT = "dpaat-checkpoint/1"
REQUIRED_KEYS = ("format", "epoch", "config", "model_info", "model")


class CheckpointError(ValueError):
    """A file is not a readable checkpoint of this project."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> str:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, os.replace,
    fsync of the folder): a crash leaves either the old file or the new one. Returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return sha256_file(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Same guarantee as :func:`save_checkpoint` for a small text file (e.g. history.json)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Raises FileNotFoundError when there is no file and CheckpointError when the file is not a
    checkpoint of this project (corrupt, truncated, a pickle of arbitrary objects, a bare
    state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, forbidden pickle: all mean "bad file"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint written by this project's trainer")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return state


def load_trained_model(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """The trained classifier (eval mode, CPU) and its info: arch, classes, image_size, method,
    num_params, plus ``config`` (the training config dict), ``epochs_done`` and ``dataset``."""
    state = load_checkpoint(path)
    info = dict(state["model_info"])
    try:
        model = build_model(info["arch"], len(info["classes"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: model weights do not fit the recorded architecture ({e})"
        ) from e
    model.eval()
    info.update(
        config=state["config"], epochs_done=int(state["epoch"]), dataset=state.get("dataset")
    )
    return model, info


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain values (loadable with weights_only=True)."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "cuda": [],
    }
    # only when CUDA is already in use: never initialise it just to read a state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    npd = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npd["keys"].numpy().astype(np.uint32),
            npd["pos"],
            npd["has_gauss"],
            npd["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate(
        (py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"])
    )
    cuda = state.get("cuda") or []
    # a resume on another machine may have other GPUs: their states then stay as seeded
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
