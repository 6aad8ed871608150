"""Tests for agr_optim.recipes: the PGD attack, the TRADES/MART losses and the four step functions.

References are written here from the papers' formulas (float64), not with the library's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from agr_optim import AGROptimizer
from agr_optim.recipes import (
    PGD,
    awp_step,
    mart_loss,
    mart_step,
    perturbed_weights,
    pgd_at_step,
    trades_loss,
    trades_step,
    weight_perturbation,
)

DTYPE = torch.float64
ATOL = 1e-10  # float64 throughout; a few hundred roundings at most


def tiny_model(seed: int = 0, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(4, 6)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).to(DTYPE)


def batch(seed: int = 1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=DTYPE)
    x[0] = 0.0  # pixels on the data range's edges
    x[1] = 1.0
    return x, torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------- references
def ce_ref(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_p[torch.arange(len(y)), y].mean()


def softmax_ref(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def trades_ref(lc: torch.Tensor, la: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    pc, pa = softmax_ref(lc), softmax_ref(la)
    kl = (pc * (torch.log(pc) - torch.log(pa))).sum(dim=1).mean()
    return ce_ref(lc, y) + beta * kl


def mart_ref(lc: torch.Tensor, la: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    pc, pa = softmax_ref(lc), softmax_ref(la)
    total = 0.0
    for i in range(len(y)):
        wrong = max((k for k in range(pa.shape[1]) if k != int(y[i])), key=lambda k: float(pa[i, k].detach()))
        bce = -torch.log(pa[i, y[i]]) - torch.log(1.0001 - pa[i, wrong] + 1e-12)
        kl = (pc[i] * (torch.log(pc[i]) - torch.log(pa[i] + 1e-12))).sum()
        total = total + bce + beta * kl * (1.0000001 - pc[i, y[i]])
    return total / len(y)


def agr_ref(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The AGR rule of Tong et al. for one tensor, no clipping."""
    d, na, nc = (a * c).sum(), a.norm(), c.norm()
    cos = d / (na * nc) if na > 0 and nc > 0 else torch.zeros((), dtype=a.dtype)
    if cos <= 0:
        return a - d / nc**2 * c if nc > 0 else a
    return cos * c + (1 - cos) * a


