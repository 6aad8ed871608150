"""Tests for agr_optim.recipes: the PGD attack, the TRADES/MART losses and the five step functions.

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
    avmixup_step,
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
MIX_SEED = 21  # the generator seed of the AVmixup draws, in the step and in the reference


def mixed_inputs(x, x_adv, gamma: float = 2.0):
    """AVmixup's inputs: lam x + (1 - lam) clip(x + gamma (x_adv - x)), lam ~ U(0, 1) per example."""
    lam = torch.rand((x.shape[0], 1, 1, 1), generator=torch.Generator().manual_seed(MIX_SEED), dtype=x.dtype)
    vertex = torch.clamp(x + gamma * (x_adv - x), 0.0, 1.0)
    return lam * x + (1 - lam) * vertex, lam


def objectives(method: str, model: nn.Module, x, x_adv, y, gamma: float = 5e-3):
    """(clean gradient, adversarial objective, AWP's saved weights) as the papers state them."""
    clean = grads(ce_ref(model(x), y), model)  # before AWP touches the weights
    if method == "at":
        return clean, ce_ref(model(x_adv), y), None
    if method == "avmixup":
        return clean, ce_ref(model(mixed_inputs(x, x_adv)[0]), y), None
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


def avmixup_with_seed(model, opt, x, y, **kwargs):
    return avmixup_step(model, opt, x, y, generator=torch.Generator().manual_seed(MIX_SEED), **kwargs)


STEPS = {"at": pgd_at_step, "trades": trades_step, "mart": mart_step, "awp": awp_step, "avmixup": avmixup_with_seed}


@pytest.mark.parametrize("method", list(STEPS))
@pytest.mark.parametrize("kind", ["agr", "plain-sgd", "agr-warm-start"])
@pytest.mark.parametrize("clean_pass", ["needed", "always", "gradient"])
def test_step_matches_hand_written_update(method, kind, clean_pass):
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
    out = STEPS[method](model, opt, x, y, attack=attack, clean_pass=clean_pass)
    assert len(attack.calls) == 1 and attack.calls[0][0] is model
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=ATOL)
    assert (out.clean_loss is not None) == (kind == "agr" or clean_pass != "needed")
    # Statistics: from every AGR step, and from warm-start steps with clean_pass="gradient".
    stats = getattr(opt, "last_stats", None)
    assert (stats is not None) == (kind == "agr" or (kind == "agr-warm-start" and clean_pass == "gradient"))
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


# ---------------------------------------------------------------------- the authors' order (clean_pass="always")
def authors_order_step(method: str, model: nn.Module, opt, x, x_adv, y, *, use_agr: bool, gamma: float = 5e-3):
    """The AGR code's step (train.py of RUIYUN-ML/AGR), written out: after the attack (eval mode),
    ``Model.train()``, the clean forward on every step, then the adversarial one; AGR or the
    adversarial gradient alone; for AWP the perturbation from a forward on a copy (its BatchNorm
    statistics thrown away)."""
    model.train()
    clean_logits = model(x)
    clean = grads(ce_ref(clean_logits, y), model)
    originals = None
    if method == "awp":
        proxy = __import__("copy").deepcopy(model)
        weights = [p for p in proxy.parameters() if p.dim() > 1]
        g = torch.autograd.grad(ce_ref(proxy(x_adv), y), weights)
        originals = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, q, gi in zip([p for p in model.parameters() if p.dim() > 1], weights, g, strict=True):
                p.add_(gamma * q.norm() * gi / gi.norm())
    inputs = mixed_inputs(x, x_adv)[0] if method == "avmixup" else x_adv
    adversarial = grads(ce_ref(model(inputs), y), model)
    with torch.no_grad():
        if originals is not None:
            for p, w in zip(model.parameters(), originals, strict=True):
                p.copy_(w)
        for p, a, c in zip(model.parameters(), adversarial, clean, strict=True):
            p.grad = agr_ref(a, c) if use_agr else a.clone()
    (opt.optimizer if isinstance(opt, AGROptimizer) else opt).step()  # the rule is applied above


@pytest.mark.parametrize("method", ["at", "awp", "avmixup"])
@pytest.mark.parametrize("kind", ["plain-sgd", "agr-warm-start", "agr"])
@pytest.mark.parametrize("clean_pass", ["always", "gradient"])
def test_clean_pass_always_matches_the_authors_batch_norm_statistics(method, kind, clean_pass):
    """BatchNorm's running statistics see the clean batch, then the adversarial one, in every arm.

    The default ("needed") skips the clean forward without AGR: its statistics differ (checked).
    """
    x, y = batch(n=16)
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=DTYPE)).clamp(0, 1)

    def make(k: str):
        model = tiny_model(batch_norm=True)
        sgd = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        opt = {"plain-sgd": sgd, "agr-warm-start": AGROptimizer(sgd, clip_norm=None, start_step=5)}
        return model, opt.get(k, AGROptimizer(sgd, clip_norm=None))

    reference, ref_opt = make(kind)
    for _ in range(2):  # two steps: momentum and the statistics' running average both carry over
        authors_order_step(method, reference, ref_opt, x, x_adv, y, use_agr=kind == "agr")
    results = {}
    for setting in (clean_pass, "needed"):
        model, opt = make(kind)
        model.train()
        for _ in range(2):
            STEPS[method](model, opt, x, y, attack=fixed(x_adv), clean_pass=setting)
        results[setting] = model
    bn_ref, bn_always = reference[2], results[clean_pass][2]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_always, name), getattr(bn_ref, name), rtol=0, atol=ATOL)
    for got, want in zip(results[clean_pass].parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=ATOL)
    if kind != "agr":  # without AGR the default runs no clean forward: the statistics differ
        assert int(results["needed"][2].num_batches_tracked) == 2
        assert not torch.allclose(results["needed"][2].running_mean, bn_ref.running_mean)


