"""``AGROptimizer``: against a hand-written AGR training loop, delegation, checkpoints, bad input.

The hand-written loop takes both gradients with ``torch.autograd.grad``, applies the AGR rule
in float64 numpy (``_asserts.reference_agr``), puts the result in ``.grad`` and calls a twin
of the inner optimizer: nothing of ``agr_optim`` is used on that side.
"""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _asserts import check_stats, reference_agr, rounding_bound, snapshot
from torch import nn

from agr_optim import AGROptimizer, ReconstructionStats

OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, weight_decay=1e-2),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=1e-2),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
}


class Net(nn.Module):
    """An MLP with the awkward parameters: a frozen one, one used only by the clean pass and
    one used only by the adversarial pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.lin2 = nn.Linear(6, 3)
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.clean_only = nn.Parameter(torch.randn(3))
        self.adversarial_only = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor, adversarial: bool) -> torch.Tensor:
        out = self.lin2(torch.tanh(self.lin1(x))) + self.frozen
        return out + (self.adversarial_only if adversarial else self.clean_only)

    def groups(self) -> list[dict]:
        """Two param groups (for granularity "group"), the frozen parameter included."""
        return [
            {"params": [self.lin1.weight, self.lin1.bias, self.frozen, self.clean_only]},
            {"params": [self.lin2.weight, self.lin2.bias, self.adversarial_only], "lr_scale": 1},
        ]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, generator=g)
    return x, x + 0.5 * torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


def loss(model: Net, x: torch.Tensor, y: torch.Tensor, adversarial: bool) -> torch.Tensor:
    return nn.functional.mse_loss(model(x, adversarial), y)


def wrapper_step(model: Net, opt: AGROptimizer, step: int, order: str) -> None:
    """The issue's training step, in either stash order."""
    x, x_adv, y = batch(step)
    opt.zero_grad()
    if order == "clean_first":
        if opt.active:
            loss(model, x, y, False).backward()
            opt.stash_clean()
        loss(model, x_adv, y, True).backward()
    else:
        loss(model, x_adv, y, True).backward()
        if opt.active:
            opt.stash_adversarial()
            loss(model, x, y, False).backward()
    opt.step()


def hand_step(model: Net, inner: torch.optim.Optimizer, step: int, *, start_step: int, clip_norm: float | None,
              granularity: str) -> None:
    """AGR written out: autograd.grad for both losses, the float64 rule, the inner step."""
    x, x_adv, y = batch(step)
    entries = [(gi, p) for gi, g in enumerate(inner.param_groups) for p in g["params"]]
    trainable = [(gi, p) for gi, p in entries if p.requires_grad]
    params = [p for _, p in trainable]
    a = torch.autograd.grad(loss(model, x_adv, y, True), params, allow_unused=True)
    for p in [p for _, p in entries]:
        p.grad = None
    if step < start_step:
        for p, g in zip(params, a, strict=True):
            p.grad = g
    else:
        c = torch.autograd.grad(loss(model, x, y, False), params, allow_unused=True)
        keep = [i for i, g in enumerate(a) if g is not None]
        group_of = [trainable[i][0] for i in keep]
        segments = {"tensor": list(range(len(keep))), "group": group_of, "global": [0] * len(keep)}[granularity]
        r, _ = reference_agr([a[i] for i in keep], [c[i] for i in keep], clip_norm=clip_norm, segments=segments)
        for i, ri in zip(keep, r, strict=True):
            params[i].grad = torch.from_numpy(ri).to(params[i].dtype)
    inner.step()


def make_pair(name: str, **agr):
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    opt = AGROptimizer(OPTIMIZERS[name](model.groups()), **agr)
    inner = OPTIMIZERS[name](twin.groups())
    return model, opt, twin, inner


def assert_same_params(model: nn.Module, twin: nn.Module, atol: float = 1e-5) -> None:
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        err = (p.detach().double() - q.detach().double()).abs().max().item()
        assert err <= atol, f"{name}: max |difference| {err:.2e} > {atol}"


