"""The memory layout the attack loops run a model in, chosen by measurement and cached.

Channels-last lets oneDNN skip a reorder in every convolution for some architectures (small_cnn,
the MobileNets, EfficientNet, DenseNet: 1.2-1.5x faster forward+backward on a 1-thread x86 CPU)
and slows others (resnet18: 1.25x slower); no rule predicts which. So the first attack on a
given model, device, dtype, image shape and batch size class times a few input-gradient passes in
both layouts (a probe: one warm-up pass each, then ``ROUNDS`` alternating rounds, best CPU time
per layout) and the faster layout is kept for the rest of the process. Channels-last must win by
``MARGIN`` to be chosen: on a tie the plain contiguous layout needs no conversion.

Values do not depend on the layout, only their rounding does (the convolution kernels differ), so
results agree to float tolerance whichever layout wins. ``DPAAT_ATTACK_LAYOUT`` = ``nchw`` or
``channels_last`` forces one (bit-for-bit reruns, debugging); ``auto`` (the default) measures.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import nn

LAYOUT_ENV = "DPAAT_ATTACK_LAYOUT"
LAYOUTS = ("auto", "nchw", "channels_last")
ROUNDS = 2  # timed rounds per layout after the warm-up pass: 2 + 2 x ROUNDS passes in all
MARGIN = 0.03  # channels-last must be this much faster to be chosen

log = logging.getLogger(__name__)

# the probe's clock; tests inject one to make the measurement exact. None: the process's CPU time
# on the CPU (a neighbour's load preempts a pass but does not add to it: with a busy machine wall
# times of one pass spread by 2x), wall time on an accelerator (after a synchronize)
clock: Callable[[], float] | None = None


@dataclass(frozen=True)
class LayoutChoice:
    """A probe's outcome: the layout chosen, the best pass time in each layout (s, the probe's
    clock) and the wall time the probe itself took (s)."""

    channels_last: bool
    nchw_s: float
    channels_last_s: float
    probe_s: float


_cache: dict[Hashable, LayoutChoice] = {}


def forced() -> bool | None:
    """The layout ``DPAAT_ATTACK_LAYOUT`` forces (True: channels-last), or None for ``auto``."""
    value = os.environ.get(LAYOUT_ENV, "auto").strip().lower() or "auto"
    if value not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV} must be one of {LAYOUTS}, got {value!r}")
    return None if value == "auto" else value == "channels_last"


def model_key(model: nn.Module) -> Hashable:
    """What identifies an architecture across instances: class, ``arch`` name (our Classifier),
    parameter count and shapes' count, and the weights' dtype and memory layout (a model converted
    to channels-last runs its convolutions in it whatever the input's layout)."""
    params = list(model.parameters())
    conv = next((p for p in params if p.ndim == 4), None)
    weights = (
        None
        if conv is None
        else (conv.dtype, conv.is_contiguous(memory_format=torch.channels_last))
    )
    kind = type(model)
    arch = getattr(model, "arch", None)
    return (
        kind.__module__,
        kind.__qualname__,
        arch,
        len(params),
        sum(p.numel() for p in params),
        weights,
    )


def cache_key(model: nn.Module, x: torch.Tensor, backward: bool = True) -> Hashable:
    """Model, pass kind, device, dtype, autocast, threads, image shape and batch size class
    (powers of 2: attacks on shrinking subsets probe a few sizes, not every one)."""
    device = x.device
    return (
        model_key(model),
        backward,
        device.type,
        device.index,
        x.dtype,
        torch.is_autocast_enabled(device.type),
        torch.get_num_threads() if device.type == "cpu" else 0,
        tuple(x.shape[1:]),
        len(x).bit_length(),
    )


def cached(model: nn.Module, x: torch.Tensor, backward: bool = True) -> LayoutChoice | None:
    """The cached choice for this model and batch, if a probe has run."""
    return _cache.get(cache_key(model, x, backward))


def clear_cache() -> None:
    _cache.clear()


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def measure(x: torch.Tensor, run_pass: Callable[[torch.Tensor], object]) -> LayoutChoice:
    """Time ``run_pass`` (one forward+backward w.r.t. the input, or one forward) on ``x`` in
    both layouts."""
    timer = clock or (time.process_time if x.device.type == "cpu" else time.perf_counter)
    wall = clock or time.perf_counter
    start = wall()
    inputs = (x.contiguous(), x.contiguous(memory_format=torch.channels_last))
    for t in inputs:  # warm-up: oneDNN/cuDNN primitive creation, allocator
        run_pass(t)
    _sync(x.device)
    best = [math.inf, math.inf]
    for r in range(ROUNDS):
        for i in (0, 1) if r % 2 == 0 else (1, 0):  # alternate: a drift in load hits both
            t0 = timer()
            run_pass(inputs[i])
            _sync(x.device)
            best[i] = min(best[i], timer() - t0)
    return LayoutChoice(best[1] < best[0] * (1 - MARGIN), best[0], best[1], wall() - start)


def prefers_channels_last(
    model: nn.Module,
    x: torch.Tensor,
    run_pass: Callable[[torch.Tensor], object],
    backward: bool = True,
) -> bool:
    """Whether ``model`` runs faster on ``x`` (N, C, H, W) in channels-last: forced by the
    environment, else cached, else measured now with ``run_pass`` (a forward+backward pass, or a
    forward pass when ``backward`` is False: the two are cached apart)."""
    force = forced()
    if force is not None:
        return force
    key = cache_key(model, x, backward)
    choice = _cache.get(key)
    if choice is None:
        choice = _cache[key] = measure(x, run_pass)
        log.info(
            "attack layout for %s on %s: %s (pass: NCHW %.4fs, channels-last %.4fs; probe %.3fs)",
            getattr(model, "arch", type(model).__name__),
            tuple(x.shape),
            "channels-last" if choice.channels_last else "NCHW",
            choice.nchw_s,
            choice.channels_last_s,
            choice.probe_s,
        )
    return choice.channels_last
