"""Code written for a real torch optimizer: LR schedulers, swa_utils, generic state-dict round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as S
from torch.optim.swa_utils import SWALR, AveragedModel

from agr_optim import AGROptimizer

SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[1, 3]),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=4),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 1.0 / (e + 1)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.25, total_iters=3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=2),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=4),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.5, total_steps=10),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.9)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ExponentialLR(o, 0.9), S.ConstantLR(o, 0.5, 2)]),
}


def make(start_step: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, inner, AGROptimizer(inner, clip_norm=0.3, start_step=start_step)


def batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def agr_step(model, opt, i: int) -> torch.Tensor:
    x, x_adv, y = batch(i)
    opt.zero_grad()
    if opt.active:
        F.mse_loss(model(x), y).backward()
        opt.stash_clean()
    loss = F.mse_loss(model(x_adv), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_scheduler_drives_the_inner_lr(name):
    """Each scheduler on the wrapper gives the lrs it gives on a plain SGD, without warnings
    (pytest -W error turns "lr_scheduler.step() before optimizer.step()" into a failure)."""
    model, inner, opt = make()
    scheduler = SCHEDULERS[name](opt)
    plain = torch.optim.SGD(nn.Linear(4, 6).parameters(), lr=0.1, momentum=0.9)
    plain_scheduler = SCHEDULERS[name](plain)
    for i in range(6):
        agr_step(model, opt, i)
        plain.step()
        scheduler.step()
        plain_scheduler.step()
        assert inner.param_groups[0]["lr"] == pytest.approx(plain.param_groups[0]["lr"], rel=1e-12)
        assert scheduler.get_last_lr() == pytest.approx(plain_scheduler.get_last_lr(), rel=1e-12)
    # The scheduler's own state dict round-trips too.
    S_copy = SCHEDULERS[name](opt)
    S_copy.load_state_dict(scheduler.state_dict())


def test_reduce_lr_on_plateau():
    model, inner, opt = make()
    scheduler = S.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for i in range(3):
        agr_step(model, opt, i)
        scheduler.step(1.0)  # no improvement after the first: halves every step
    assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_swa_utils():
    """AveragedModel averages the AGR-trained weights; SWALR anneals the inner lr like on a plain SGD."""
    model, inner, opt = make()
    swa_model = AveragedModel(model)
    swa = SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    plain = torch.optim.SGD(nn.Linear(4, 6).parameters(), lr=0.1)
    plain_swa = SWALR(plain, swa_lr=0.05, anneal_epochs=2)
    snapshots = []
    for i in range(4):
        agr_step(model, opt, i)
        plain.step()
        swa.step()
        plain_swa.step()
        swa_model.update_parameters(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
        assert inner.param_groups[0]["lr"] == pytest.approx(plain.param_groups[0]["lr"], rel=1e-12)
    for i, p in enumerate(swa_model.module.parameters()):
        torch.testing.assert_close(p, torch.stack([s[i] for s in snapshots]).mean(0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "inner optimizer"])
def test_generic_state_dict_round_trip_continues_exactly(how):
    """Code that saves ``optimizer.state_dict()`` and loads it into a fresh optimizer, knowing
    nothing of AGR; the warm start (start_step=3) ends after the resume point."""
    model, _, opt = make(start_step=3)
    for i in range(2):
        agr_step(model, opt, i)
    saved_model = copy.deepcopy(model.state_dict())
    state = opt.state_dict()  # references the live state tensors, like any optimizer's
    if how != "torch.save":
        state = copy.deepcopy(state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    for i in range(2, 5):
        agr_step(model, opt, i)

    resumed, resumed_inner, resumed_opt = make(start_step=0 if how != "inner optimizer" else 3)
    resumed.load_state_dict(saved_model)
    if how == "inner optimizer":
        # A checkpoint of the inner optimizer alone (e.g. from before AGR was added): the inner
        # state loads, the wrapper keeps its own count, here advanced by hand.
        inner_state = {**state, "param_groups": [{k: v for k, v in g.items() if k != "agr"}
                                                 for g in state["param_groups"]]}
        resumed_opt.load_state_dict(inner_state)
        assert resumed_opt.step_count == 0
        resumed_opt._step_count = 2
    else:
        resumed_opt.load_state_dict(state)
        assert resumed_opt.step_count == 2 and resumed_opt.start_step == 3
    for i in range(2, 5):
        agr_step(resumed, resumed_opt, i)
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed_inner.state_dict()["state"].keys() == opt.optimizer.state_dict()["state"].keys()