# --------------------------------------------------------------------------- equals the hand-written loop
@pytest.mark.parametrize("start_step", [0, 2], ids=["no-warm-start", "warm-start-2"])
@pytest.mark.parametrize("granularity", ["tensor", "group", "global"])
@pytest.mark.parametrize("order", ["clean_first", "adversarial_first"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_training_equals_hand_written_loop(name: str, order: str, granularity: str, start_step: int) -> None:
    settings = dict(clip_norm=0.1, start_step=start_step, granularity=granularity)
    model, opt, twin, inner = make_pair(name, **settings)
    frozen, clean_only = model.frozen.detach().clone(), model.clean_only.detach().clone()
    for step in range(5):
        wrapper_step(model, opt, step, order)
        hand_step(twin, inner, step, **settings)
        assert_same_params(model, twin)
        assert opt.step_count == step + 1
        assert opt.active == (step + 1 >= start_step)
    # Frozen and clean-only parameters never move, not even by weight decay, and keep no grad.
    assert torch.equal(model.frozen, frozen) and model.frozen.grad is None
    assert torch.equal(model.clean_only, clean_only) and model.clean_only.grad is None
    assert model.adversarial_only.grad is not None


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_works_with_torch_optimizers(name: str) -> None:
    model, opt, twin, inner = make_pair(name, clip_norm=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        wrapper_step(model, opt, step, "clean_first")
        hand_step(twin, inner, step, start_step=0, clip_norm=0.1, granularity="tensor")
    assert_same_params(model, twin)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.state is inner.state or len(opt.state) == len(inner.state)


def test_without_clipping_equals_hand_written_loop() -> None:
    model, opt, twin, inner = make_pair("SGD", clip_norm=None)
    for step in range(4):
        wrapper_step(model, opt, step, "clean_first")
        hand_step(twin, inner, step, start_step=0, clip_norm=None, granularity="tensor")
    assert_same_params(model, twin)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
@pytest.mark.parametrize("granularity", ["tensor", "group", "global"])
def test_last_stats_match_reference(granularity: str, fused: bool) -> None:
    model, opt, _, _ = make_pair("SGD", clip_norm=0.05, granularity=granularity, fused=fused)
    assert opt.last_stats is None
    x, x_adv, y = batch(0)
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    c = torch.autograd.grad(loss(model, x, y, False), params, allow_unused=True)
    a = torch.autograd.grad(loss(model, x_adv, y, True), params, allow_unused=True)
    wrapper_step(model, opt, 0, "clean_first")
    keep = [i for i, g in enumerate(a) if g is not None]
    groups = [gi for gi, g in enumerate(opt.param_groups) for p in g["params"] if p.requires_grad]
    segments = {"tensor": list(range(len(keep))), "group": [groups[i] for i in keep], "global": [0] * len(keep)}
    _, refs = reference_agr([a[i] for i in keep], [c[i] for i in keep], clip_norm=0.05,
                            segments=segments[granularity])
    stats = opt.last_stats
    assert isinstance(stats, ReconstructionStats)
    assert stats.num_segments == {"tensor": len(keep), "group": 2, "global": 1}[granularity]
    check_stats(stats, refs, 0.05, rounding_bound([torch.float32], sum(a[i].numel() for i in keep)))
    members = {"tensor": [(params[i],) for i in keep], "global": [tuple(params[i] for i in keep)],
               "group": [tuple(params[i] for i in keep if groups[i] == g) for g in (0, 1)]}[granularity]
    assert opt.last_segment_params == tuple(members)
    # The adversarial-only parameter has no clean gradient: cosine 0, identity projection.
    if granularity == "tensor":
        last = keep.index(next(i for i, p in enumerate(params) if p is model.adversarial_only))
        assert stats.cosine[last].item() == 0.0 and bool(stats.projected[last])


def test_closure_is_called_and_its_loss_returned() -> None:
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    x, x_adv, y = batch(0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss(model, x, y, False).backward()
        opt.stash_clean()
        value = loss(model, x_adv, y, True)
        value.backward()
        return value

    value = opt.step(closure)
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.1, granularity="tensor")
    assert isinstance(value, torch.Tensor) and value.item() > 0
    assert_same_params(model, twin)


# --------------------------------------------------------------------------- a real Optimizer, delegating
def test_is_an_optimizer_sharing_the_inner_objects() -> None:
    model = Net()
    inner = torch.optim.SGD(model.groups(), lr=0.1, momentum=0.9)
    opt = AGROptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    wrapper_step(model, opt, 0, "clean_first")
    # The inner optimizer's own load_state_dict rebinds its objects: still shared.
    inner.load_state_dict(inner.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state


def test_add_param_group_is_forwarded() -> None:
    model = Net()
    opt = AGROptimizer(torch.optim.SGD([model.lin1.weight], lr=0.1))
    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.optimizer.param_groups) == 2 and opt.optimizer.param_groups[1]["params"][0] is extra
    opt.zero_grad()
    (extra * torch.tensor([1.0, -1.0])).sum().backward()
    opt.stash_clean()
    (extra * torch.tensor([1.0, 1.0])).sum().backward()
    opt.step()
    # cos(a, c) = 0: r = a = (1, 1), clipped to norm 0.1, times lr 0.5.
    expected = 1 - 0.5 * 0.1 / math.sqrt(2)
    torch.testing.assert_close(extra.detach(), torch.full((2,), expected))


def test_step_hooks_fire() -> None:
    model = Net()
    opt = AGROptimizer(torch.optim.SGD(model.groups(), lr=0.1))
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(f"pre {o.step_count}"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(f"post {o.step_count}"))
    wrapper_step(model, opt, 0, "clean_first")
    wrapper_step(model, opt, 1, "clean_first")
    assert calls == ["pre 0", "post 1", "pre 1", "post 2"]


def _train_with_scheduler(make_scheduler, steps: int = 5, metric: bool = False):
    model = Net()
    opt = AGROptimizer(torch.optim.SGD(model.groups(), lr=0.1, momentum=0.9))
    scheduler = make_scheduler(opt)
    lrs = []
    for step in range(steps):
        wrapper_step(model, opt, step, "clean_first")
        scheduler.step(1.0) if metric else scheduler.step()
        lrs.append([g["lr"] for g in opt.optimizer.param_groups])
    return opt, lrs


def test_step_lr_drives_the_inner_lr() -> None:
    _, lrs = _train_with_scheduler(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    for k, group_lrs in enumerate(lrs):
        assert group_lrs == pytest.approx([0.1 * 0.5 ** (k + 1)] * 2)


def test_lambda_lr_drives_the_inner_lr() -> None:
    _, lrs = _train_with_scheduler(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1 / (k + 1)))
    for k, group_lrs in enumerate(lrs):
        assert group_lrs == pytest.approx([0.1 / (k + 2)] * 2)


def test_reduce_lr_on_plateau_drives_the_inner_lr() -> None:
    make = lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0)  # noqa: E731
    _, lrs = _train_with_scheduler(make, metric=True)
    # The first metric sets the best value; each later (equal, so no better) one halves the lr.
    for k, group_lrs in enumerate(lrs):
        assert group_lrs == pytest.approx([0.1 * 0.5**k] * 2)


def test_one_cycle_lr_drives_the_inner_lr_and_momentum() -> None:
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10)  # noqa: E731
    opt, lrs = _train_with_scheduler(make)
    # The same schedule on a plain SGD: the same lrs and momenta.
    plain = torch.optim.SGD(Net().groups(), lr=0.1, momentum=0.9)
    plain_scheduler = make(plain)
    for k in range(5):
        plain.step()
        plain_scheduler.step()
        assert lrs[k] == pytest.approx([g["lr"] for g in plain.param_groups])
    assert [g["momentum"] for g in opt.optimizer.param_groups] == pytest.approx(
        [g["momentum"] for g in plain.param_groups]
    )


# --------------------------------------------------------------------------- state dict
def test_state_dict_holds_inner_state_and_wrapper_entry() -> None:
    model, opt, _, _ = make_pair("SGD", clip_norm=0.2, start_step=1, granularity="group")
    for step in range(3):
        wrapper_step(model, opt, step, "clean_first")
    sd = opt.state_dict()
    inner_sd = opt.optimizer.state_dict()
    assert sd["state"].keys() == inner_sd["state"].keys()
    assert all(isinstance(k, int) for k in sd["state"])
    for k, value in inner_sd["state"].items():
        assert torch.equal(sd["state"][k]["momentum_buffer"], value["momentum_buffer"])
    expected = {"step": 3, "clip_norm": 0.2, "start_step": 1, "granularity": "group", "fused": True}
    for group, inner_group in zip(sd["param_groups"], inner_sd["param_groups"], strict=True):
        assert group["agr"] == expected
        assert {k: v for k, v in group.items() if k != "agr"} == inner_group
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh_model = Net()
    fresh = AGROptimizer(OPTIMIZERS["SGD"](fresh_model.groups()))
    fresh.load_state_dict(loaded)
    assert (fresh.step_count, fresh.clip_norm, fresh.start_step, fresh.granularity) == (3, 0.2, 1, "group")
    for p, q in zip(opt.optimizer.state.values(), fresh.optimizer.state.values(), strict=True):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])


