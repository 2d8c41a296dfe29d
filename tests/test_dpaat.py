"""DPAAT's state and update rules on hand-made tensors, and its batch step on a hand-built model
whose losses are known in closed form (so which samples break, and where, is known)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models.data import load_bundle
from models.training import TrainConfig, dpaat, train
from models.training.methods import DPAAT, make_method
from models.training.trainer import config_differences


# --------------------------------------------------------------------------- update rules
def test_update_radii_expand_shrink_unchanged() -> None:
    eps = torch.tensor([2.0, 2.0, 2.0, 7.5, 1.0, 3.0])
    ok = torch.tensor([True, True, False, True, True, False])
    broken = torch.tensor([False, True, True, False, True, False])
    dist = torch.tensor([0.0, 1.0, 0.5, 0.0, 0.2, 0.0])
    new = dpaat.update_radii(eps, ok, broken, dist, delta=1.0, eps_min=0.5, eps_max=8.0)
    expected = torch.tensor(
        [
            3.0,  # correct, not broken: expand by delta
            1.5,  # correct, broken: (2 + 1) / 2
            2.0,  # misclassified (even if broken): unchanged
            8.0,  # expand clipped at eps_max
            0.6,  # (1 + 0.2) / 2 = 0.6 >= eps_min
            3.0,  # misclassified, not broken: unchanged
        ]
    )
    torch.testing.assert_close(new, expected)
    # the shrink is floored at eps_min
    floored = dpaat.update_radii(
        torch.tensor([1.0]),
        torch.tensor([True]),
        torch.tensor([True]),
        torch.tensor([0.0]),
        1.0,
        0.75,
        8.0,
    )
    assert floored.tolist() == [0.75]


def test_flip_radii_moves_by_delta_within_bounds() -> None:
    eps = torch.tensor([2.0, 2.0, 0.5, 7.8])
    broken = torch.tensor([True, False, True, False])
    new = dpaat.flip_radii(eps, broken, delta=1.0, eps_min=0.0, eps_max=8.0)
    torch.testing.assert_close(new, torch.tensor([1.0, 3.0, 0.0, 8.0]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1),  # eps as a fraction of the range
            st.booleans(),
            st.booleans(),
            st.floats(0, 1),  # distance as a fraction of eps
        ),
        min_size=1,
        max_size=20,
    ),
    st.floats(0, 4),
    st.floats(0.01, 3),
    st.floats(0.01, 8),
)
def test_radii_stay_within_bounds(
    rows: list[tuple[float, bool, bool, float]], eps_min: float, delta: float, span: float
) -> None:
    eps_max = eps_min + span
    eps = torch.tensor([eps_min + r[0] * span for r in rows])
    ok = torch.tensor([r[1] for r in rows])
    broken = torch.tensor([r[2] for r in rows])
    dist = torch.tensor([r[3] for r in rows]) * eps
    for new in (
        dpaat.update_radii(eps, ok, broken, dist, delta, eps_min, eps_max),
        dpaat.flip_radii(eps, broken, delta, eps_min, eps_max),
    ):
        assert bool((new >= eps_min - 1e-5).all()) and bool((new <= eps_max + 1e-5).all())


# --------------------------------------------------------------------------- tau
def test_robust_threshold_on_known_numbers() -> None:
    # median 3, absolute deviations 2,1,0,1,97 -> MAD 1: the outlier 100 does not move tau
    assert dpaat.robust_threshold(
        torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]), z=2.0
    ) == pytest.approx(3 + 2 * 1.4826)
    # an even count takes the mean of the two middle values: median 2.5, MAD 1
    assert dpaat.robust_threshold(torch.tensor([4.0, 1.0, 3.0, 2.0]), z=1.0) == pytest.approx(
        2.5 + 1.4826
    )
    assert dpaat.robust_threshold(torch.tensor([0.7, 0.7, 0.7]), z=2.0) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        dpaat.robust_threshold(torch.zeros(0), z=2.0)


def test_next_tau_momentum_and_empty_collection() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    new = 3 + 2 * 1.4826
    assert dpaat.next_tau(1.0, losses, z=2.0) == pytest.approx(new)
    assert dpaat.next_tau(1.0, losses, z=2.0, momentum=0.25) == pytest.approx(
        0.25 * 1.0 + 0.75 * new
    )
    assert dpaat.next_tau(1.3, torch.zeros(0), z=2.0) == 1.3  # nothing collected: tau stays
    assert dpaat.initial_tau(7) == pytest.approx(math.log(7))


def test_each_tau_statistic_on_known_numbers() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    # median_mad: median 3, MAD 1 (the spec's rule, unchanged)
    assert dpaat.threshold(losses, 2.0, "median_mad") == dpaat.robust_threshold(losses, 2.0)
    # mean_std: mean 22; deviations -21 -20 -19 -18 78, squares sum 7610, std (divisor n) sqrt(1522)
    assert dpaat.threshold(losses, 2.0, "mean_std") == pytest.approx(22 + 2 * math.sqrt(1522))
    # quantile: position (n - 1) q = 3.6 between 4 and 100 -> 4 + 0.6 * 96; z plays no part
    assert dpaat.threshold(losses, 2.0, "quantile", 0.9) == pytest.approx(61.6)
    assert dpaat.threshold(losses, 7.0, "quantile", 0.5) == pytest.approx(3.0)
    # one loss: its own value for every statistic (std with divisor n is 0, not NaN)
    for statistic in ("median_mad", "mean_std", "quantile"):
        assert dpaat.threshold(torch.tensor([0.4]), 2.0, statistic) == pytest.approx(0.4)
        with pytest.raises(ValueError):
            dpaat.threshold(torch.zeros(0), 2.0, statistic)
    with pytest.raises(ValueError, match="unknown tau statistic"):
        dpaat.threshold(losses, 2.0, "mean_mad")
    # next_tau smooths whichever statistic it is given
    assert dpaat.next_tau(1.0, losses, 2.0, 0.5, "quantile", 0.5) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"tau_statistic": "mad"}, "tau_statistic 'mad' is unknown"),
        ({"tau_update": "step"}, "tau_update 'step' is unknown"),
        ({"tau_quantile": 1.0}, "tau_quantile must be in"),
        ({"tau_quantile": 0}, "tau_quantile must be in"),
        ({"tau_quantile": True}, "tau_quantile must be in"),
    ],
)
def test_unknown_tau_settings_are_refused(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**settings).validate()


def test_checkpoints_without_the_new_fields_resume_as_their_defaults() -> None:
    now = TrainConfig().to_dict()
    old = {k: v for k, v in now.items() if not k.startswith(("tau_statistic", "tau_q", "tau_u"))}
    assert config_differences(old, now) == []
    assert config_differences(old, {**now, "tau_update": "batch"}) == [
        "tau_update: saved 'epoch', now 'batch'"
    ]


# --------------------------------------------------------------------------- observer, bisection
def test_first_break_keeps_the_first_crossing_iterate() -> None:
    x = torch.zeros(3, 2)
    obs = dpaat.FirstBreak(x, torch.zeros(3, dtype=torch.long), dpaat.loss_above(0.5))
    logits = torch.zeros(3, 2)
    obs(0, x + 0.1, torch.tensor([0.9, 0.1, 0.1]), logits)  # sample 0 breaks at the start point
    obs(1, x + 0.2, torch.tensor([0.9, 0.6, 0.1]), logits)  # sample 1 breaks at step 1
    obs(2, x + 0.3, torch.tensor([0.9, 0.9, 0.4]), logits)  # sample 2 never breaks
    assert obs.broken.tolist() == [True, True, False]
    torch.testing.assert_close(obs.first[:, 0], torch.tensor([0.1, 0.2, 0.0]))


class Ramp(nn.Module):
    """Two classes; logit of class 1 = 255 * (sum(x) - 0.5) + b. For label 0 the CE is
    softplus(u) with u in 1/255 units of pixel shift, so losses are known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))  # something for the optimizer to train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = 255.0 * (x.flatten(1).sum(1) - 0.5) + self.b
        return torch.stack([torch.zeros_like(u), u], dim=1)