def grads(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def fixed(x_adv: torch.Tensor):
    """An attack that returns a given tensor (and records its calls)."""

    def attack(model, x, y):
        attack.calls.append((model, x, y))
        return x_adv

    attack.calls = []
    return attack


# ---------------------------------------------------------------------- PGD
@pytest.mark.parametrize("loss, start", [("ce", "uniform"), ("ce", "none"), ("kl", "normal"), ("kl", "uniform")])
@pytest.mark.parametrize("eps", [0.03, 0.3, 1.0])
def test_pgd_stays_in_ball_and_range(loss, start, eps):
    model, (x, y) = tiny_model(), batch()
    x_adv = PGD(eps, eps / 3, 7, loss=loss, random_start=start)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-12
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_pgd_one_step_is_fgsm():
    """No random start, one step of size eps: x + eps * sign(grad CE), clamped (gradient by hand)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).to(DTYPE)
    x, y = batch()
    eps = 0.2
    w = model[1].weight.detach()
    p = softmax_ref(model(x).detach())
    onehot = torch.nn.functional.one_hot(y, 3).to(DTYPE)
    grad_x = ((p - onehot) @ w).reshape(x.shape)  # d CE / d x for a linear model
    expected = (x + eps * grad_x.sign()).clamp(0, 1)
    got = PGD(eps, eps, 1, random_start="none")(model, x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_pgd_increases_the_loss():
    model, (x, y) = tiny_model(), batch(n=64)
    x_adv = PGD(0.3, 0.05, 20)(model, x, y)
    with torch.no_grad():
        clean, adv = float(ce_ref(model(x), y)), float(ce_ref(model(x_adv), y))
    assert adv > clean


class _ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(DTYPE)
        self.dropout = nn.Dropout(0.5)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return self.lin(self.dropout(x.flatten(1)))


def test_pgd_eval_mode_during_attack_and_modes_restored():
    model = _ModeRecorder().train()
    model.dropout.eval()  # a mixed-mode model must come back exactly as it was
    x, y = batch()
    PGD(0.1, 0.05, 3)(model, x, y)
    assert model.seen == [False] * 3
    assert model.training and model.lin.training and not model.dropout.training


def test_pgd_restores_modes_on_error():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(0.1, 0.05, 2)(model, *batch())
    assert all(m.training for m in model.modules())


def test_pgd_leaves_parameter_grads_untouched():
    model, (x, y) = tiny_model(), batch()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)  # one set, the others None
    PGD(0.1, 0.05, 5)(model, x, y)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])


def test_pgd_batch_norm_statistics_untouched():
    model, (x, y) = tiny_model(batch_norm=True).train(), batch()
    before = [b.clone() for b in model.buffers()]
    PGD(0.1, 0.05, 5)(model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))


def test_pgd_steps_zero_returns_the_start():
    model, (x, y) = tiny_model(), batch()
    assert torch.equal(PGD(0.1, 0.05, 0, random_start="none")(model, x, y), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"alpha": 0.0}, "alpha"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"loss": "mse"}, "loss"),
        ({"random_start": "gauss"}, "random_start"),
        ({"bounds": (1.0, 0.0)}, "bounds"),
    ],
)
def test_pgd_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(**kwargs)


# ---------------------------------------------------------------------- losses
@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_loss_matches_direct_computation(beta):
    g = torch.Generator().manual_seed(2)
    lc, la = torch.randn(16, 5, generator=g, dtype=DTYPE), torch.randn(16, 5, generator=g, dtype=DTYPE)
    y = torch.randint(0, 5, (16,), generator=g)
    torch.testing.assert_close(trades_loss(lc, la, y, beta=beta), trades_ref(lc, la, y, beta), rtol=0, atol=ATOL)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_mart_loss_matches_direct_computation(beta):
    g = torch.Generator().manual_seed(3)
    lc, la = 3 * torch.randn(16, 5, generator=g, dtype=DTYPE), 3 * torch.randn(16, 5, generator=g, dtype=DTYPE)
    y = torch.randint(0, 5, (16,), generator=g)
    la[0, y[0]] = 50.0  # the true class on top: the "most likely wrong class" is the runner-up
    torch.testing.assert_close(mart_loss(lc, la, y, beta=beta), mart_ref(lc, la, y, beta), rtol=0, atol=ATOL)


def test_mart_loss_batch_of_one():
    lc, la, y = torch.tensor([[1.0, 2.0]], dtype=DTYPE), torch.tensor([[0.5, 0.1]], dtype=DTYPE), torch.tensor([1])
    torch.testing.assert_close(mart_loss(lc, la, y), mart_ref(lc, la, y, 6.0), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------- steps vs a hand-written step
def objectives(method: str, model: nn.Module, x, x_adv, y, gamma: float = 5e-3):
    """(clean gradient, adversarial objective, AWP's saved weights) as the papers state them."""
    clean = grads(ce_ref(model(x), y), model)  # before AWP touches the weights
    if method == "at":
        return clean, ce_ref(model(x_adv), y), None
    if method == "trades":
        return clean, trades_ref(model(x), model(x_adv), y, 6.0), None
    if method == "mart":
        return clean, mart_ref(model(x), model(x_adv), y, 6.0), None
    # AWP: v = gamma |w| g / |g| on weights (dim > 1), g = grad of CE(f(x_adv)) at w.
    weights = [p for p in model.parameters() if p.dim() > 1]
    g = torch.autograd.grad(ce_ref(model(x_adv), y), weights)
    v = {id(w): gamma * w.norm() * gi / gi.norm() for w, gi in zip(weights, g, strict=True)}
    originals = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in weights:
            p.add_(v[id(p)])
    adv = ce_ref(model(x_adv), y)
    return clean, adv, originals


def reference_update(method: str, model: nn.Module, x, x_adv, y, lr: float, use_agr: bool) -> list[torch.Tensor]:
    c, adv, originals = objectives(method, model, x, x_adv, y)
    a = grads(adv, model)
    if originals is not None:  # AWP: the step is applied to the unperturbed weights
        params = originals
    else:
        params = [p.detach().clone() for p in model.parameters()]
    updates = [agr_ref(ai, ci) for ai, ci in zip(a, c, strict=True)] if use_agr else a
    return [p - lr * u for p, u in zip(params, updates, strict=True)]


STEPS = {"at": pgd_at_step, "trades": trades_step, "mart": mart_step, "awp": awp_step}


@pytest.mark.parametrize("method", list(STEPS))
@pytest.mark.parametrize("kind", ["agr", "plain-sgd", "agr-warm-start"])
def test_step_matches_hand_written_update(method, kind):
    x, y = batch()
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=DTYPE)).clamp(0, 1)
    lr = 0.5
    reference = tiny_model()
    expected = reference_update(method, reference, x, x_adv, y, lr, use_agr=kind == "agr")

    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    opt = {
        "agr": AGROptimizer(sgd, clip_norm=None),
        "plain-sgd": sgd,
        "agr-warm-start": AGROptimizer(sgd, clip_norm=None, start_step=1),
    }[kind]
    attack = fixed(x_adv)
    out = STEPS[method](model, opt, x, y, attack=attack)
    assert len(attack.calls) == 1 and attack.calls[0][0] is model
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=ATOL)
    assert (out.clean_loss is not None) == (kind == "agr")
    if out.clean_loss is not None:
        torch.testing.assert_close(out.clean_loss, ce_ref(tiny_model()(x), y), rtol=0, atol=ATOL)
    assert out.x_adv is x_adv and not out.loss.requires_grad