def test_trades_with_the_authors_cross_entropy_attack():
    """``attack=PGD()`` (the AGR code's choice) attacks the cross-entropy, not the KL: one unstarted
    step of size eps is FGSM on the cross-entropy (gradient by hand for a linear model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).to(DTYPE)
    x, y = batch()
    eps = 0.2
    w = model[1].weight.detach()
    onehot = torch.nn.functional.one_hot(y, 3).to(DTYPE)
    grad_x = ((softmax_ref(model(x).detach()) - onehot) @ w).reshape(x.shape)
    out = trades_step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, attack=PGD(eps, eps, 1, random_start="none")
    )
    torch.testing.assert_close(out.x_adv, (x + eps * grad_x.sign()).clamp(0, 1), rtol=0, atol=1e-12)


def test_avmixup_label_smoothing_matches_the_avmixup_objective():
    """label_smoothing=(0.5, 0.7): cross-entropy with lam s(y; 0.5) + (1 - lam) s(y; 0.7)."""
    x, y = batch()
    x_adv = (x + 0.1).clamp(0, 1)
    model = tiny_model()
    x_mix, lam = mixed_inputs(x, x_adv)
    k = 3
    onehot = torch.nn.functional.one_hot(y, k).to(DTYPE)
    smooth = lambda q: onehot * q + (1 - onehot) * (1 - q) / (k - 1)
    target = lam.reshape(-1, 1) * smooth(0.5) + (1 - lam.reshape(-1, 1)) * smooth(0.7)
    logits = model(x_mix)
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    expected = -(target.float() * log_p.float()).sum(dim=1).mean()
    out = avmixup_with_seed(
        model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, attack=fixed(x_adv), label_smoothing=(0.5, 0.7)
    )
    torch.testing.assert_close(out.loss, expected.to(out.loss.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits, logits.detach(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", list(STEPS))
def test_step_logits_are_the_adversarial_forward(method):
    """StepOutput.logits: the adversarial objective's forward (mixed inputs for AVmixup)."""
    x, y = batch()
    x_adv = (x + 0.1).clamp(0, 1)
    model = tiny_model()
    inputs = mixed_inputs(x, x_adv)[0] if method == "avmixup" else x_adv
    expected = model(inputs).detach()
    out = STEPS[method](model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, attack=fixed(x_adv))
    if method == "awp":  # at the perturbed weights: not the plain forward
        assert out.logits.shape == expected.shape and not torch.allclose(out.logits, expected)
    else:
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=ATOL)
    assert not out.logits.requires_grad


@pytest.mark.parametrize("method", list(STEPS))
def test_grad_scaler_step_equals_the_unscaled_step(method):
    """A real GradScaler (CPU, float32): scaled backward passes, the AGR step unscales both."""
    x, y = batch()
    x_adv = (x + 0.1).clamp(0, 1)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = tiny_model().float()
        opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.5), clip_norm=None)
        STEPS[method](model, opt, x.float(), y, attack=fixed(x_adv.float()), scaler=scaler)
        results.append([p.detach().clone() for p in model.parameters()])
        assert opt.step_count == 1
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(STEPS))
def test_bad_step_options(method):
    model, (x, y) = tiny_model(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="clean_pass"):
        STEPS[method](model, opt, x, y, clean_pass="sometimes")
    with pytest.raises(TypeError, match="scaler"):
        STEPS[method](model, opt, x, y, scaler=object())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"gamma": -1.0}, "gamma"), ({"label_smoothing": (0.5, 1.5)}, "label_smoothing"), ({"bounds": (1, 0)}, "bounds")],
)
def test_avmixup_bad_arguments(kwargs, match):
    model, (x, y) = tiny_model(), batch()
    with pytest.raises(ValueError, match=match):
        avmixup_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, **kwargs)


def test_warm_start_statistics_with_clean_pass_gradient():
    """clean_pass="gradient" in the warm start: the statistics AGR would have had (per-tensor cosine
    of the clean and adversarial gradients, written here), the update still the adversarial one."""
    x, y = batch()
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=DTYPE)).clamp(0, 1)
    reference = tiny_model()
    c = grads(ce_ref(reference(x), y), reference)
    a = grads(ce_ref(reference(x_adv), y), reference)
    cosines = [float((ai * ci).sum() / (ai.norm() * ci.norm())) for ai, ci in zip(a, c, strict=True)]
    model = tiny_model()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.5), clip_norm=None, start_step=3)
    pgd_at_step(model, opt, x, y, attack=fixed(x_adv), clean_pass="gradient")
    assert opt.step_count == 1 and not opt.active
    torch.testing.assert_close(opt.last_stats.cosine.double(), torch.tensor(cosines, dtype=DTYPE), rtol=0, atol=1e-10)
    for got, p, ai in zip(model.parameters(), reference.parameters(), a, strict=True):
        torch.testing.assert_close(got.detach(), p.detach() - 0.5 * ai, rtol=0, atol=ATOL)
