"""Gradient accumulation: several backward passes before each stash and before step add up as in
plain PyTorch; two half-batches with halved losses equal one full batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference_training import reference_sgd_training
from torch import nn

from agr_optim import AGROptimizer

LR, MOMENTUM, CLIP = 0.1, 0.9, 0.3


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    return model, AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), clip_norm=CLIP)


def data(steps=3, batch=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 4, generator=g), torch.randn(batch, 4, generator=g), torch.randn(batch, 2, generator=g))
            for _ in range(steps)]


def accumulate(model, x, y, parts, scaler=None):
    """``parts`` micro-batches, each loss divided by ``parts``: the mean over the whole batch."""
    for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
        loss = F.mse_loss(model(xs), ys) / parts
        (scaler.scale(loss) if scaler is not None else loss).backward()


def train(model, opt, batches, parts, order="clean", scaler=None):
    for x, x_adv, y in batches:
        first, second = (x, x_adv) if order == "clean" else (x_adv, x)
        opt.zero_grad()
        accumulate(model, first, y, parts, scaler)
        opt.stash_clean() if order == "clean" else opt.stash_adversarial()
        accumulate(model, second, y, parts, scaler)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()


def hand_reference(batches):
    model_only = lambda: make()[0]  # noqa: E731
    return reference_sgd_training(model_only, batches, lr=LR, momentum=MOMENTUM, clip_norm=CLIP)


@pytest.mark.parametrize("order", ["clean", "adversarial"])
@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("amp", [False, True])
def test_micro_batches_equal_the_full_batch(order, parts, amp):
    batches = data()
    model, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if amp else None
    train(model, opt, batches, parts, order, scaler)
    for p, q in zip(model.parameters(), hand_reference(batches), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_accumulation_before_the_stash_is_kept_and_after_it_starts_from_zero():
    """The stash takes the sum of the clean passes; the adversarial passes start from zero."""
    model, opt = make()
    (x, x_adv, y), = data(1)
    params = list(model.parameters())
    halves = [torch.autograd.grad(F.mse_loss(model(xs), ys) / 2, params)
              for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True)]
    opt.zero_grad()
    accumulate(model, x, y, 2)
    opt.stash_clean()
    assert all(p.grad is None for p in params)
    for p, h0, h1 in zip(params, *halves, strict=True):
        torch.testing.assert_close(opt._stash["clean"][p], h0 + h1, rtol=1e-6, atol=1e-7)
    accumulate(model, x_adv, y, 2)
    adversarial = torch.autograd.grad(F.mse_loss(model(x_adv), y), params)
    for p, a in zip(params, adversarial, strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


def train_stashing_both(model, opt, batches, parts, order="clean", scaler=None):
    """The accumulation protocol: every micro-batch stashes both of its gradients; step() once."""
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    for x, x_adv, y in batches:
        opt.zero_grad()
        for xs, xs_adv, ys in zip(x.chunk(parts), x_adv.chunk(parts), y.chunk(parts), strict=True):
            pair = [("clean", xs), ("adversarial", xs_adv)]
            for kind, inputs in pair if order == "clean" else pair[::-1]:
                scale(F.mse_loss(model(inputs), ys) / parts).backward()
                getattr(opt, f"stash_{kind}")()
        assert all(p.grad is None for p in model.parameters())
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("order", ["clean", "adversarial"])
@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("amp", [False, True])
def test_stashing_both_per_micro_batch_equals_the_full_batch(order, parts, amp):
    batches = data()
    model, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if amp else None
    train_stashing_both(model, opt, batches, parts, order, scaler)
    assert opt.step_count == len(batches)
    for p, q in zip(model.parameters(), hand_reference(batches), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_a_second_clean_stash_over_a_left_adversarial_gradient_points_to_the_recipe():
    """Accelerate's order with the plain protocol: step() and zero_grad() are skipped on the first
    micro-batch, so its adversarial gradient is still in .grad when the next clean pass adds to it."""
    model, opt = make()
    (x, x_adv, y), = data(1)
    opt.zero_grad()
    F.mse_loss(model(x[:4]), y[:4]).backward()
    opt.stash_clean()
    F.mse_loss(model(x_adv[:4]), y[:4]).backward()
    F.mse_loss(model(x[4:]), y[4:]).backward()  # the next micro-batch's clean pass
    match = "clean gradient is already stashed.*gradient accumulation.*stash_adversarial"
    with pytest.raises(RuntimeError, match=match):
        opt.stash_clean()
    assert opt.has_stash and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("case", ["missing-last-stash", "backward-after-both"])
def test_an_unfinished_accumulation_is_refused_and_changes_nothing(case):
    model, opt = make()
    (x, x_adv, y), = data(1)
    opt.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        F.mse_loss(model(x[half]), y[half]).backward()
        opt.stash_clean()
        F.mse_loss(model(x_adv[half]), y[half]).backward()
        if case == "backward-after-both" or half.start == 0:
            opt.stash_adversarial()
    if case == "backward-after-both":
        F.mse_loss(model(x_adv), y).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    match = "2 clean and 1 adversarial stashes" if case == "missing-last-stash" else "both gradients are stashed"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert opt.step_count == 0 and opt.has_stash and not opt.optimizer.state


def test_expanded_gradients_accumulate_as_their_dense_values():
    """An expanded .grad (no in-place add allowed) is copied when stashed, then added to."""
    w = nn.Parameter(torch.zeros(4))
    opt = AGROptimizer(torch.optim.SGD([w], lr=1.0), clip_norm=None)
    clean, adversarial = torch.tensor([1.0, -1.0, 0.5, 2.0]), torch.tensor([-2.0, 1.0, 1.0, 0.0])
    for part in range(2):
        w.grad = torch.full((1,), 0.5).expand(4) if part == 0 else clean.clone()
        opt.stash_clean()
        w.grad = torch.full((1,), 0.25).expand(4) if part == 0 else adversarial.clone()
        opt.stash_adversarial()
    opt.step()
    c, a = (clean + 0.5).double(), (adversarial + 0.25).double()
    cos = (a @ c) / (a.norm() * c.norm())
    r = a - (a @ c) / (c @ c) * c if cos <= 0 else cos * c + (1 - cos) * a
    torch.testing.assert_close(w.detach().double(), -r, rtol=1e-6, atol=1e-7)
