"""``AGROptimizer.backward(clean=..., adversarial=...)``, the settable ``step_count``, and a stash
dropped by ``zero_grad()`` (issue 16, items 2-4): each against the two-pass protocol it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agr_optim import AGROptimizer

FUSED = pytest.mark.parametrize("fused", [True, "device"], ids=["host", "rows"])


def _setup(fused, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_norm=0.5, fused=fused)
    return model, opt


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def _trades_losses(model, x, x_adv, y):
    """A TRADES-style pair: the clean logits are in both objectives (one shared forward)."""
    logits = model(x)
    loss_c = F.cross_entropy(logits, y)
    loss_a = loss_c + 6.0 * F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return loss_c, loss_a


def _at_losses(model, x, x_adv, y):
    """A PGD-AT-style pair: two separate forwards."""
    return F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)


LOSSES = pytest.mark.parametrize("losses", [_trades_losses, _at_losses], ids=["shared-forward", "two-forwards"])


def _two_pass(model, opt, batch, losses, order):
    opt.zero_grad()
    loss_c, loss_a = losses(model, *batch)
    first, second = (loss_c, loss_a) if order == "clean" else (loss_a, loss_c)
    first.backward(retain_graph=True)
    (opt.stash_clean if order == "clean" else opt.stash_adversarial)()
    second.backward()
    opt.step()


@FUSED
@LOSSES
@pytest.mark.parametrize("order", ["clean", "adversarial"])
def test_backward_equals_the_two_pass_protocol(fused, losses, order):
    model, opt = _setup(fused)
    twin, twin_opt = _setup(fused)
    for batch in _batches():
        _two_pass(twin, twin_opt, batch, losses, order)
        opt.zero_grad()
        opt.backward(**dict(zip(("clean", "adversarial"), losses(model, *batch), strict=True)))
        opt.step()
        torch.testing.assert_close(opt.last_stats.cosine, twin_opt.last_stats.cosine, rtol=1e-12, atol=1e-12)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.step_count == twin_opt.step_count == 3


def _two_pass_step(model, opt, micro):
    """The documented accumulation protocol, the reference for ``backward()``: both passes
    stashed in every micro-batch (each loss over ``len(micro)``), then one step."""
    opt.zero_grad()
    for batch in micro:
        loss_c, loss_a = _trades_losses(model, *batch)
        (loss_c / len(micro)).backward(retain_graph=True)
        opt.stash_clean()
        (loss_a / len(micro)).backward()
        opt.stash_adversarial()
    opt.step()


@FUSED
def test_backward_calls_before_a_step_accumulate_like_micro_batches(fused):
    model, opt = _setup(fused)
    twin, twin_opt = _setup(fused)
    batches = _batches(4)
    for step in range(2):
        micro = batches[2 * step: 2 * step + 2]
        _two_pass_step(twin, twin_opt, micro)
        opt.zero_grad()
        for batch in micro:
            loss_c, loss_a = _trades_losses(model, *batch)
            opt.backward(clean=loss_c / 2, adversarial=loss_a / 2)
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@FUSED
def test_backward_ignores_what_the_loss_function_did_to_grad(fused):
    """A MART-style reference loss calls optimizer.zero_grad() inside and leaves .grad behind:
    neither enters the gradients that backward() stashes."""
    model, opt = _setup(fused)
    twin, twin_opt = _setup(fused)
    for batch in _batches():
        _two_pass(twin, twin_opt, batch, _trades_losses, "clean")

        opt.zero_grad()
        loss_c, loss_a = _trades_losses(model, *batch)
        opt.zero_grad()  # inside the reference loss function
        for p in model.parameters():  # ... and whatever else it left in .grad
            p.grad = torch.full_like(p, 7.0)
        opt.backward(clean=loss_c, adversarial=loss_a)
        assert all(p.grad is None for p in model.parameters())
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_shared_forward_is_kept_for_the_second_pass_and_freed_by_it():
    model, opt = _setup(True)
    x, x_adv, y = _batches(1)[0]
    loss_c, loss_a = _trades_losses(model, x, x_adv, y)
    opt.backward(clean=loss_c, adversarial=loss_a)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss_a.backward()
    # Two separate forwards: nothing is kept (the clean graph is freed by its own pass).
    loss_c, loss_a = _at_losses(model, x, x_adv, y)
    opt.zero_grad()
    opt.backward(clean=loss_c, adversarial=loss_a)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss_c.backward()


def test_backward_under_grad_scaler_equals_the_unscaled_run():
    model, opt = _setup(True)
    twin, twin_opt = _setup(True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for batch in _batches():
        _two_pass(twin, twin_opt, batch, _trades_losses, "clean")
        opt.zero_grad()
        loss_c, loss_a = _trades_losses(model, *batch)
        opt.backward(clean=scaler.scale(loss_c), adversarial=scaler.scale(loss_a))
        scaler.step(opt)
        scaler.update()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_backward_refuses_what_is_not_a_loss_and_changes_nothing():
    model, opt = _setup(True)
    x, x_adv, y = _batches(1)[0]
    loss_c, loss_a = _at_losses(model, x, x_adv, y)
    with pytest.raises(ValueError, match=r"clean must be a scalar loss tensor .*shape \(6, 3\)"):
        opt.backward(clean=model(x), adversarial=loss_a)
    with pytest.raises(ValueError, match="adversarial must be a scalar loss tensor .*requires_grad=False"):
        opt.backward(clean=loss_c, adversarial=loss_a.detach())
    assert not opt.has_stash and all(p.grad is None for p in model.parameters())


def test_backward_without_a_clean_loss_is_the_warm_start_pass():
    model, opt = _setup(True)
    opt.start_step = 1
    x, x_adv, y = _batches(1)[0]
    opt.zero_grad()
    opt.backward(clean=None, adversarial=F.cross_entropy(model(x_adv), y))
    assert not opt.has_stash and all(p.grad is not None for p in model.parameters())
    opt.step()
    assert opt.step_count == 1


# --------------------------------------------------------------------------- step_count
def test_step_count_is_settable_and_validated():
    model, opt = _setup(True)
    opt.step_count = 7
    assert opt.step_count == 7 and opt.state_dict()["param_groups"][0]["agr"]["step"] == 7
    for bad in (-1, 1.5, True, "3", None):
        with pytest.raises(ValueError, match=f"Invalid step_count: {bad!r}; expected an integer >= 0"):
            opt.step_count = bad
        assert opt.step_count == 7
    x, x_adv, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.stash_clean()
    with pytest.raises(RuntimeError, match="step_count cannot change while a gradient is stashed"):
        opt.step_count = 0
    assert opt.step_count == 7 and opt.has_stash


def test_a_plain_run_continues_into_agr_at_its_own_step():
    """The recipe of the tutorials: a checkpoint of a plain SGD run loaded into AGR's schedule,
    ``step_count`` set to the steps done, so that AGR starts at ``start_step`` of the whole run."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(5)
    for _, x_adv, y in batches[:3]:  # three plain steps
        sgd.zero_grad()
        F.cross_entropy(model(x_adv), y).backward()
        sgd.step()
    saved = sgd.state_dict()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), start_step=4)
    opt.load_state_dict(saved)
    opt.step_count = 3
    assert not opt.active  # step 3 of the run: still the warm start
    for x, x_adv, y in batches[3:]:
        opt.zero_grad()
        if opt.active:
            F.cross_entropy(model(x), y).backward()
            opt.stash_clean()
        F.cross_entropy(model(x_adv), y).backward()
        opt.step()
    assert opt.step_count == 5 and opt.last_stats is not None  # step 4 reconstructed