def at(u: float) -> float:
    """The 1-pixel input whose class-1 logit is u."""
    return 0.5 + u / 255.0


def test_bisection_finds_the_boundary_fraction() -> None:
    model = Ramp().eval()
    tau = 0.5
    u_star = math.log(math.exp(tau) - 1)  # CE(label 0) = softplus(u) crosses tau here
    x = torch.tensor([[at(-2.0)], [at(-1.0)], [at(-3.0)]])
    p = torch.tensor([[4.0], [2.0], [8.0]]) / 255
    y = torch.zeros(3, dtype=torch.long)
    exact = (u_star - torch.tensor([-2.0, -1.0, -3.0])) / torch.tensor([4.0, 2.0, 8.0])
    for steps in (5, 12):
        s = dpaat.boundary_fraction(model, x, p, y, dpaat.loss_above(tau), steps)
        assert bool((s >= exact - 1e-6).all()), "the returned fraction must still break"
        assert bool((s - exact <= 2.0**-steps + 1e-6).all()), (s, exact)
        ce = F.cross_entropy(model(x + s.view(-1, 1) * p), y, reduction="none")
        assert bool((ce > tau).all())


class Cubic(nn.Module):
    """Two classes; logit of class 1 = c * u**3 + u with u = Ramp's u: the loss along a segment is
    far from linear, so the secant's first line misses the crossing."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = 255.0 * (x.flatten(1).sum(1) - 0.5)
        v = self.c * u**3 + u
        return torch.stack([torch.zeros_like(v), v], dim=1)


@pytest.mark.parametrize("curvature", [0.0, 0.05])
def test_secant_search_breaks_and_is_as_close_as_five_bisection_steps(curvature: float) -> None:
    """With exact end losses, two secant probes land within the 1/32 of five bisection steps of
    the crossing, on the breaking side, whether the loss is linear-ish or strongly curved; and a
    wrong clean-loss estimate only costs accuracy, never the guarantee that x + s p breaks."""
    model = Cubic(curvature).eval()
    tau = 0.5
    y = torch.zeros(64, dtype=torch.long)
    u0 = -torch.linspace(0.5, 3.0, 64)  # clean points, all below the crossing
    x = (0.5 + u0 / 255.0).unsqueeze(1)
    p = torch.full((64, 1), 4.0 / 255.0)
    fine = dpaat.boundary_fraction(model, x, p, y, dpaat.loss_above(tau), 30)  # the truth

    def ce(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(z), y, reduction="none")

    start, end = ce(x), ce(x + p)
    assert bool((end > tau).all()) and bool((start < tau).all())
    s = dpaat.boundary_fraction_secant(model, x, p, y, tau, 2, start, end)
    assert bool((ce(x + s.unsqueeze(1) * p) > tau).all()), "the fraction must still break"
    assert bool((s >= fine - 1e-6).all())
    assert float((s - fine).median()) <= 1 / 32, (s - fine).median()
    # a wrong estimate of the clean loss (too high: a negative root) still returns a breaking s
    wrong = dpaat.boundary_fraction_secant(model, x, p, y, tau, 2, start + 1.0, end)
    assert bool((ce(x + wrong.unsqueeze(1) * p) > tau).all())


def test_secant_search_is_refused_where_there_is_no_loss_criterion() -> None:
    with pytest.raises(ValueError, match="boundary_search 'secant' needs a loss criterion"):
        TrainConfig(method="iaat_flip", boundary_search="secant").validate()
    with pytest.raises(ValueError, match="boundary_search must be one of"):
        TrainConfig(boundary_search="newton").validate()


def test_secant_search_shrinks_like_the_bisection_in_the_batch_step() -> None:
    """The batch step with boundary_search = "secant": B (breakable within its radius) shrinks
    half-way to the same boundary as with the bisection, within the bisection's resolution, and
    uses 2 probes instead of 5."""
    tau = 0.5
    results = {}
    for search, probes in (("bisection", 5), ("secant", 2)):
        method = adaptive(n=4, boundary_search=search, bisection_steps=probes)
        method.state.eps[:] = 4.0
        method.state.tau = tau
        x, y = ramp_batch()
        model = ModeRecorder().train()
        method.batch(model, x, y, torch.arange(4), torch.Generator().manual_seed(0))
        assert model.calls.count((False, False)) == 10 + 1 + probes
        results[search] = method.state.eps[1].item()
    d_b = math.log(math.exp(tau) - 1) + 2.0
    assert d_b / 2 + 2.0 <= results["secant"] <= (d_b + 4.0 / 32) / 2 + 2.0
    assert results["secant"] == pytest.approx(results["bisection"], abs=4.0 / 64)


# --------------------------------------------------------------------------- the batch step
def adaptive(
    method: str = "dpaat", beta: float = 0.5, n: int = 4, tau: float | None = None, **extra: Any
) -> DPAAT:
    """A per-sample-radius method (eps_max 8, delta 1, PGD-10, B = 5) for a 2-class problem."""
    settings: dict[str, Any] = {"eps_max": 8.0, "delta": 1.0, "pgd_steps": 10, "bisection_steps": 5}
    cfg = TrainConfig(method=method, beta=beta, **{**settings, **extra})
    m = make_method(cfg, num_train=n, num_classes=2, tau=tau)
    assert isinstance(m, DPAAT)
    return m


def ramp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # A: far on the right side; B: correct but breakable within eps 4; C: misclassified;
    # D: label 1, far on its side
    x = torch.tensor([[at(-10.0)], [at(-2.0)], [at(1.0)], [at(10.0)]])
    y = torch.tensor([0, 0, 0, 1])
    return x, y


def test_dpaat_batch_step_expands_shrinks_and_keeps() -> None:
    tau = 0.5
    method = adaptive(n=6)
    method.state.eps[:] = 4.0
    method.state.tau = tau
    x, y = ramp_batch()
    idx = torch.tensor([5, 1, 2, 3])  # training-set indices: sample 0 and 4 are not in the batch
    model = Ramp().train()
    out = method.batch(model, x, y, idx, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.b.grad is not None and torch.isfinite(out.loss)
    eps = method.state.eps
    # distance to the boundary of B: u from -2 up to softplus^-1(tau), in 1/255 units
    d_b = math.log(math.exp(tau) - 1) + 2.0
    assert eps[5].item() == pytest.approx(5.0)  # A: expanded
    assert d_b / 2 + 2.0 <= eps[1].item() <= (d_b + 4.0 / 32) / 2 + 2.0  # B: half-way to d
    assert eps[2].item() == 4.0  # C: misclassified, unchanged
    assert eps[3].item() == pytest.approx(5.0)  # D: expanded
    assert eps[0].item() == 4.0 and eps[4].item() == 4.0  # not in the batch
    assert out.clean_correct == 3
    # the clean losses of the correctly classified samples (A, B, D) were collected
    expected = torch.tensor([F.softplus(torch.tensor(u)).item() for u in (-10.0, -2.0, -10.0)])
    collected = method.state.collected_losses()
    torch.testing.assert_close(collected.sort().values, expected.sort().values)
    record = method.end_epoch()
    assert record["broken_frac"] == pytest.approx(2 / 4)  # B and C
    assert record["tau"] == tau
    assert record["tau_next"] == pytest.approx(dpaat.robust_threshold(expected, z=2.0), rel=1e-3)
    assert method.state.tau_history[-1] == record["tau_next"]


class BNRamp(nn.Module):
    """Ramp behind a BatchNorm: in eval mode with its initial statistics (mean 0, var 1 - eps) the
    class-1 logit is exactly Ramp's u; a train-mode forward moves the running mean towards the
    batch mean (momentum 0.9), which shifts every eval-mode logit down by about that mean."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1, affine=False, momentum=0.9)
        self.bn.running_var.fill_(1.0 - self.bn.eps)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 255.0 * (x.flatten(1).sum(1, keepdim=True) - 0.5)
        u = self.bn(v).squeeze(1) + self.b
        return torch.stack([torch.zeros_like(u), u], dim=1)