@pytest.mark.parametrize("how", ["constructor", "setter"])
def test_numpy_settings_save_a_checkpoint_that_weights_only_loads(how) -> None:
    """Settings given as numpy scalars (a sweep's np.float32, a config read through numpy) are
    kept as plain Python: the state dict loads with ``weights_only=True``, as documented."""
    import numpy as np

    settings = {"clip_norm": np.float32(0.25), "start_step": np.int64(3), "granularity": np.str_("group"),
                "fused": np.str_("device")}
    params = Net().groups()
    if how == "constructor":
        opt = AGROptimizer(OPTIMIZERS["SGD"](params), **settings)
    else:
        opt = AGROptimizer(OPTIMIZERS["SGD"](params))
        for name, value in settings.items():
            setattr(opt, name, value)
        opt.step_count = np.int32(2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = AGROptimizer(OPTIMIZERS["SGD"](Net().groups()))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    expected = (float(np.float32(0.25)), 3, "group", "device")
    assert (fresh.clip_norm, fresh.start_step, fresh.granularity, fresh.fused) == expected
    assert [type(v) for v in (opt.clip_norm, opt.granularity, opt.fused)] == [float, str, str]
    # A checkpoint written with numpy settings (before this was fixed) passes none on when read.
    old = opt.state_dict()
    for group in old["param_groups"]:
        group["agr"] = {**group["agr"], **settings}
    fresh.load_state_dict(old)
    buffer = io.BytesIO()
    torch.save(fresh.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["param_groups"][0]["agr"]["clip_norm"] == expected[0]


def test_loading_a_plain_optimizer_state_dict() -> None:
    model = Net()
    plain = OPTIMIZERS["SGD"](model.groups())
    x, x_adv, y = batch(0)
    loss(model, x_adv, y, True).backward()
    plain.step()
    opt = AGROptimizer(OPTIMIZERS["SGD"](Net().groups()), clip_norm=0.3, start_step=5)
    opt.load_state_dict(plain.state_dict())
    assert (opt.step_count, opt.clip_norm, opt.start_step) == (0, 0.3, 5)
    assert len(opt.optimizer.state) == len(plain.state) > 0
    for s, t in zip(opt.optimizer.state.values(), plain.state.values(), strict=True):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
    assert all("agr" not in g for g in opt.optimizer.param_groups)


MALFORMED = {
    "negative-step": lambda e: {**e, "step": -1},
    "missing-key": lambda e: {k: v for k, v in e.items() if k != "fused"},
    "extra-key": lambda e: {**e, "momentum": 0.9},
    "bad-granularity": lambda e: {**e, "granularity": "layer"},
    "bad-clip": lambda e: {**e, "clip_norm": -1.0},
    "nan-clip": lambda e: {**e, "clip_norm": math.nan},
    "not-a-dict": lambda e: [1, 2],
    "fused-banana": lambda e: {**e, "fused": "banana"},
    "fused-int": lambda e: {**e, "fused": 1},
    "fractional-step-tensor": lambda e: {**e, "step": torch.tensor(2.7)},
    "float-step-tensor": lambda e: {**e, "step": torch.tensor(2.0)},
    "vector-step": lambda e: {**e, "step": torch.tensor([1, 2])},
    "bool-step": lambda e: {**e, "step": True},
    "float-start-step": lambda e: {**e, "start_step": 1.0},
    "string-clip": lambda e: {**e, "clip_norm": "0.1"},
}


@pytest.mark.parametrize("corrupt", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_agr_entry_raises_and_changes_nothing(corrupt) -> None:
    model, opt, _, _ = make_pair("SGD", clip_norm=0.1, start_step=1)
    for step in range(2):
        wrapper_step(model, opt, step, "clean_first")
    other_model, other, _, _ = make_pair("SGD", clip_norm=0.5, start_step=0)
    wrapper_step(other_model, other, 7, "clean_first")
    sd = other.state_dict()
    sd["param_groups"] = [{**g, "agr": corrupt(g["agr"])} for g in sd["param_groups"]]
    before_state = copy.deepcopy(opt.optimizer.state_dict())
    before_settings = (opt.step_count, opt.clip_norm, opt.start_step, opt.granularity, opt.fused)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['agr'\] entry"):
        opt.load_state_dict(sd)
    assert (opt.step_count, opt.clip_norm, opt.start_step, opt.granularity, opt.fused) == before_settings
    after_state = opt.optimizer.state_dict()
    assert after_state["param_groups"] == before_state["param_groups"]
    for k, v in before_state["state"].items():
        assert torch.equal(after_state["state"][k]["momentum_buffer"], v["momentum_buffer"])


GROUP_CORRUPTIONS = {
    "group-is-a-list": lambda groups: [list(groups[0].items()), *groups[1:]],
    "entry-in-one-group-only": lambda groups: [groups[0], {k: v for k, v in groups[1].items() if k != "agr"}],
    "entries-differ": lambda groups: [groups[0], {**groups[1], "agr": {**groups[1]["agr"], "step": 3}}],
}


@pytest.mark.parametrize("corrupt", GROUP_CORRUPTIONS.values(), ids=GROUP_CORRUPTIONS.keys())
def test_malformed_param_groups_raise_and_change_nothing(corrupt) -> None:
    model, opt, _, _ = make_pair("SGD", clip_norm=0.1, start_step=1)
    for step in range(2):
        wrapper_step(model, opt, step, "clean_first")
    sd = opt.state_dict()
    sd["param_groups"] = corrupt(sd["param_groups"])
    before = _state(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] is a list|param groups \[1\] lack|different 'agr'"):
        opt.load_state_dict(sd)
    _assert_state_unchanged(before, model, opt)


def test_integral_step_tensor_loads() -> None:
    model, opt, _, _ = make_pair("SGD")
    sd = opt.state_dict()
    sd["param_groups"] = [{**g, "agr": {**g["agr"], "step": torch.tensor(7)}} for g in sd["param_groups"]]
    opt.load_state_dict(sd)
    assert opt.step_count == 7 and type(opt.step_count) is int


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from agr_optim import AGROptimizer

    TOTAL = 6

    def build(seed, inner):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        if inner == "sgd":
            base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        else:
            base = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, AGROptimizer(base, clip_norm=0.1, start_step=2, granularity="tensor")

    def train(model, opt, steps):
        for step in steps:
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
            # FGSM on the current model: the attack depends on the weights, like real training.
            x_req = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_req), y), x_req)
            x_adv = (x + 0.1 * grad.sign()).detach()
            opt.zero_grad()
            if opt.active:
                nn.functional.cross_entropy(model(x), y).backward()
                opt.stash_clean()
            nn.functional.cross_entropy(model(x_adv), y).backward()
            opt.step()

    if __name__ == "__main__":
        inner, checkpoint, k, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
        model, opt = build(seed=12345, inner=inner)  # a fresh model, other weights
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        assert opt.step_count == k
        train(model, opt, range(k, TOTAL))
        torch.save({"params": [p.detach() for p in model.parameters()], "step": opt.step_count}, out)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("inner, k", [("sgd", 3), ("adam", 1)], ids=["sgd-after-warm-start", "adam-in-warm-start"])