# --------------------------------------------------------------------------- a dropped stash
def test_a_stash_dropped_by_zero_grad_says_so():
    model, opt = _setup(True)
    x, x_adv, y = _batches(1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.stash_clean()
    opt.zero_grad()  # e.g. inside a reference loss function
    F.cross_entropy(model(x_adv), y).backward()
    with pytest.raises(RuntimeError, match=r"stash_clean\(\)\) and then dropped by zero_grad\(\)"):
        opt.step()
    opt.zero_grad()  # an ordinary zero_grad with nothing stashed: no such note
    F.cross_entropy(model(x_adv), y).backward()
    with pytest.raises(RuntimeError) as caught:
        opt.step()
    assert "dropped by zero_grad" not in str(caught.value)


def test_backward_refuses_a_loss_that_reaches_no_parameter_and_changes_nothing():
    model, opt = _setup(True)
    other = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x, x_adv, y = _batches(1)[0]
    with pytest.raises(ValueError, match="the clean loss reaches none of the optimizer's parameters"):
        opt.backward(clean=(other * 2).sum(), adversarial=F.cross_entropy(model(x_adv), y))
    assert not opt.has_stash and all(p.grad is None for p in model.parameters())


def test_a_failed_pass_leaves_no_half_stash():
    model, opt = _setup(True)
    x, x_adv, y = _batches(1)[0]

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    loss_c = F.cross_entropy(model(x), y)
    loss_a = F.cross_entropy(Boom.apply(model(x_adv)), y)
    with pytest.raises(RuntimeError, match="boom"):
        opt.backward(clean=loss_c, adversarial=loss_a)
    assert not opt.has_stash and opt._stash.passes == {}
    loss_c, loss_a = _at_losses(model, x, x_adv, y)
    opt.backward(clean=loss_c, adversarial=loss_a)  # a retry works
    opt.step()
    assert opt.step_count == 1


def test_the_dropped_stash_note_survives_a_second_zero_grad():
    model, opt = _setup(True)
    x, x_adv, y = _batches(1)[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.stash_clean()
    opt.zero_grad()  # the one inside a loss function ...
    opt.zero_grad()  # ... and another
    F.cross_entropy(model(x_adv), y).backward()
    with pytest.raises(RuntimeError, match="dropped by zero_grad"):
        opt.step()


# --------------------------------------------------------------------------- review fixes
@FUSED
def test_backward_without_a_clean_loss_ignores_what_was_left_in_grad_and_accumulates_its_own(fused):
    """The warm start through ``backward(clean=None, ...)`` with no ``zero_grad()`` (the other
    calls need none): each step's update is its own adversarial gradient, not plus the last step's
    update left in ``.grad`` or an attack's parameter gradients; calls before one step add up.
    Against plain SGD on the adversarial loss (what the warm start is)."""
    model, opt = _setup(fused)
    opt.start_step = 10
    twin = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    twin.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(6)
    for step in range(3):
        micro = batches[2 * step: 2 * step + 2]
        sgd.zero_grad()
        for _x, x_adv, y in micro:
            (F.cross_entropy(twin(x_adv), y) / 2).backward()
        sgd.step()
        F.cross_entropy(model(micro[0][0]), micro[0][2]).backward()  # e.g. an attack's backward pass
        for _x, x_adv, y in micro:
            opt.backward(clean=None, adversarial=F.cross_entropy(model(x_adv), y) / 2)
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_backward_without_a_clean_loss_refuses_a_loss_that_reaches_no_parameter():
    model, opt = _setup(True)
    opt.start_step = 1
    other = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="the adversarial loss reaches none of the optimizer's parameters"):
        opt.backward(clean=None, adversarial=(other * 2).sum())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())  # nothing changed


