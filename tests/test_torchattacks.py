"""Attacks from torchattacks (the real package) and other ``attack(x, y)`` callables in the recipes.

The references are the recipes' own :class:`~agr_optim.recipes.PGD` with the same settings (it is
checked against hand-written steps in ``test_recipes.py``) and direct calls of the attacks.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from agr_optim import AGROptimizer
from agr_optim.recipes import PGD, as_attack, mart_step, pgd_at_step, trades_step

torchattacks = pytest.importorskip("torchattacks")

DTYPE = torch.float64


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.25), nn.Linear(6, 3)
    ).to(DTYPE)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=DTYPE)
    x[0] = 0.0  # pixels on the data range's edges
    x[1] = 1.0
    return x, torch.randint(0, 3, (n,), generator=g)


def agr(model: nn.Module) -> AGROptimizer:
    return AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_norm=0.1)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    ("step", "make_theirs", "ours"),
    [
        # PGD without random start: the same iteration as ours (mean versus summed loss: same sign).
        (pgd_at_step, lambda m: torchattacks.PGD(m, eps=0.1, alpha=0.03, steps=5, random_start=False),
         PGD(eps=0.1, alpha=0.03, steps=5, random_start="none")),
        # FGSM is one PGD step of size eps from x.
        (mart_step, lambda m: torchattacks.FGSM(m, eps=0.1), PGD(eps=0.1, alpha=0.1, steps=1, random_start="none")),
        (trades_step, lambda m: torchattacks.PGD(m, eps=0.05, alpha=0.02, steps=3, random_start=False),
         PGD(eps=0.05, alpha=0.02, steps=3, random_start="none")),
    ],
    ids=["pgd_at+PGD", "mart+FGSM", "trades+PGD"],
)
def test_torchattacks_attack_gives_the_step_of_the_same_attack(step, make_theirs, ours) -> None:
    x, y = batch()
    model_theirs, model_ours = tiny_model(), tiny_model()
    opt_theirs, opt_ours = agr(model_theirs), agr(model_ours)
    for k in range(3):  # the update moves the model: later attacks see different weights
        torch.manual_seed(k)  # the same dropout masks in both
        out_theirs = step(model_theirs, opt_theirs, x, y, attack=make_theirs(model_theirs))
        torch.manual_seed(k)
        out_ours = step(model_ours, opt_ours, x, y, attack=ours)
        torch.testing.assert_close(out_theirs.x_adv, out_ours.x_adv, rtol=0, atol=1e-12)
        assert float((out_theirs.x_adv - x).abs().max()) > 0.5 * ours.eps  # the attack did move x
        torch.testing.assert_close(out_theirs.loss, out_ours.loss, rtol=0, atol=1e-12)
        assert_same_state(snapshot(model_theirs), snapshot(model_ours))
    assert opt_theirs.step_count == 3 and opt_theirs.last_stats is not None


def test_torchattacks_attack_result_is_the_attacks_own() -> None:
    # With random start: the recipe gets exactly what the attack returns for the same RNG state.
    x, y = batch()
    model = tiny_model()
    atk = torchattacks.PGD(model, eps=0.1, alpha=0.03, steps=4)
    reference_model = copy.deepcopy(model)
    reference = torchattacks.PGD(reference_model, eps=0.1, alpha=0.03, steps=4)
    torch.manual_seed(5)
    expected = reference(x, y)
    torch.manual_seed(5)
    out = pgd_at_step(model, agr(model), x, y, attack=atk)
    torch.testing.assert_close(out.x_adv, expected, rtol=0, atol=0)


def test_modes_restored_where_torchattacks_alone_does_not() -> None:
    x, y = batch()
    model = tiny_model().train()
    model[2].eval()  # a frozen BatchNorm
    model[4].eval()
    atk = torchattacks.PGD(model, eps=0.1, alpha=0.03, steps=2)
    # torchattacks alone: model.train() afterwards, which unfreezes the frozen submodules.
    atk(x, y)
    assert model[2].training and model[4].training
    model[2].eval()
    model[4].eval()
    running_mean = model[2].running_mean.clone()
    pgd_at_step(model, agr(model), x, y, attack=atk)
    assert model.training and not model[2].training and not model[4].training
    assert [m.training for m in model] == [True, True, False, True, False, True]
    torch.testing.assert_close(model[2].running_mean, running_mean, rtol=0, atol=0)  # eval: untouched


def test_modes_restored_when_the_torchattacks_attack_raises() -> None:
    x, _ = batch()
    model = tiny_model().train()
    opt = agr(model)
    before = snapshot(model)
    with pytest.raises(IndexError):  # label 7 of 3 classes, inside torchattacks' cross-entropy
        pgd_at_step(model, opt, x, torch.full((len(x),), 7), attack=torchattacks.FGSM(model, eps=0.1))
    assert all(m.training for m in model.modules())  # torchattacks alone leaves it in eval mode
    assert opt.step_count == 0
    assert_same_state(before, snapshot(model))


def test_attack_bound_to_another_model_is_refused_before_anything_changes() -> None:
    x, y = batch()
    model, other = tiny_model(0), tiny_model(1)
    opt = agr(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    for attack in (torchattacks.PGD(other), as_attack(lambda x, y: x, model=other)):
        with pytest.raises(ValueError, match=r"^attack: the attack is bound to another model"):
            pgd_at_step(model, opt, x, y, attack=attack)
    # A wrapper in front (normalisation, say) is another model: the attack sees other inputs.
    with pytest.raises(ValueError, match="another model"):
        trades_step(model, opt, x, y, attack=torchattacks.PGD(nn.Sequential(nn.Identity(), model)))
    with pytest.raises(ValueError, match=r"^model: the attack is bound to another model"):
        as_attack(torchattacks.FGSM(other), model=model)
    assert_same_state(before, snapshot(model))
    assert opt.step_count == 0 and all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_wrappers_that_only_distribute_are_looked_through(tmp_path) -> None:
    x, y = batch()
    model = tiny_model()
    parallel = nn.DataParallel(model)  # on CPU: forwards to model
    out = pgd_at_step(parallel, agr(model), x, y, attack=torchattacks.FGSM(model, eps=0.1))
    assert out.x_adv.shape == x.shape
    as_attack(torchattacks.FGSM(parallel), model=model)  # and the other way round
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        reference = PGD(eps=0.1, alpha=0.1, steps=1, random_start="none")(model, x, y)
        out = pgd_at_step(ddp, agr(ddp), x, y, attack=torchattacks.FGSM(model, eps=0.1))
        torch.testing.assert_close(out.x_adv, reference, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="another model"):
            pgd_at_step(ddp, agr(ddp), x, y, attack=torchattacks.FGSM(tiny_model(1)))
    finally:
        torch.distributed.destroy_process_group()


def test_two_argument_callable_through_as_attack() -> None:
    x, y = batch()
    model = tiny_model()
    model[4].eval()
    reference_model = copy.deepcopy(model)
    seen_modes = []

    def fgsm_on(net: nn.Module):
        def fgsm(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            seen_modes.append(net.training)
            inputs = inputs.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(nn.functional.cross_entropy(net(inputs), labels), inputs)
            net.eval()  # an attack that changes modes and does not restore them
            return (inputs + 0.1 * g.sign()).clamp(0, 1)

        return fgsm

    expected = fgsm_on(reference_model)(x, y)
    out = pgd_at_step(model, agr(model), x, y, attack=as_attack(fgsm_on(model), model=model))
    assert seen_modes == [True, True]  # called in the caller's mode
    torch.testing.assert_close(out.x_adv, expected, rtol=0, atol=0)
    assert [m.training for m in model] == [True, True, True, True, False, True]


def test_two_argument_callable_without_adapter_is_refused_with_the_way_out() -> None:
    x, y = batch()
    model = tiny_model()
    opt = agr(model)
    with pytest.raises(TypeError, match=r"as_attack\(attack, model=model\)"):
        pgd_at_step(model, opt, x, y, attack=lambda inputs, labels: inputs)
    atk = torchattacks.PGD(model)
    with pytest.raises(TypeError, match=r"pass the attack itself \(attack=atk\), not atk.forward"):
        pgd_at_step(model, opt, x, y, attack=atk.forward)
    with pytest.raises(TypeError, match="attack must be callable"):
        pgd_at_step(model, opt, x, y, attack="pgd")
    with pytest.raises(TypeError, match="needs model="):
        as_attack(lambda inputs, labels: inputs)
    with pytest.raises(TypeError, match=r"attack\(x, y\)"):
        as_attack(lambda inputs: inputs, model=model)
    with pytest.raises(RuntimeError, match="expected a tensor of the inputs' shape"):
        pgd_at_step(model, opt, x, y, attack=as_attack(lambda inputs, labels: inputs[:2], model=model))
    assert opt.step_count == 0


def test_torchattacks_device_stale_after_moving_the_model() -> None:
    with torch.device("meta"):
        model = tiny_model()
    atk = torchattacks.FGSM(model)  # reads the device once, here: meta
    model.to_empty(device="cpu")
    x, y = batch()
    with pytest.raises(RuntimeError, match=r"attack.set_device\('cpu'\)"):
        pgd_at_step(model, agr(model), x, y, attack=atk)
    atk.set_device("cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model[2].reset_running_stats()
    assert pgd_at_step(model, agr(model), x, y, attack=atk).x_adv.shape == x.shape


def test_recipes_do_not_import_torchattacks() -> None:
    code = (
        "import sys, torch\n"
        "from agr_optim.recipes import PGD, pgd_at_step\n"
        "model = torch.nn.Linear(4, 3)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "pgd_at_step(model, opt, torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]), attack=PGD(steps=1))\n"
        "assert 'torchattacks' not in sys.modules, 'imported'\n"
    )
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