def test_resume_in_a_fresh_process_is_bit_for_bit(tmp_path, inner: str, k: int) -> None:
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    namespace: dict = {"__name__": "resume_lib"}
    exec(compile(RESUME_SCRIPT, str(script), "exec"), namespace)
    build, train, total = namespace["build"], namespace["train"], namespace["TOTAL"]
    # The uninterrupted run.
    model, opt = build(seed=0, inner=inner)
    train(model, opt, range(total))
    # The interrupted one: k steps, a checkpoint, the rest in another process.
    model_k, opt_k = build(seed=0, inner=inner)
    train(model_k, opt_k, range(k))
    checkpoint, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save({"model": model_k.state_dict(), "optimizer": opt_k.state_dict()}, checkpoint)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script), inner, str(checkpoint), str(k), str(out)], check=True, env=env,
                   timeout=120)
    resumed = torch.load(out, weights_only=True)
    assert resumed["step"] == opt.step_count == total
    for p, q in zip(model.parameters(), resumed["params"], strict=True):
        assert torch.equal(p.detach(), q), "the resumed run differs from the uninterrupted one"


# --------------------------------------------------------------------------- bad input
def _state(model: Net, opt: AGROptimizer):
    params = snapshot(list(model.parameters()))
    grads = [p.grad for p in model.parameters()]
    return params, grads, copy.deepcopy(opt.optimizer.state_dict()), opt.step_count, opt.has_stash