def test_a_dropped_clean_stash_is_named_when_the_adversarial_one_was_stashed_after_it():
    """Stashing both (the accumulation recipe) around a loss function that calls zero_grad():
    the refusal names the dropped clean stash, not the order of the stashes."""
    model, opt = _setup(True)
    x, x_adv, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.stash_clean()
    opt.zero_grad()  # inside a reference loss function
    F.cross_entropy(model(x_adv), y).backward()
    opt.stash_adversarial()
    with pytest.raises(RuntimeError, match=r"stash_clean\(\)\) and then dropped by zero_grad\(\)"):
        opt.step()


@FUSED
def test_backward_refused_at_the_stash_leaves_grad_and_the_stash_as_they_were(fused):
    """The model cast between two accumulating calls: the refusal comes before anything changes
    (``.grad`` as the training code left it, the first call's stash whole), and the step after
    casting back equals the two-pass protocol of the calls that went through."""
    model, opt = _setup(fused)
    twin, twin_opt = _setup(fused)
    first, second, third = _batches(3)
    twin_opt.zero_grad()
    for batch in (first, third):
        loss_c, loss_a = _trades_losses(twin, *batch)
        loss_c.backward(retain_graph=True)
        twin_opt.stash_clean()
        loss_a.backward()
        twin_opt.stash_adversarial()
    twin_opt.step()

    opt.zero_grad()
    opt.backward(**dict(zip(("clean", "adversarial"), _trades_losses(model, *first), strict=True)))
    model.float()
    left = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), left, strict=True):
        p.grad = g
    x, x_adv, y = second
    with pytest.raises(RuntimeError, match="does not match its stashed clean gradient"):
        opt.backward(**dict(zip(("clean", "adversarial"), _trades_losses(model, x.float(), x_adv.float(), y),
                                strict=True)))
    assert all(p.grad is g for p, g in zip(model.parameters(), left, strict=True))
    assert opt._stash.passes == {"clean": 1, "adversarial": 1}
    model.double()
    opt.backward(**dict(zip(("clean", "adversarial"), _trades_losses(model, *third), strict=True)))
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_backward_refuses_a_sparse_gradient_before_changing_anything():
    embedding = nn.Embedding(5, 3, sparse=True).double()
    opt = AGROptimizer(torch.optim.SGD(embedding.parameters(), lr=0.1))
    index = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(5, 3\)\) has a sparse gradient"):
        opt.backward(clean=embedding(index).sum(), adversarial=embedding(index).pow(2).sum())
    assert embedding.weight.grad is None and not opt.has_stash


def test_a_loss_function_given_the_inner_optimizer_keeps_the_accumulated_calls():
    """The tutorial's porting loop under accumulation: the loss function's zero_grad() on
    ``opt.optimizer`` clears ``.grad`` only, so every call's gradients reach the step."""
    model, opt = _setup(True)
    twin, twin_opt = _setup(True)
    micro = _batches(2)
    _two_pass_step(twin, twin_opt, micro)
    for batch in micro:
        opt.optimizer.zero_grad()  # inside the reference loss function
        loss_c, loss_a = _trades_losses(model, *batch)
        opt.backward(clean=loss_c / 2, adversarial=loss_a / 2)
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_tensors_outside_the_optimizer_get_both_passes_in_grad():
    """As from ``loss_c.backward(); loss_a.backward()``: a layer another optimizer trains keeps
    the sum of both gradients, computed here by autograd.grad."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = AGROptimizer(torch.optim.SGD(model[2].parameters(), lr=0.1))
    loss_c, loss_a = _trades_losses(model, *_batches(1)[0])
    outside = list(model[0].parameters())
    expected = [c + a for c, a in zip(torch.autograd.grad(loss_c, outside, retain_graph=True),
                                      torch.autograd.grad(loss_a, outside, retain_graph=True), strict=True)]
    opt.backward(clean=loss_c, adversarial=loss_a)
    for p, g in zip(outside, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model[2].parameters()) and opt.has_stash
