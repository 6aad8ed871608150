"""GradScaler (torch.amp, on CPU): the stash is unscaled and inf-checked like ``.grad``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _reference_training import reference_sgd_training
from torch import nn

from agr_optim import AGROptimizer

LR, MOMENTUM, CLIP, SCALE = 0.1, 0.9, 0.3, 2.0**12


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def batches(n: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g))
            for _ in range(n)]


def wrap(model: nn.Module, **kwargs) -> AGROptimizer:
    return AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), clip_norm=CLIP, **kwargs)


def backward_pair(model, opt, batch, scaler=None, order="clean"):
    x, x_adv, y = batch
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    first, second = (x, x_adv) if order == "clean" else (x_adv, x)
    scale(F.mse_loss(model(first), y)).backward()
    opt.stash_clean() if order == "clean" else opt.stash_adversarial()
    scale(F.mse_loss(model(second), y)).backward()


def train(model, opt, data, scaler=None, order="clean", unscale_at=()):
    for i, batch in enumerate(data):
        opt.zero_grad()
        backward_pair(model, opt, batch, scaler, order)
        if scaler is None:
            opt.step()
            continue
        if i in unscale_at:
            scaler.unscale_(opt)  # what a user does before clipping by hand
        scaler.step(opt)
        scaler.update()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict()["state"])
    return params, state, opt.step_count


def assert_unchanged(before, model, opt):
    params, state, count = before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    after = opt.optimizer.state_dict()["state"]
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k]["momentum_buffer"], state[k]["momentum_buffer"]) for k in state)
    assert opt.step_count == count


@pytest.mark.parametrize("order", ["clean", "adversarial"])
@pytest.mark.parametrize("unscale_at", [(), (1,), (0, 1, 2)])
def test_scaled_run_equals_unscaled_run(order, unscale_at):
    data = batches(3)
    plain_model, scaled_model = make_model(), make_model()
    plain_opt, scaled_opt = wrap(plain_model), wrap(scaled_model)
    train(plain_model, plain_opt, data, order=order)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    train(scaled_model, scaled_opt, data, scaler, order=order, unscale_at=unscale_at)
    for p, q in zip(scaled_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    assert scaled_opt.step_count == 3 and scaler.get_scale() == SCALE
    assert torch.allclose(scaled_opt.last_stats.cosine, plain_opt.last_stats.cosine, atol=1e-6)


def test_scaled_run_equals_hand_reference():
    """Independent of the unscaled wrapper: AGR in float64 numpy, SGD with momentum by hand."""
    data = batches(3)
    model = make_model()
    train(model, wrap(model), data, torch.amp.GradScaler("cpu", init_scale=SCALE))
    params = reference_sgd_training(make_model, data, lr=LR, momentum=MOMENTUM, clip_norm=CLIP)
    for p, q in zip(model.parameters(), params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def plain_scale_after_inf(value: float, unscale_first: bool) -> tuple[float, int]:
    """What GradScaler does in plain training (SGD, one backward) with the same bad gradient."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)
    x, _, y = batches(1)[0]
    scaler.scale(F.mse_loss(model(x), y)).backward()
    next(model.parameters()).grad.view(-1)[0] = value
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale(), int(scaler._growth_tracker)