def _assert_state_unchanged(before, model: Net, opt: AGROptimizer) -> None:
    params, grads, inner, count, has_stash = before
    for p, b in zip(model.parameters(), params, strict=True):
        assert torch.equal(p.detach(), b), "a parameter changed"
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is g, "a .grad changed"
    after = opt.optimizer.state_dict()
    assert after["param_groups"] == inner["param_groups"]
    assert after["state"].keys() == inner["state"].keys()
    for k, v in inner["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(t)), name
    assert opt.step_count == count and opt.has_stash == has_stash


def test_step_without_stash_while_active_raises_and_changes_nothing() -> None:
    model, opt, _, _ = make_pair("SGD", clip_norm=0.1)
    wrapper_step(model, opt, 0, "clean_first")
    x, x_adv, y = batch(1)
    opt.zero_grad()
    loss(model, x_adv, y, True).backward()
    grads = {p: None if p.grad is None else p.grad.clone() for p in model.parameters()}
    before = _state(model, opt)
    with pytest.raises(RuntimeError, match="no stashed gradient"):
        opt.step()
    _assert_state_unchanged(before, model, opt)
    for p, g in grads.items():
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


@pytest.mark.parametrize("kind", ["clean", "adversarial"])
def test_stash_twice_raises_and_changes_nothing(kind: str) -> None:
    """The same kind twice without the other in between: refused, naming gradient accumulation."""
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    x, x_adv, y = batch(0)
    opt.zero_grad()
    loss(model, x if kind == "clean" else x_adv, y, kind == "adversarial").backward()
    getattr(opt, f"stash_{kind}")()
    loss(model, x_adv if kind == "clean" else x, y, kind == "clean").backward()
    before = _state(model, opt)
    grad_values = snapshot([p.grad for p in model.parameters()])
    with pytest.raises(RuntimeError, match=f"{kind} gradient is already stashed.*gradient accumulation"):
        getattr(opt, f"stash_{kind}")()
    _assert_state_unchanged(before, model, opt)
    for p, g in zip(model.parameters(), grad_values, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    # The step still does the right thing with the stash kept.
    opt.step()
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.1, granularity="tensor")
    assert_same_params(model, twin)


@pytest.mark.parametrize("first", ["clean", "adversarial"])
def test_both_gradients_stashed_step_equals_the_plain_protocol(first: str) -> None:
    """The accumulation protocol with one micro-batch: both stashed, .grad empty, the same step."""
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    x, x_adv, y = batch(0)
    second = "adversarial" if first == "clean" else "clean"
    opt.zero_grad()
    loss(model, x if first == "clean" else x_adv, y, first == "adversarial").backward()
    getattr(opt, f"stash_{first}")()
    loss(model, x_adv if first == "clean" else x, y, first == "clean").backward()
    getattr(opt, f"stash_{second}")()
    assert all(p.grad is None for p in model.parameters()) and opt.has_stash
    opt.step()
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.1, granularity="tensor")
    assert_same_params(model, twin)
    assert not opt.has_stash and opt.step_count == 1


CONSTRUCTOR_ERRORS = [
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(clip_norm=math.nan), "clip_norm"),
    (dict(granularity="layer"), "granularity"),
    (dict(start_step=-1), "start_step"),
    (dict(start_step=1.5), "start_step"),
]


