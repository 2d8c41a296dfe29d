"""Attacks: the contract every attack keeps (eps ball per sample, [0, 1], eps = 0 identity, loss
goes up, BatchNorm statistics and model state untouched), differential tests against torchattacks
(an independent implementation), APGD's schedule and losses, Square's black-box budget, and the
registry. Small on purpose: small_cnn, 32 px generated images, a few dozen training steps."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from models.attacks import (
    APGDCE,
    APGDDLR,
    APGDT,
    ATTACKS,
    FGSM,
    PGD,
    Square,
    make_attack,
    per_sample_ce,
    pgd_steps,
)
from models.attacks.apgd import apgd_run, checkpoints, dlr_loss, halve_step, targeted_dlr_loss
from models.attacks.base import attack_mode, fast_layout
from models.attacks.square import p_fraction
from models.data import synthetic_dataset
from models.nets import build_model

K = 5  # classes: APGD-T needs at least 4
FAST = {  # small budgets: every attack at a few passes
    "fgsm": {},
    "pgd": {"steps": 4},
    "apgd-ce": {"steps": 4},
    "apgd-dlr": {"steps": 4},
    "apgd-t": {"steps": 3, "n_target_classes": 2},
    "square": {"n_queries": 12},
}


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    ds = synthetic_dataset(n=160, size=32, num_classes=K, seed=0)
    return ds.images.float() / 255, ds.labels


def train_small_cnn(x: torch.Tensor, y: torch.Tensor, steps: int = 15) -> nn.Module:
    """small_cnn after a few Adam steps on ``x``, then BatchNorm statistics re-estimated on ``x``
    (a few dozen steps leave the running averages far from the data): accurate on clean inputs,
    fragile at a few /255."""
    torch.manual_seed(0)
    model = build_model("small_cnn", int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (16,), generator=g)
        loss = per_sample_ce(model(x[i]), y[i]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the next pass
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained(data: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    return train_small_cnn(data[0][:96], data[1][:96])


@pytest.fixture()
def test_batch(data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data
    return x[96:128], y[96:128]  # not used for training


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return per_sample_ce(model(x), y)


def test_trained_model_is_accurate_but_not_robust(
    trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """The premise of the strength tests below."""
    x, y = test_batch
    assert _accuracy(trained, x, y) >= 0.9
    assert _accuracy(trained, PGD(trained, steps=5)(x, y, 16 / 255), y) <= 0.5


# ---------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", sorted(FAST))
def test_attack_contract(
    name: str, trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = test_batch[0][:20], test_batch[1][:20]
    eps = torch.linspace(0, 12, len(x)) / 255  # a different radius per sample, the first one 0
    eps[7] = 0.0
    model = trained
    model.train()  # the attack must switch to eval itself and switch back
    frozen = next(model.parameters())
    frozen.requires_grad_(False)  # a caller's own frozen parameter stays frozen
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        attack = make_attack(name, model, batch_size=8, **FAST[name])  # 3 chunks
        adv = attack(x, y, eps)
        assert model.training
        assert [p.requires_grad for p in model.parameters()][:2] == [False, True]
        assert all(p.requires_grad for p in list(model.parameters())[1:])
        assert all(p.grad is None for p in model.parameters())
        for k, v in model.state_dict().items():  # BatchNorm running statistics untouched
            assert torch.equal(v, buffers[k]), k
    finally:
        frozen.requires_grad_(True)
        model.eval()
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.is_contiguous()
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    size = (adv - x).flatten(1).abs().amax(1)
    assert bool((size <= eps + 1e-6).all()), (size - eps).max()
    assert torch.equal(adv[eps == 0], x[eps == 0])  # eps = 0 is the identity, exactly
    moved = (eps >= 4 / 255) & (size > 0)
    assert int(moved.sum()) >= 8  # it did attack
    # the loss goes up: on average, and for most samples (white-box) at eps >= 4/255
    big = eps >= 4 / 255
    gain = _ce(model, adv, y)[big] - _ce(model, x, y)[big]
    assert float(gain.mean()) > 0
    if name != "square":
        assert float((gain >= 0).float().mean()) >= 0.9


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "square"])
def test_seeded_attacks_are_deterministic(
    name: str, trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = test_batch[0][:8], test_batch[1][:8]
    attack = make_attack(name, trained, **FAST[name])
    first = attack(x, y, 8 / 255)
    assert torch.equal(first, attack(x, y, 8 / 255))
    other = make_attack(name, trained, **{**FAST[name], "seed": 1})(x, y, 8 / 255)
    assert not torch.equal(first, other)


def test_attack_works_inside_no_grad(
    trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = test_batch[0][:8], test_batch[1][:8]
    with torch.no_grad():
        adv = PGD(trained, steps=2)(x, y, 8 / 255)
    assert float((adv - x).abs().max()) > 0


def test_inputs_are_validated(trained: nn.Module) -> None:
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FGSM(trained)(x * 2, y, 0.1)
    with pytest.raises(ValueError, match="eps"):
        FGSM(trained)(x, y, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="shape"):
        FGSM(trained)(x, y, torch.tensor([0.1, 0.1, 0.1]))


@pytest.mark.parametrize("kind", [PGD, APGDCE])
def test_l2_attacks_stay_in_the_l2_ball(
    kind: type[PGD] | type[APGDCE],
    trained: nn.Module,
    test_batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = test_batch[0][:12], test_batch[1][:12]
    eps = torch.linspace(0.1, 1.5, len(x))
    adv = kind(trained, steps=4, norm="l2")(x, y, eps)
    norms = (adv - x).flatten(1).norm(dim=1)
    assert bool((norms <= eps + 1e-5).all())
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert float(norms.min()) > 0.5 * float(eps.min())  # it used its budget
    assert float(_ce(trained, adv, y).mean()) > float(_ce(trained, x, y).mean())


# ---------------------------------------------------------------------------- vs torchattacks
@pytest.mark.parametrize("channels_last", [False, True])
def test_pgd_matches_torchattacks(
    channels_last: bool, trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Same model, step and start (none, then the same random one): the same perturbation.

    Our loop runs channels-last on the CPU by default; torchattacks gets the input in the layout
    our loop uses, so both run the same convolution kernels and differ only by rounding."""
    x, y = test_batch
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    eps, steps = 8 / 255, 5
    alpha = 2.5 * eps / steps
    e, a = torch.full((len(x),), eps), torch.full((len(x),), alpha)
    with attack_mode(trained):
        ours = pgd_steps(trained, x, y, e, steps, a, channels_last=channels_last)
    theirs = torchattacks.PGD(trained, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert float((ours - theirs).abs().max()) < 1e-6

    torch.manual_seed(123)  # torchattacks draws its start from the global generator: draw it too
    start = torch.empty_like(x).uniform_(-eps, eps)
    torch.manual_seed(123)
    theirs = torchattacks.PGD(trained, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    with attack_mode(trained):
        ours = pgd_steps(trained, x, y, e, steps, a, init=start, channels_last=channels_last)
    assert float((ours - theirs).abs().max()) < 1e-6
    assert float((ours - x).abs().max()) > eps / 2


def test_pgd_class_matches_torchattacks_without_random_start(
    trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = test_batch
    xl = fast_layout(x, trained)  # the layout our loop runs in: the same kernels
    ours = PGD(trained, steps=3, alpha_factor=2.5, random_init=False)(x, y, 6 / 255)
    theirs = torchattacks.PGD(trained, eps=6 / 255, alpha=5 / 255, steps=3, random_start=False)
    assert float((ours - theirs(xl, y)).abs().max()) < 1e-6


def test_fgsm_matches_torchattacks(
    trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = test_batch
    xl = fast_layout(x, trained)  # the layout our loop runs in: the same kernels
    ours = FGSM(trained)(x, y, 8 / 255)
    theirs = torchattacks.FGSM(trained, eps=8 / 255)(xl, y)
    assert float((ours - theirs).abs().max()) < 1e-6


def test_apgd_at_least_as_strong_as_pgd_and_close_to_torchattacks(
    trained: nn.Module, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = data[0][96:144], data[1][96:144]
    eps, steps = 6 / 255, 10
    pgd = _accuracy(trained, PGD(trained, steps=steps)(x, y, eps), y)
    apgd = _accuracy(trained, APGDCE(trained, steps=steps)(x, y, eps), y)
    theirs = _accuracy(trained, torchattacks.APGD(trained, eps=eps, steps=steps)(x, y), y)
    assert 0.05 < pgd < 0.95, "the radius should leave room to compare attacks"
    assert apgd <= pgd + 2 / len(x)
    assert abs(apgd - theirs) <= 0.1


def test_apgd_dlr_and_targeted_are_strong(
    trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = test_batch
    clean = _accuracy(trained, x, y)
    for attack in (APGDDLR(trained, steps=6), APGDT(trained, steps=4, n_target_classes=2)):
        assert _accuracy(trained, attack(x, y, 16 / 255), y) <= clean - 0.5, attack.name


# ---------------------------------------------------------------------------- APGD pieces
def test_apgd_checkpoints_follow_the_paper() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then > 1): w_j = ceil(p_j N)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert checkpoints(1) == []


class Slope(nn.Module):
    """Two classes, class-1 logit 255 * (mean(x) - 0.5): for label 0 the CE grows with x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = 255.0 * self.w * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([torch.zeros_like(u), u], dim=1)


def test_apgd_first_step_is_twice_eps() -> None:
    """From the lower corner of the ball, APGD's first step (eta = 2 eps) reaches the far corner:
    with eta = eps it would stop at the centre."""
    model = Slope()
    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    eps = torch.tensor([4.0, 1.0]) / 255
    init = -eps.view(-1, 1, 1, 1).expand_as(x)
    with attack_mode(model):
        x_best, *_ = apgd_run(model, x, y, eps, 1, per_sample_ce, init)
    torch.testing.assert_close(x_best, x + eps.view(-1, 1, 1, 1))


def test_apgd_halves_when_either_condition_holds() -> None:
    """Croce & Hein: halve when the loss rose in fewer than rho of the steps since the last
    checkpoint OR (not halved last time and no improvement of the best loss)."""
    n_up = torch.tensor([1.0, 5.0, 1.0, 5.0])  # of 6 steps: 1 < 0.75 * 6 (oscillating), 5 not
    halved_before = torch.tensor([False, False, False, True])
    best = torch.tensor([2.0, 1.0, 1.0, 1.0])
    best_at_mark = torch.tensor([1.0, 1.0, 1.0, 1.0])  # sample 0 improved; 1, 2 and 3 did not
    halve = halve_step(n_up, 6, 0.75, halved_before, best, best_at_mark)
    # oscillating only; stalled only; both; neither (stalled but halved at the last checkpoint)
    assert halve.tolist() == [True, True, True, False]


def test_dlr_losses_on_hand_made_logits() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    # correct (y = 0): -(3 - 1) / (3 - 0); wrong (y = 1): -(1 - 3) / (3 - 0)
    assert torch.allclose(dlr_loss(z, torch.tensor([0, 1])), torch.tensor([-2 / 3, 2 / 3]))
    # targeted towards class 2: -(z_y - z_t) / (z_1 - (z_3 + z_4) / 2)
    got = targeted_dlr_loss(z[:1], torch.tensor([0]), torch.tensor([2]))
    assert torch.allclose(got, torch.tensor([-3 / 3.5]))
    # scale invariance: the reason DLR exists
    assert torch.allclose(dlr_loss(10 * z, torch.tensor([0, 1])), dlr_loss(z, torch.tensor([0, 1])))


def test_dlr_attacks_need_enough_classes() -> None:
    model = build_model("small_cnn", 3).eval()
    x, y = torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)
    APGDDLR(model, steps=1)(x, y, 0.01)  # 3 classes are enough for DLR
    with pytest.raises(ValueError, match="at least 4 classes"):
        APGDT(model, steps=1)(x, y, 0.01)


def test_apgd_t_target_classes_default_and_cap() -> None:
    model = build_model("small_cnn", K)
    assert APGDT(model).describe()["n_target_classes"] is None
    logits = torch.tensor([[0.0, 4.0, 3.0, 2.0, 1.0]])
    targets = APGDT(model, n_target_classes=20).target_classes(logits)  # capped at K - 1
    assert [int(t) for t in targets] == [2, 3, 4, 0]
    assert [int(t) for t in APGDT(model, n_target_classes=2).target_classes(logits)] == [2, 3]


# ---------------------------------------------------------------------------- Square
class _BlackBoxProbe(nn.Module):
    """Wraps a model: fails on any pass that could produce a gradient, counts rows queried."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled() and not x.requires_grad, "Square asked for a gradient"
        self.rows += len(x)
        return self.model(x)


def test_square_is_black_box_and_respects_its_budget(
    trained: nn.Module,
    test_batch: tuple[torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a layout probe's forward passes are not queries (tests/test_layout.py checks it asks for no
    # gradient): pinned here so that every pass counted is the attack's
    monkeypatch.setenv("DPAAT_ATTACK_LAYOUT", "channels_last")
    x, y = test_batch[0][:16], test_batch[1][:16]
    probe = _BlackBoxProbe(trained).eval()  # the attack restores this mode on ``trained`` too
    eps = torch.full((len(x),), 16 / 255)
    eps[0] = 0.0
    attack = Square(probe, n_queries=25, batch_size=10)
    adv = attack(x, y, eps)
    q = attack.queries
    assert q is not None and q.shape == (len(x),)
    assert int(q.sum()) == probe.rows  # every forward pass is accounted for
    assert int(q.max()) <= 25 and int(q[1:].min()) >= 1
    assert int(q[0]) == 0  # eps = 0: nothing to do, not even the clean query (the cascade's case)
    assert all(p.grad is None for p in trained.parameters())
    with torch.no_grad():
        wrong = trained(adv).argmax(1) != y
        wrong_clean = trained(x).argmax(1) != y
    assert bool((q[wrong_clean] == 1).all())  # misclassified already: nothing to do
    fooled = wrong & ~wrong_clean
    assert int(fooled.sum()) >= 1
    assert bool((q[fooled] <= 25).all())
    assert bool((q[~wrong & (eps > 0)] == 25).all())  # survivors used the whole budget


def test_square_fools_a_gradient_masked_model(
    trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Rounding the input to 4 grey levels has a zero gradient: PGD from the clean point is
    blind, Square is not. This is the gradient-masking check Square is in the protocol for."""

    class Quantised(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(torch.round(x * 3) / 3)

    masked = Quantised(trained).eval()
    x, y = test_batch[0][:16], test_batch[1][:16]
    clean = _accuracy(masked, x, y)
    pgd = _accuracy(masked, PGD(masked, steps=3, random_init=False)(x, y, 24 / 255), y)
    square = _accuracy(masked, Square(masked, n_queries=40)(x, y, 24 / 255), y)
    assert pgd == clean
    assert square < clean - 0.2


def test_square_schedule() -> None:
    assert p_fraction(0.8, 0, 1000) == 0.8
    assert p_fraction(0.8, 30, 1000) == 0.8 / 8  # 3 % of the budget (300 of 10,000): p / 8
    assert p_fraction(0.8, 999, 1000) == 0.8 / 512


# ---------------------------------------------------------------------------- registry
def test_registry_builds_every_attack_and_describes_it() -> None:
    model = build_model("small_cnn", K)
    assert set(ATTACKS) == {"fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack"}
    kinds = {"fgsm": FGSM, "pgd": PGD, "apgd-ce": APGDCE, "apgd-dlr": APGDDLR, "apgd-t": APGDT}
    for name, params in FAST.items():
        attack = make_attack(name, model, **params)
        assert isinstance(attack, kinds.get(name, Square))
        d = attack.describe()
        assert d["name"] == name and d["norm"] == "linf"
        for k, v in params.items():
            assert d[k] == v
    assert make_attack("pgd", model, steps=7, restarts=2).describe() == {
        "name": "pgd",
        "norm": "linf",
        "steps": 7,
        "alpha_factor": 2.5,
        "restarts": 2,
        "random_init": True,
        "seed": 0,
    }
    assert make_attack("pgd", model, norm="l2").describe()["norm"] == "l2"


def test_autoattack_reference_runs_through_our_interface(
    trained: nn.Module, test_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """torchattacks' AutoAttack behind our Attack: per-sample radii (0 leaves the input alone),
    contiguous NCHW handed over whatever layout we use, and it breaks the fragile model."""
    x, y = test_batch[0][:8], test_batch[1][:8]
    eps = torch.full((8,), 16 / 255)
    eps[0] = 0.0
    attack = make_attack("autoattack", trained)
    adv = attack(x, y, eps)
    assert torch.equal(adv[0], x[0])
    assert bool(((adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all())
    assert _accuracy(trained, adv[1:], y[1:]) <= _accuracy(trained, x[1:], y[1:]) - 0.5
    d = attack.describe()
    assert d["name"] == "autoattack" and d["implementation"].startswith("torchattacks")


def test_registry_rejects_unknown_names_and_parameters() -> None:
    model = build_model("small_cnn", K)
    with pytest.raises(ValueError, match="valid names: fgsm, pgd, apgd-ce, apgd-dlr"):
        make_attack("cw", model)
    with pytest.raises(ValueError, match="steps"):
        make_attack("fgsm", model, steps=3)
    with pytest.raises(ValueError, match="n_queries"):
        make_attack("square", model, queries=3)
    with pytest.raises(ValueError):
        make_attack("pgd", model, steps="ten")
    with pytest.raises(ValueError):
        make_attack("apgd-ce", model, norm="l1")
