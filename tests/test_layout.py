"""The attack loops' memory layout is chosen per model by a cached timing probe
(models/attacks/layout.py): the choice follows the measurement, the cache is hit, the probe leaves
no trace, and results do not depend on the layout that wins."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from models.attacks import layout as lay
from models.attacks import make_attack
from models.attacks.base import attack_mode, fast_layout
from models.nets import build_model
from models.training import dpaat

CL = torch.channels_last


def is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LayoutCost(nn.Module):
    """A tiny CNN whose every forward pass advances a fake clock by the cost of its input's layout,
    and records the layouts it was given."""

    def __init__(self, clock: FakeClock, nchw_s: float, cl_s: float) -> None:
        super().__init__()
        self.clock, self.cost = clock, {False: nchw_s, True: cl_s}
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(8, 3)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(is_cl(x))
        self.clock.now += self.cost[is_cl(x)]
        return self.head(self.net(x).flatten(1))


@pytest.fixture(autouse=True)
def auto_layout(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    """Measured layouts (the suite pins one), a fresh cache and a fake clock."""
    monkeypatch.setenv(lay.LAYOUT_ENV, "auto")
    clock = FakeClock()
    monkeypatch.setattr(lay, "clock", clock)
    lay.clear_cache()
    yield clock
    lay.clear_cache()


def batch(n: int = 6, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(("nchw_s", "cl_s", "want_cl"), [(1.0, 2.0, False), (2.0, 1.0, True)])
def test_the_choice_follows_the_measurement(
    auto_layout: FakeClock, nchw_s: float, cl_s: float, want_cl: bool
) -> None:
    model = LayoutCost(auto_layout, nchw_s, cl_s)
    x, _ = batch()
    out = fast_layout(x, model)
    assert is_cl(out) == want_cl and torch.equal(out, x)
    # one warm-up pass per layout, then ROUNDS alternating timed rounds
    assert len(model.seen) == 2 + 2 * lay.ROUNDS and sum(model.seen) == 1 + lay.ROUNDS
    choice = lay.cached(model, x)
    assert choice is not None and choice.channels_last == want_cl
    assert (choice.nchw_s, choice.channels_last_s) == (nchw_s, cl_s)
    assert choice.probe_s == pytest.approx((1 + lay.ROUNDS) * (nchw_s + cl_s))


def test_a_tie_keeps_the_plain_layout(auto_layout: FakeClock) -> None:
    model = LayoutCost(auto_layout, 1.0, 1.0 - lay.MARGIN / 2)  # channels-last 1.5 % faster
    assert fast_layout(batch()[0], model).is_contiguous()


def test_the_cache_is_hit_per_architecture_and_batch_size_class(auto_layout: FakeClock) -> None:
    model = LayoutCost(auto_layout, 2.0, 1.0)
    x, _ = batch(6)
    fast_layout(x, model)
    probe_passes = len(model.seen)
    assert is_cl(fast_layout(x, model)) and is_cl(fast_layout(batch(7)[0], model))  # 6, 7: 4-7
    assert len(model.seen) == probe_passes  # no new probe
    twin = LayoutCost(auto_layout, 1.0, 2.0)  # same architecture, another instance: cached
    assert is_cl(fast_layout(x, twin)) and twin.seen == []
    fast_layout(batch(12)[0], model)  # another batch size class: probed again
    fast_layout(batch(6, size=8)[0], model)  # another image size: probed again
    fast_layout(x, model, backward=False)  # a forward-only probe is cached apart
    assert len(model.seen) == 4 * probe_passes
    model.to(memory_format=CL)  # channels-last weights: another key
    fast_layout(x, model)
    assert len(model.seen) == 5 * probe_passes


def test_the_environment_forces_a_layout(
    auto_layout: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LayoutCost(auto_layout, 2.0, 1.0)
    x, _ = batch()
    monkeypatch.setenv(lay.LAYOUT_ENV, "nchw")
    assert fast_layout(x.contiguous(memory_format=CL), model).is_contiguous()
    monkeypatch.setenv(lay.LAYOUT_ENV, "channels_last")
    assert is_cl(fast_layout(x, model))
    assert model.seen == []  # no probe
    assert is_cl(fast_layout(x, model, channels_last=True)) and not is_cl(
        fast_layout(x, model, channels_last=False)
    )
    monkeypatch.setenv(lay.LAYOUT_ENV, "fastest")
    with pytest.raises(ValueError, match="DPAAT_ATTACK_LAYOUT must be one of"):
        fast_layout(x, model)


def test_the_probe_leaves_no_trace(auto_layout: FakeClock) -> None:
    """Training mode, frozen flags, BatchNorm statistics, gradients and the random number
    generator are as before, whichever pass kind probes."""
    model = LayoutCost(auto_layout, 2.0, 1.0)
    model.train()
    next(model.parameters()).requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x, _ = batch()
    with torch.no_grad():  # callers may hold no_grad (APGD's clean pass, DPAAT's bisection)
        fast_layout(x, model)
    fast_layout(x, model, backward=False)
    assert len(model.seen) == 2 * (2 + 2 * lay.ROUNDS)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "square"])
@pytest.mark.parametrize("cl_wins", [False, True])
def test_attacks_run_in_the_chosen_layout_and_return_the_callers(
    auto_layout: FakeClock, name: str, cl_wins: bool
) -> None:
    model = LayoutCost(auto_layout, 1.0 + cl_wins, 2.0 - cl_wins)
    x, y = batch(8)
    attack = make_attack(name, model, **({"n_queries": 5} if name == "square" else {"steps": 3}))
    adv = attack(x, y, 8 / 255)
    probes = len(lay._cache)  # APGD probes again for the subset it attacks when smaller
    assert probes >= 1 and model.seen.count(cl_wins) > probes * (1 + lay.ROUNDS)
    assert model.seen.count(not cl_wins) == probes * (1 + lay.ROUNDS)  # the probes' passes only
    assert adv.is_contiguous() and adv.view(len(x), -1).shape == (8, 3 * 16 * 16)  # AutoAttack
    assert is_cl(attack(x.contiguous(memory_format=CL), y, 8 / 255))  # the caller's layout


def test_square_probes_without_asking_for_a_gradient(auto_layout: FakeClock) -> None:
    class BlackBox(LayoutCost):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not torch.is_grad_enabled() and not x.requires_grad, "a gradient was asked"
            return super().forward(x)

    model = BlackBox(auto_layout, 2.0, 1.0)
    x, y = batch()
    make_attack("square", model, n_queries=4)(x, y, 8 / 255)
    assert lay.cached(model, x, backward=False) is not None and lay.cached(model, x) is None


def test_dpaat_bisection_runs_in_the_chosen_layout(auto_layout: FakeClock) -> None:
    model = LayoutCost(auto_layout, 2.0, 1.0).eval()
    x, y = batch()
    p = torch.full_like(x, 8 / 255)
    dpaat.boundary_fraction(model, x, p, y, dpaat.loss_above(0.0), steps=3)
    assert model.seen[-3:] == [True] * 3


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "square"])
def test_results_do_not_depend_on_the_layout(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The same seeded attack with each layout forced: only rounding differs, and a plain NCHW
    contiguous batch comes back either way."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 3).eval()
    x, y = batch(8, size=32)
    params = {"n_queries": 20} if name == "square" else {"steps": 5}
    out = {}
    for forced in ("nchw", "channels_last"):
        monkeypatch.setenv(lay.LAYOUT_ENV, forced)
        out[forced] = make_attack(name, model, **params)(x, y, 8 / 255)
        assert out[forced].is_contiguous()
    assert float((out["nchw"] - out["channels_last"]).abs().max()) < 1e-6
    assert float((out["nchw"] - x).abs().max()) > 4 / 255  # it did move


def test_a_real_probe_is_cheap_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real clock: a probe is 2 + 2 x ROUNDS passes, and the second call costs nothing."""
    monkeypatch.setattr(lay, "clock", None)
    model = build_model("small_cnn", 3)
    x, _ = batch(8, size=32)
    with attack_mode(model):
        first = fast_layout(x, model)
    choice = lay.cached(model, x)
    assert choice is not None and is_cl(first) == choice.channels_last
    # passes are timed in CPU time (every thread's), the probe in wall time
    cpu_per_wall = torch.get_num_threads()
    passes = 2 + 2 * lay.ROUNDS
    assert 0 < min(choice.nchw_s, choice.channels_last_s) <= choice.probe_s * cpu_per_wall / passes
    assert is_cl(fast_layout(x, model)) == choice.channels_last