@pytest.mark.parametrize("kwargs, message", CONSTRUCTOR_ERRORS, ids=[str(k) for k, _ in CONSTRUCTOR_ERRORS])
def test_bad_settings_raise_and_leave_the_inner_optimizer_alone(kwargs: dict, message: str) -> None:
    model = Net()
    inner = torch.optim.SGD(model.groups(), lr=0.1, momentum=0.9)
    before = copy.deepcopy(inner.state_dict())
    hooks = (dict(inner._optimizer_step_pre_hooks), dict(inner._optimizer_step_post_hooks))
    with pytest.raises(ValueError, match=message):
        AGROptimizer(inner, **kwargs)
    assert inner.state_dict() == before
    assert (dict(inner._optimizer_step_pre_hooks), dict(inner._optimizer_step_post_hooks)) == hooks


def test_wrong_optimizer_types() -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        AGROptimizer(object())  # type: ignore[arg-type]
    opt = AGROptimizer(torch.optim.SGD(Net().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already an AGROptimizer"):
        AGROptimizer(opt)


class SparseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=True)
        self.head = nn.Linear(4, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(idx)).sum()


@pytest.mark.parametrize("kind", ["clean", "adversarial"])
def test_sparse_gradient_raises_and_changes_nothing(kind: str) -> None:
    model = SparseNet()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    model(torch.tensor([1, 2, 3])).backward()
    assert model.embedding.weight.grad.is_sparse
    before = _state(model, opt)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(10, 4\)\) has a sparse gradient"):
        getattr(opt, f"stash_{kind}")()
    _assert_state_unchanged(before, model, opt)  # type: ignore[arg-type]


def test_sparse_gradient_at_step_raises_and_changes_nothing() -> None:
    """A sparse gradient that appears after the stash (the second backward) is caught by step()."""
    model = Net()
    opt = AGROptimizer(torch.optim.SGD(model.groups(), lr=0.1))
    x, x_adv, y = batch(0)
    opt.zero_grad()
    loss(model, x, y, False).backward()
    opt.stash_clean()
    loss(model, x_adv, y, True).backward()
    model.lin1.bias.grad = model.lin1.bias.grad.to_sparse()
    before = _state(model, opt)
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    _assert_state_unchanged(before, model, opt)


def test_deepcopy_and_pickle_after_a_scheduler_and_hooks():
    """A copy steps its own parameters (not the original's through the scheduler's patched
    step), and pickling works with a scheduler and a lambda hook attached, as for torch's own
    optimizers: hooks and the patched step are not part of the copy."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_norm=None)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    opt.register_step_post_hook(lambda *args: None)
    clone = copy.deepcopy(opt)
    restored = pickle.loads(pickle.dumps(opt))
    for copied in (clone, restored):
        params = [p for g in copied.param_groups for p in g["params"]]
        assert not any(p is q for p, q in zip(params, model.parameters(), strict=True))
        before = [p.detach().clone() for p in model.parameters()]
        for p in params:
            p.grad = torch.ones_like(p)
        copied.stash_clean()
        for p in params:
            p.grad = torch.ones_like(p)
        copied.step()
        assert copied.step_count == 1 and opt.step_count == 0
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert not torch.equal(params[0], before[0])
        assert copied.optimizer.state[params[0]]["momentum_buffer"] is not None


def test_parameter_listed_twice_keeps_its_clean_gradient():
    """torch only warns about a parameter listed twice in a group; its clean gradient must not
    be lost (stashed as None on the second visit), which would turn the projection into r = a."""
    import warnings

    w = nn.Parameter(torch.tensor([1.0, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = AGROptimizer(torch.optim.SGD([w, w], lr=1.0), clip_norm=None)
    w.grad = torch.tensor([-1.0, 1.0])  # clean
    opt.stash_clean()
    w.grad = torch.tensor([1.0, 0.0])  # adversarial: cos < 0, projected to [0.5, 0.5]
    opt.step()
    # SGD steps a duplicated parameter once per listing: w - 2 * r.
    torch.testing.assert_close(w.detach(), torch.tensor([0.0, -1.0]))


# --------------------------------------------------------------------------- protocol edges (issue 9)
@pytest.mark.parametrize("start_step", [0, 5], ids=["active", "warm-start"])
def test_group_added_after_stash_adversarial_does_not_move(start_step: int) -> None:
    """A parameter with no adversarial gradient gets grad None and stays, even with a clean one."""
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1, start_step=start_step)
    extra = nn.Parameter(torch.ones(3))
    x, x_adv, y = batch(0)
    opt.zero_grad()
    loss(model, x_adv, y, True).backward()
    opt.stash_adversarial()
    opt.add_param_group({"params": [extra], "lr": 0.5})
    (loss(model, x, y, False) + 2 * extra.sum()).backward()  # the clean pass reaches it
    opt.step()
    assert torch.equal(extra.detach(), torch.ones(3)) and extra.grad is None
    assert extra not in opt.optimizer.state or not opt.optimizer.state[extra]
    hand_step(twin, inner, 0, start_step=start_step, clip_norm=0.1, granularity="tensor")
    assert_same_params(model, twin)


def _one_pair(opt: AGROptimizer, model: Net, step: int) -> None:
    x, x_adv, y = batch(step)
    opt.zero_grad()
    loss(model, x, y, False).backward()
    opt.stash_clean()
    loss(model, x_adv, y, True).backward()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_step_refuses_a_retry_until_zero_grad(error: type[BaseException]) -> None:
    """The inner step raising after the reconstruction: a retry would reconstruct twice."""
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    failing = [True]

    def pre_hook(optimizer, args, kwargs):
        if failing[0]:
            raise error("interrupted in the inner step")

    opt.optimizer.register_step_pre_hook(pre_hook)
    _one_pair(opt, model, 0)
    before = snapshot(list(model.parameters()))
    with pytest.raises(error):
        opt.step()
    failing[0] = False
    for retry in (opt.step, opt.stash_clean, opt.stash_adversarial):
        with pytest.raises(RuntimeError, match="interrupted.*reconstruct it twice.*zero_grad"):
            retry()
    assert opt.step_count == 0 and opt.last_stats is None
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))
    _one_pair(opt, model, 0)  # zero_grad() and both passes again: the step is the right one
    opt.step()
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.1, granularity="tensor")
    assert_same_params(model, twin)
    assert opt.step_count == 1


def test_an_optimizer_whose_step_needs_a_closure_is_refused() -> None:
    model = Net()
    inner = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match="LBFGS's step\\(\\) requires a closure"):
        AGROptimizer(inner)


@pytest.mark.parametrize("which", ["adversarial", "clean"])
def test_expanded_gradient_is_reconstructed_exactly(which: str) -> None:
    """An expanded current .grad (internally overlapping: torch refuses in-place writes into it)
    is reconstructed as the dense gradient it shows, and the user's tensor is left alone."""
    w = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))]
    opt = AGROptimizer(torch.optim.SGD(w, lr=1.0), clip_norm=0.5)
    clean = [torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([-1.0, 1.0, 2.0, 0.0])]
    adversarial = [torch.tensor([2.0, 1.0, -1.0, 0.5]), torch.tensor([0.5, -3.0, 1.0, 1.0])]
    expanded = torch.full((1,), 0.75).expand(4)
    first, second = (clean, adversarial) if which == "adversarial" else (adversarial, clean)
    second[1] = expanded
    for p, g in zip(w, first, strict=True):
        p.grad = g.clone()
    opt.stash_clean() if which == "adversarial" else opt.stash_adversarial()
    for p, g in zip(w, second, strict=True):
        p.grad = g if g is expanded else g.clone()
    opt.step()
    r, _ = reference_agr(adversarial, clean, clip_norm=0.5, segments=[0, 1])
    for p, ri in zip(w, r, strict=True):
        torch.testing.assert_close(p.detach().double(), torch.from_numpy(-ri), rtol=1e-6, atol=1e-7)
    assert torch.equal(expanded, torch.full((4,), 0.75))


