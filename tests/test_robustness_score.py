"""The robustness score of single images: eps_star really is a flipping radius (its witness flips
the prediction inside the eps_star ball, and PGD re-run there flips it), a clearly smaller radius
mostly does not, stable_at agrees with eps_star, the score is in [0, 1], "nothing below the cap" is
reported as such, and a result does not depend on the rest of the batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_attacks import train_small_cnn
from torch import nn

from models.attacks import flip_search, robustness_score
from models.attacks.min_eps import radius_grid
from models.data import synthetic_dataset

STEPS, BISECT = 5, 3


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor]:
    ds = synthetic_dataset(n=112, size=32, num_classes=5, seed=0)
    x = ds.images.float() / 255
    model = train_small_cnn(x[:96], ds.labels[:96])
    return model, x[96:108]


@pytest.fixture(scope="module")
def scored(setup: tuple[nn.Module, torch.Tensor]) -> list[dict[str, Any]]:
    model, x = setup
    return robustness_score(model, x, steps=STEPS, bisection_steps=BISECT, return_adversarial=True)


def test_results_have_the_contract_shape(
    setup: tuple[nn.Module, torch.Tensor], scored: list[dict[str, Any]]
) -> None:
    model, x = setup
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert len(scored) == len(x)
    for r, p in zip(scored, pred, strict=True):
        assert set(r) == {"predicted", "eps_star", "stable_at", "score", "cap", "adversarial"}
        assert r["predicted"] == int(p) and r["cap"] == 16.0
        assert list(r["stable_at"]) == ["0.5", "1", "2", "4", "8"]
        assert 0.0 <= r["score"] <= 1.0
        if r["eps_star"] is None:
            assert r["score"] == 1.0 and r["adversarial"] is None
        else:
            assert 0 < r["eps_star"] <= 16.0
            assert r["score"] == pytest.approx(min(r["eps_star"] / 16.0, 1.0))
    found = [r["eps_star"] for r in scored if r["eps_star"] is not None]
    assert len(found) >= len(x) // 2 and len(set(found)) >= 3  # a trained model: a spread of radii


def test_eps_star_witness_flips_the_prediction_inside_its_ball(
    setup: tuple[nn.Module, torch.Tensor], scored: list[dict[str, Any]]
) -> None:
    model, x = setup
    for i, r in enumerate(scored):
        if r["eps_star"] is None:
            continue
        adv = r["adversarial"]
        assert float((adv - x[i]).abs().max()) <= r["eps_star"] / 255 + 1e-6
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
        with torch.no_grad():
            assert int(model(adv[None]).argmax(1)) != r["predicted"]


def test_pgd_rerun_at_eps_star_flips_and_well_below_mostly_does_not(
    setup: tuple[nn.Module, torch.Tensor], scored: list[dict[str, Any]]
) -> None:
    model, x = setup
    idx = [i for i, r in enumerate(scored) if r["eps_star"] is not None]
    pred = torch.tensor([scored[i]["predicted"] for i in idx])
    eps = torch.tensor([scored[i]["eps_star"] for i in idx]) / 255
    at, _ = flip_search(model, x[idx], pred, eps, steps=STEPS)
    below, _ = flip_search(model, x[idx], pred, eps / 2, steps=STEPS)
    assert float(at.float().mean()) >= 0.8
    assert float(below.float().mean()) <= 0.25


def test_stable_at_agrees_with_eps_star(scored: list[dict[str, Any]]) -> None:
    for r in scored:
        for key, stable in r["stable_at"].items():
            # radii up to the cap: a flip at e means eps_star <= e and eps_star <= e means the
            # witness lies in the e-ball
            assert stable == (r["eps_star"] is None or r["eps_star"] > float(key)), (key, r)
    assert any(not r["stable_at"]["8"] for r in scored)
    assert all(r["stable_at"]["0.5"] for r in scored)


def test_nothing_below_the_cap_is_reported_as_none(setup: tuple[nn.Module, torch.Tensor]) -> None:
    class Constant(nn.Module):
        """Ignores its input: no radius can flip its prediction."""

        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.tensor([0.0, 2.0, 1.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias + 0 * x.mean(dim=(1, 2, 3))[:, None]

    _, x = setup
    out = robustness_score(Constant(), x[:3], cap=8.0, eps_list=(0, 2, 32), steps=2)
    for r in out:
        assert r == {
            "predicted": 1,
            "eps_star": None,
            "stable_at": {"0": True, "2": True, "32": True},
            "score": 1.0,
            "cap": 8.0,
        }


def test_radii_above_the_cap_count_for_stable_at_only(
    setup: tuple[nn.Module, torch.Tensor], scored: list[dict[str, Any]]
) -> None:
    model, x = setup
    # a cap below every eps_star of these images, and a stable_at radius far above it
    cap = 0.25 * min(r["eps_star"] or 16.0 for r in scored)
    out = robustness_score(
        model, x[:4], cap=cap, eps_list=(cap, 64), steps=STEPS, bisection_steps=0
    )
    for r in out:
        assert r["eps_star"] is None and r["score"] == 1.0
        assert r["stable_at"][f"{cap:g}"] is True
        assert r["stable_at"]["64"] is False  # 64/255 flips anything this small model predicts


def test_result_is_deterministic_and_independent_of_the_batch(
    setup: tuple[nn.Module, torch.Tensor], scored: list[dict[str, Any]]
) -> None:
    model, x = setup
    alone = robustness_score(model, x[2:4], steps=STEPS, bisection_steps=BISECT)
    for r, full in zip(alone, scored[2:4], strict=True):
        assert {k: v for k, v in full.items() if k != "adversarial"} == r


def test_radius_grid() -> None:
    assert radius_grid(16.0, 8) == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert radius_grid(16.0, 8, (0, 3, 8, 20)) == [
        0.125,
        0.25,
        0.5,
        1.0,
        2.0,
        3.0,
        4.0,
        8.0,
        16.0,
        20.0,
    ]
    assert radius_grid(4.0, 1) == [4.0]
    grid = radius_grid(16.0, 4)
    assert len(grid) == 4 and grid[0] == pytest.approx(0.125) and grid[-1] == 16.0


def test_bad_arguments_are_rejected(setup: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = setup
    with pytest.raises(ValueError, match="cap"):
        robustness_score(model, x[:1], cap=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robustness_score(model, x[:1] + 1)
    with pytest.raises(ValueError, match="eps_list"):
        robustness_score(model, x[:1], eps_list=(-1,))
    with pytest.raises(ValueError, match="batch"):
        robustness_score(model, x[0])
    assert robustness_score(model, x[:0]) == []