def test_agr_step_reconstructs_with_the_clean_gradient():
    """A sanity check on the reference itself: with AGR the update differs from plain SGD."""
    x, y = batch()
    x_adv = (1 - x).clamp(0, 1)
    a = reference_update("at", tiny_model(), x, x_adv, y, 0.5, use_agr=True)
    b = reference_update("at", tiny_model(), x, x_adv, y, 0.5, use_agr=False)
    assert any(not torch.allclose(p, q) for p, q in zip(a, b, strict=True))


def test_default_attacks_are_used():
    model, (x, y) = tiny_model(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in STEPS.values():
        out = step(model, opt, x, y)
        assert float((out.x_adv - x).abs().max()) <= 8 / 255 + 1e-12
        assert not torch.equal(out.x_adv, x)


@pytest.mark.parametrize("step", [trades_step, mart_step])
def test_bad_beta(step):
    model, (x, y) = tiny_model(), batch()
    with pytest.raises(ValueError, match="beta"):
        step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, beta=-1.0)


# ---------------------------------------------------------------------- AWP
def test_perturbed_weights_restores_exactly():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    v = {p: torch.full_like(p, 1 / 3) for p in model.parameters() if p.dim() > 1}
    with perturbed_weights(v):
        for p, b in zip(model.parameters(), before, strict=True):
            assert torch.equal(p, b + 1 / 3 if p.dim() > 1 else b)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(RuntimeError, match="inside"), perturbed_weights(v):
        raise RuntimeError("inside")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_awp_step_with_zero_lr_leaves_weights_bitwise_unchanged():
    """The perturbation is removed before the step, by copy (w + v - v would round)."""
    model, (x, y) = tiny_model(batch_norm=True).train(), batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.0), clip_norm=0.1)
    awp_step(model, opt, x, y, gamma=0.37)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_weight_perturbation_norms_and_buffers():
    model, (x, y) = tiny_model(batch_norm=True).train(), batch()
    buffers = [b.clone() for b in model.buffers()]
    gamma = 0.01
    v = weight_perturbation(model, x, y, gamma=gamma)
    assert set(map(id, v)) == {id(p) for p in model.parameters() if p.dim() > 1}
    for p, d in v.items():
        assert math.isclose(float(d.norm()), gamma * float(p.detach().norm()), rel_tol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="gamma"):
        weight_perturbation(model, x, y, gamma=-1.0)


# ---------------------------------------------------------------------- training makes progress
@pytest.mark.parametrize("method", list(STEPS))
def test_a_few_steps_reduce_the_loss(method):
    """30 AGR steps on a separable toy problem lower the method's adversarial objective by 10 %+."""
    torch.manual_seed(4)
    x = torch.rand(48, 1, 2, 2, dtype=DTYPE)
    y = (x.flatten(1)[:, 0] > x.flatten(1)[:, 1]).long() + (x.flatten(1)[:, 2] > 0.5).long()
    model = tiny_model()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), clip_norm=None)
    attack = PGD(0.05, 0.02, 3, loss="kl", random_start="normal") if method == "trades" else PGD(0.05, 0.02, 3)
    losses = [float(STEPS[method](model, opt, x, y, attack=attack).loss) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