def test_gradients_sharing_memory_are_refused_before_any_write() -> None:
    """Two adversarial gradients overlapping in one buffer: reconstructing one in place would
    change the other's input. Refused, nothing changed."""
    w = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))]
    opt = AGROptimizer(torch.optim.SGD(w, lr=1.0), clip_norm=0.5)
    for p in w:
        p.grad = torch.randn(4)
    opt.stash_clean()
    buffer = torch.randn(5)
    w[0].grad, w[1].grad = buffer[:4], buffer[1:]
    before = buffer.clone()
    with pytest.raises(ValueError, match="cannot reconstruct: adversarial\\[0\\] and adversarial\\[1\\] share memory"):
        opt.step()
    assert torch.equal(buffer, before) and all(torch.equal(p.detach(), torch.zeros(4)) for p in w)
    assert opt.has_stash and opt.step_count == 0


@pytest.mark.parametrize("start_step", [0, 5], ids=["active", "warm-start"])
def test_stash_after_both_backward_passes_is_refused(start_step: int) -> None:
    """stash_clean() after both passes leaves no current gradient: refused, nothing changed."""
    model, opt, _, _ = make_pair("SGD", clip_norm=0.1, start_step=start_step)
    x, x_adv, y = batch(0)
    opt.zero_grad()
    loss(model, x, y, False).backward()
    loss(model, x_adv, y, True).backward()
    opt.stash_clean()
    before = _state(model, opt)
    with pytest.raises(RuntimeError, match=r"no current gradient.*stash_clean\(\) goes between the two backward"):
        opt.step()
    _assert_state_unchanged(before, model, opt)


@pytest.mark.parametrize("kind", ["clean", "adversarial"])
def test_stash_before_any_backward_pass_is_refused(kind: str) -> None:
    """Stashing nothing would make the step use a zero gradient of that kind, silently."""
    model, opt, _, _ = make_pair("SGD", clip_norm=0.1)
    opt.zero_grad()
    before = _state(model, opt)
    with pytest.raises(RuntimeError, match=f"stash_{kind}\\(\\) found no gradient on any parameter"):
        getattr(opt, f"stash_{kind}")()
    _assert_state_unchanged(before, model, opt)


SETTING_ERRORS = [
    ("clip_norm", -0.1), ("clip_norm", 0), ("clip_norm", math.nan), ("clip_norm", True), ("granularity", "Tensor"),
    ("granularity", None), ("fused", "banana"), ("start_step", -1), ("start_step", 1.5),
]