def test_shrink_uses_the_attacked_function_under_batchnorm_with_per_sample_radii() -> None:
    """Each sample is attacked within its own radius, and the bisection measures the boundary on
    the statistics the attack saw, not on those the training forward moved them to."""
    tau = 0.5
    u_star = math.log(math.exp(tau) - 1)  # softplus(u) > tau beyond here (about -0.43)
    method = adaptive(n=4)
    method.state.tau = tau
    radii = torch.tensor([1.0, 6.0, 4.0, 3.0])
    method.state.eps[:] = radii
    # B1 needs 1.57/255 to break but may only move 1/255; B2 and B3 break within their radii;
    # D (label 1, far on its side) drags the batch mean, hence the running mean, up by ~9.
    x = torch.tensor([[at(-2.0)], [at(-2.0)], [at(-1.0)], [at(40.0)]])
    y = torch.tensor([0, 0, 0, 1])
    model = BNRamp().train()
    method.batch(model, x, y, torch.arange(4), torch.Generator().manual_seed(0))
    eps = method.state.eps
    assert eps[0].item() == pytest.approx(2.0)  # B1: not broken at its own radius: expanded
    assert eps[3].item() == pytest.approx(4.0)  # D: expanded
    for i, u0 in ((1, -2.0), (2, -1.0)):  # B2, B3: half-way to the boundary of the eval function
        d = u_star - u0
        r = radii[i].item()
        assert (r + d) / 2 - 1e-4 <= eps[i].item() <= (r + d + r / 32) / 2 + 1e-4, (i, eps[i])
    # the training forwards' update of the running statistics is kept (batch means ~9 and more)
    assert model.bn.running_mean.item() > 5.0