@pytest.mark.parametrize("where", ["stash", "current"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_inf_or_nan_in_either_gradient_skips_the_step(where, value, unscale_first):
    model = make_model()
    opt = wrap(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)
    data = batches(3)
    train(model, opt, data[:1])  # momentum buffers exist: the inner state must stay untouched
    before = snapshot(model, opt)
    opt.zero_grad()
    x, x_adv, y = data[1]
    scaler.scale(F.mse_loss(model(x), y)).backward()
    opt.stash_clean()
    scaler.scale(F.mse_loss(model(x_adv), y)).backward()
    grad = next(iter(opt._stash["clean"].values())) if where == "stash" else next(model.parameters()).grad
    grad.view(-1)[0] = value
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert_unchanged(before, model, opt)
    assert not opt.has_stash and len(opt.param_groups) == 1
    assert (scaler.get_scale(), int(scaler._growth_tracker)) == plain_scale_after_inf(value, unscale_first)
    assert scaler.get_scale() == SCALE / 2
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    # Training goes on, and the scale grows back as in plain training.
    train(model, opt, data[2:], scaler)
    assert opt.step_count == 2 and scaler.get_scale() == SCALE


def test_stash_unscaled_before_it_was_taken_is_refused():
    """unscale_() before the stash: the stash is unscaled, the second gradient is not."""
    model = make_model()
    opt = wrap(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, x_adv, y = batches(1)[0]
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    scaler.unscale_(opt)
    opt.stash_clean()
    scaler.scale(F.mse_loss(model(x_adv), y)).backward()
    before = snapshot(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="unscale_.*before the gradient was stashed"):
        scaler.step(opt)
    assert_unchanged(before, model, opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert opt.has_stash and not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_stash_unscaled_under_another_scale_is_refused():
    """unscale_(), then update() (the scale changes), then step(): the stash is already unscaled."""
    model = make_model()
    opt = wrap(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt.zero_grad()
    backward_pair(model, opt, batches(1)[0], scaler)
    scaler.unscale_(opt)
    scaler.update(SCALE / 4)
    before = snapshot(model, opt)
    stash = [g.clone() for g in opt._stash["clean"].values()]
    with pytest.raises(RuntimeError, match="unscaled by scaler.unscale_\\(\\) under scale 4096"):
        scaler.step(opt)
    assert_unchanged(before, model, opt)
    assert all(torch.equal(g, h) for g, h in zip(opt._stash["clean"].values(), stash, strict=True))


def test_only_grad_scaler_sees_the_stash():
    """Between the stash and step() everyone but GradScaler (schedulers, clipping, loops over the
    groups) sees the inner optimizer's groups; GradScaler's unscale_ unscales the stash too."""
    model = make_model()
    opt = wrap(model)
    inner_groups = opt.optimizer.param_groups
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, x_adv, y = batches(1)[0]
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    clean = [p.grad.clone() for p in model.parameters()]
    opt.stash_clean()
    assert opt.param_groups is inner_groups and len(opt.state_dict()["param_groups"]) == 1
    scaler.scale(F.mse_loss(model(x_adv), y)).backward()
    adversarial = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt)
    # Unscaling by a power of two is exact: both gradients are divided by exactly SCALE.
    assert all(torch.equal(g, c / SCALE) for g, c in zip(opt._stash["clean"].values(), clean, strict=True))
    assert all(torch.equal(p.grad, a / SCALE) for p, a in zip(model.parameters(), adversarial, strict=True))
    assert opt.param_groups is inner_groups and len(inner_groups) == 1
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 1 and not opt.has_stash and opt.param_groups is inner_groups


@pytest.mark.parametrize("order", ["clean", "adversarial"])
def test_unscale_between_the_two_backward_passes_is_refused(order):
    """unscale_() after the stash but before the second backward: the stash is unscaled and the
    second gradient is not (the update would be off by the scale): refused, nothing changed."""
    model = make_model()
    opt = wrap(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    train(model, opt, batches(1))
    x, x_adv, y = batches(2)[1]
    first, second = (x, x_adv) if order == "clean" else (x_adv, x)
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(first), y)).backward()
    opt.stash_clean() if order == "clean" else opt.stash_adversarial()
    scaler.unscale_(opt)
    scaler.scale(F.mse_loss(model(second), y)).backward()
    before = snapshot(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\) ran between the two backward passes.*once, after"):
        scaler.step(opt)
    assert_unchanged(before, model, opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert opt.has_stash and not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_stash_of_a_moved_or_cast_parameter_is_refused():
    model = make_model()
    opt = wrap(model)
    x, x_adv, y = batches(1)[0]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.stash_clean()
    model.double()
    F.mse_loss(model(x_adv.double()), y.double()).backward()
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"stashed clean gradient of parameter 0 \(shape \(6, 4\), torch.float32"):
        opt.step()
    assert_unchanged(before, model, opt)
    assert opt.has_stash
    opt.zero_grad()
    F.mse_loss(model(x.double()), y.double()).backward()
    opt.stash_clean()
    # Another device: a CPU-only machine cannot move a parameter between devices in place,
    # so the stash is put where a stash taken before `model.to(device)` would be.
    p0 = next(model.parameters())
    opt._stash["clean"][p0] = opt._stash["clean"][p0].to("meta")
    F.mse_loss(model(x_adv.double()), y.double()).backward()
    with pytest.raises(RuntimeError, match="on meta.*on cpu.*moved or cast"):
        opt.step()


def test_inner_optimizer_with_its_own_amp_support():
    """A fused Adam inside: the wrapper unscales, the inner step must not unscale again."""
    data = batches(3)
    models = [make_model(), make_model()]
    opts = [AGROptimizer(torch.optim.Adam(m.parameters(), lr=1e-2, fused=True), clip_norm=CLIP) for m in models]
    train(models[0], opts[0], data)
    train(models[1], opts[1], data, torch.amp.GradScaler("cpu", init_scale=SCALE))
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_autocast_bf16_training_runs_and_matches_float32():
    """torch.autocast (bf16 on CPU) with the scaler: the step is finite and near the float32 one."""
    data = batches(2)
    models = [make_model(), make_model()]
    opts = [wrap(m) for m in models]
    train(models[0], opts[0], data)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train(models[1], opts[1], data, scaler)
    diffs = [np.abs((p - q).detach().numpy()).max() for p, q in zip(*(m.parameters() for m in models), strict=True)]
    assert max(diffs) < 2e-2 and opts[1].step_count == 2


@pytest.mark.parametrize("unscale_at", [(), (0, 1, 2)])
def test_scale_of_exactly_one_with_and_without_unscale(unscale_at):
    """At scale 1 unscaling changes nothing, so the stash sentinel cannot show it ran; the
    wrapper must not mistake that for an unscale_() before the stash (a scaler that backed off
    to 1, or init_scale=1, with the clip-by-hand recipe)."""
    data = batches(3)
    plain_model, scaled_model = make_model(), make_model()
    plain_opt, scaled_opt = wrap(plain_model), wrap(scaled_model)
    train(plain_model, plain_opt, data)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
    train(scaled_model, scaled_opt, data, scaler, unscale_at=unscale_at)
    for p, q in zip(scaled_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert scaled_opt.step_count == 3