@pytest.mark.parametrize("name, value", SETTING_ERRORS, ids=[f"{n}={v!r}" for n, v in SETTING_ERRORS])
def test_assigned_settings_are_validated(name: str, value: object) -> None:
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        setattr(opt, name, value)
    assert (opt.clip_norm, opt.start_step, opt.granularity, opt.fused) == (0.1, 0, "tensor", True)
    wrapper_step(model, opt, 0, "clean_first")  # the step still uses the valid settings
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.1, granularity="tensor")
    assert_same_params(model, twin)


def test_settings_are_assignable_and_the_checkpoint_wins_on_load() -> None:
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    saved = opt.state_dict()
    opt.clip_norm, opt.granularity, opt.start_step, opt.fused = 0.05, "global", 0, False
    assert (opt.clip_norm, opt.granularity, opt.fused) == (0.05, "global", False)
    wrapper_step(model, opt, 0, "clean_first")
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.05, granularity="global")
    assert_same_params(model, twin)
    assert opt.state_dict()["param_groups"][0]["agr"]["clip_norm"] == 0.05
    opt.load_state_dict(saved)
    assert (opt.clip_norm, opt.granularity, opt.fused, opt.step_count) == (0.1, "tensor", True, 0)
    opt.clip_norm = 0.2  # still assignable after a load
    assert opt.clip_norm == 0.2 and copy.deepcopy(opt).clip_norm == 0.2


@pytest.mark.parametrize("when", ["step", "build"])
def test_lr_scheduler_while_a_gradient_is_stashed(when: str) -> None:
    """Schedulers see exactly the inner groups, stash or not (no KeyError from a stash group)."""
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if when == "step" else None
    x, x_adv, y = batch(0)
    opt.zero_grad()
    loss(model, x, y, False).backward()
    opt.stash_clean()
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        lrs = [0.1, 0.1]
    else:
        with pytest.warns(UserWarning, match="lr_scheduler.step\\(\\)` before `optimizer.step"):
            scheduler.step()
        lrs = [0.05, 0.05]
    assert [g["lr"] for g in opt.optimizer.param_groups] == pytest.approx(lrs)
    loss(model, x_adv, y, True).backward()
    opt.step()
    for g, lr in zip(inner.param_groups, lrs, strict=True):
        g["lr"] = lr
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.1, granularity="tensor")
    assert_same_params(model, twin)


def test_warm_start_with_a_clean_stash_sets_statistics_only() -> None:
    """In the warm start a stashed clean gradient gives last_stats; the update stays a, unclipped."""
    model, opt, twin, inner = make_pair("SGD", clip_norm=0.05, start_step=3)
    x, x_adv, y = batch(0)
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    c = torch.autograd.grad(loss(model, x, y, False), params, allow_unused=True)
    a = torch.autograd.grad(loss(model, x_adv, y, True), params, allow_unused=True)
    opt.zero_grad()
    loss(model, x, y, False).backward()
    opt.stash_clean()
    loss(model, x_adv, y, True).backward()
    opt.step()
    hand_step(twin, inner, 0, start_step=3, clip_norm=0.05, granularity="tensor")
    assert_same_params(model, twin)
    keep = [i for i, g in enumerate(a) if g is not None]
    _, refs = reference_agr([a[i] for i in keep], [c[i] for i in keep], clip_norm=0.05, segments=range(len(keep)))
    assert opt.step_count == 1 and not opt.active
    check_stats(opt.last_stats, refs, 0.05, rounding_bound([torch.float32], sum(a[i].numel() for i in keep)))
    assert opt.last_segment_params == tuple((params[i],) for i in keep)


def test_copy_and_wrapper_subclass_instances_delegate() -> None:
    """copy.copy shares the inner optimizer, as a copy of any wrapper would."""
    model, opt, _, _ = make_pair("SGD")
    shallow = copy.copy(opt)
    assert shallow.param_groups is opt.optimizer.param_groups and shallow.state is opt.optimizer.state
    assert shallow.defaults is opt.optimizer.defaults and not shallow.has_stash


def test_strip_agr_state_loads_into_a_plain_optimizer() -> None:
    from agr_optim import strip_agr_state

    model, opt, twin, inner = make_pair("SGD", clip_norm=0.1)
    wrapper_step(model, opt, 0, "clean_first")
    hand_step(twin, inner, 0, start_step=0, clip_norm=0.1, granularity="tensor")
    saved = opt.state_dict()
    plain = OPTIMIZERS["SGD"](twin.groups())
    plain.load_state_dict(strip_agr_state(saved))
    assert all("agr" not in g for g in plain.param_groups)
    assert all("agr" in g for g in saved["param_groups"])  # the argument is left as it was
    assert [{k: v for k, v in g.items() if k != "params"} for g in plain.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in inner.param_groups
    ]
    for s, t in zip(plain.state.values(), opt.optimizer.state.values(), strict=True):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
    for bad in ([1, 2], {"state": {}}, {"param_groups": [[1]]}):
        with pytest.raises(ValueError, match="param_groups"):
            strip_agr_state(bad)  # type: ignore[arg-type]