class ModeRecorder(Ramp):
    """Ramp that records, for every forward pass, (train mode?, weights trainable under grad?)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled() and self.b.requires_grad))
        return super().forward(x)


def test_attack_and_bisection_run_in_eval_mode_and_training_in_train_mode() -> None:
    method = adaptive(n=4)
    method.state.eps[:] = 4.0
    method.state.tau = 0.5
    x, y = ramp_batch()
    model = ModeRecorder().train()
    method.batch(model, x, y, torch.arange(4), torch.Generator().manual_seed(0))
    assert model.training  # the mode is restored for the optimizer step
    train_calls = [c for c in model.calls if c[0]]
    assert train_calls == [(True, True), (True, True)]  # the clean and the adversarial forward
    # 10 PGD steps + the last iterate + 5 bisection steps for B, all in eval mode, weights frozen
    assert model.calls.count((False, False)) == 10 + 1 + 5
    assert len(model.calls) == 18


def test_amat_external_keeps_its_tau_and_iaat_flip_uses_predictions() -> None:
    x, y = ramp_batch()
    idx = torch.arange(4)
    amat = adaptive("amat_external", tau=0.5)
    amat.state.eps[:] = 4.0
    amat.batch(Ramp().train(), x, y, idx, torch.Generator().manual_seed(0))
    assert amat.state.eps[[0, 2, 3]].tolist() == [5.0, 4.0, 5.0]
    record = amat.end_epoch()
    assert record["tau"] == record["tau_next"] == 0.5

    flip = adaptive("iaat_flip")
    flip.state.eps[:] = 4.0
    flip.batch(Ramp().train(), x, y, idx, torch.Generator().manual_seed(0))
    # B flips within eps 4 (needs 2/255) and C is already wrong: both shrink by delta
    assert flip.state.eps.tolist() == [5.0, 3.0, 3.0, 5.0]
    assert flip.end_epoch()["tau"] is None


def test_beta_one_still_updates_from_the_clean_prediction() -> None:
    method = adaptive(beta=1.0)
    method.state.eps[:] = 4.0
    method.state.tau = 0.5
    x, y = ramp_batch()
    out = method.batch(Ramp().train(), x, y, torch.arange(4), torch.Generator().manual_seed(0))
    assert out.clean_correct == 3
    assert method.state.eps[2].item() == 4.0


# --------------------------------------------------------------------------- state, helpers
def test_state_round_trips_through_a_weights_only_load() -> None:
    state = dpaat.AdaptiveEpsState.create(5, delta=1.0, eps_min=0.0, eps_max=8.0, tau=math.log(3))
    state.eps = torch.tensor([0.0, 1.5, 8.0, 2.25, 3.0])
    state.tau = 0.8
    state.tau_history.append(0.8)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = dpaat.AdaptiveEpsState.create(5, delta=1.0, eps_min=0.0, eps_max=8.0, tau=math.log(3))
    other.load_state_dict(loaded)
    assert torch.equal(other.eps, state.eps)
    assert other.tau == 0.8 and other.tau_history == [math.log(3), 0.8]
    with pytest.raises(ValueError, match="shape"):
        dpaat.AdaptiveEpsState.create(4, 1.0, 0.0, 8.0, 1.0).load_state_dict(loaded)


def test_initial_radius_is_delta_clipped_to_the_range() -> None:
    assert dpaat.AdaptiveEpsState.create(3, 1.0, 0.0, 8.0, 1.0).eps.tolist() == [1.0] * 3
    assert dpaat.AdaptiveEpsState.create(2, 1.0, 2.0, 8.0, 1.0).eps.tolist() == [2.0] * 2


def test_eps_histogram_fixed_edges() -> None:
    hist = dpaat.eps_histogram(torch.tensor([0.0, 0.5, 1.0, 7.99, 8.0, 3.0]), 0.0, 8.0)
    assert hist["edges"] == [float(i) for i in range(9)]
    assert hist["counts"] == [2, 1, 0, 1, 0, 0, 0, 2]


def test_scatter_first_is_deterministic_with_repeated_indices() -> None:
    target = torch.zeros(4)
    dpaat.scatter_first(target, torch.tensor([2, 0, 2, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert target.tolist() == [2.0, 0.0, 1.0, 4.0]


# --------------------------------------------------------------------------- tau update granularity
def two_batches(method: DPAAT) -> None:
    """The ramp batch twice, as training-set samples 0-3 then 4-7 (the model is not stepped, so
    both batches have the same clean losses)."""
    x, y = ramp_batch()
    for idx in (torch.arange(4), torch.arange(4, 8)):
        method.batch(Ramp().train(), x, y, idx, torch.Generator().manual_seed(0))


def test_per_epoch_tau_stays_fixed_within_the_epoch_and_is_recomputed_at_its_end() -> None:
    method = adaptive(n=8)
    method.state.eps[:] = 4.0
    start = method.state.tau
    assert start == pytest.approx(math.log(2))
    two_batches(method)
    assert method.state.tau == start  # both batches judged with the epoch's tau
    # A (u = -10) cannot reach the ln 2 boundary within 4/255 (u <= -6): expanded in both batches
    assert method.state.eps[[0, 4]].tolist() == [5.0, 5.0]
    losses = method.state.collected_losses()
    assert len(losses) == 6
    record = method.end_epoch()
    assert record["tau"] == start and "tau_batches" not in record
    assert record["tau_next"] == dpaat.robust_threshold(losses, 2.0)
    assert method.state.tau_history == [start, record["tau_next"]]


def test_per_batch_tau_is_the_epochs_estimate_so_far() -> None:
    method = adaptive(n=8, tau_update="batch")
    method.state.eps[:] = 4.0
    start = method.state.tau
    x, y = ramp_batch()
    method.batch(Ramp().train(), x, y, torch.arange(4), torch.Generator().manual_seed(0))
    first = method.state.collected_losses()
    after_one = dpaat.robust_threshold(first, 2.0)
    # A, B and D are correct with losses softplus(-10), softplus(-2), softplus(-10): the median is
    # softplus(-10) and so is the MAD-based tau (two of three deviations are zero)
    assert method.state.tau == pytest.approx(after_one) and after_one < 1e-4
    method.batch(Ramp().train(), x, y, torch.arange(4, 8), torch.Generator().manual_seed(0))
    # the second batch was judged with the new, tiny tau: A now breaks at once and shrinks
    assert method.state.eps[0].item() == 5.0 and method.state.eps[4].item() < 4.0
    record = method.end_epoch()
    # the end-of-epoch value is the per-epoch rule on the same losses; the epoch's first tau is
    # reported as "tau", the range of the taus its batches used beside it
    assert record["tau_next"] == dpaat.robust_threshold(torch.cat([first, first]), 2.0)
    assert record["tau"] == start
    assert record["tau_batches"] == {"min": after_one, "max": start}
    assert method.state.tau_history == [start, record["tau_next"]]
    assert method.batch_taus == []


def test_per_batch_momentum_smooths_against_the_epochs_starting_tau() -> None:
    method = adaptive(n=8, tau_update="batch", tau_momentum=0.5)
    start = method.state.tau
    assert start is not None
    two_batches(method)
    losses = method.state.collected_losses()
    # not compounded batch after batch: m * tau(epoch start) + (1 - m) * estimate so far
    assert method.state.tau == pytest.approx(0.5 * start + 0.5 * dpaat.robust_threshold(losses, 2))


def test_default_tau_settings_change_nothing_and_the_others_reach_the_trainer(
    tmp_path: Path,
) -> None:
    """A short real run: explicit default knobs give the same weights, bit for bit, as none (an
    old config); mean_std and per-batch updates do reach the training loop."""
    torch.set_num_threads(1)
    data = load_bundle(None, 32, limit=48)
    base = {
        "method": "dpaat",
        "epochs": 3,
        "batch_size": 16,
        "pgd_steps": 2,
        "bisection_steps": 2,
        "image_size": 32,
        "limit": 48,
        "device": "cpu",
    }
    runs = {
        "none": {},
        "explicit": {"tau_statistic": "median_mad", "tau_quantile": 0.9, "tau_update": "epoch"},
        "mean_std": {"tau_statistic": "mean_std"},
        "batch": {"tau_update": "batch"},
    }
    weights, taus = {}, {}
    for name, extra in runs.items():
        result = train(TrainConfig.from_dict({**base, **extra}), tmp_path / name, data=data)
        weights[name] = torch.load(result.checkpoint, weights_only=True)["model"]
        taus[name] = [h["tau_next"] for h in result.history]
    assert weights["none"].keys() == weights["explicit"].keys()
    assert all(torch.equal(weights["none"][k], weights["explicit"][k]) for k in weights["none"])
    assert taus["none"] == taus["explicit"]
    assert taus["mean_std"] != taus["none"]
    # the third epoch trains on radii that the batch-wise criterion moved: other weights
    assert any(not torch.equal(weights["none"][k], weights["batch"][k]) for k in weights["none"])


# --------------------------------------------------------------------------- baselines
class TrainInputs(Ramp):
    """Ramp that keeps the input of every train-mode forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.inputs.append(x.detach().clone())
        return super().forward(x)


def test_trades_loss_is_ce_plus_beta_kl_of_clean_to_adversarial() -> None:
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x_adv)), batch mean, recomputed by hand."""
    cfg = TrainConfig(method="trades", eps_max=8.0, pgd_steps=3, trades_beta=6.0)
    method = make_method(cfg, num_train=3, num_classes=2)
    x = torch.tensor([[at(-1.0)], [at(0.5)], [at(2.0)]])
    y = torch.tensor([0, 0, 1])
    model = TrainInputs().train()
    out = method.batch(model, x, y, torch.arange(3), torch.Generator().manual_seed(0))
    clean_in, adv_in = model.inputs
    assert torch.equal(clean_in, x) and not torch.equal(adv_in, x)
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
        q = F.softmax(model(adv_in), dim=1)
        ce = F.cross_entropy(model(x), y)
    kl_pq = (p * (p.log() - q.log())).sum(1).mean()
    kl_qp = (q * (q.log() - p.log())).sum(1).mean()
    assert abs(float(kl_pq - kl_qp)) > 1e-3  # the two directions differ on this batch
    torch.testing.assert_close(out.loss.detach(), ce + 6.0 * kl_pq)
