"""The recipes' ``authors=True`` against an independent re-implementation of the AGR authors' step.

``tests/_authors_reference.py`` restates their ``train.py`` (with ``attack.py``, ``mart.py``,
``awp.py``, ``AGR.py``) in torch without importing ``agr_optim``. With the same initial weights,
batches, random starts and AVmixup draws, the recipes' authors' step must equal it bit for bit
without AGR and in AGR's warm start (parameters, BatchNorm buffers, momentum, the logged losses
and logits), and within rounding once AGR reconstructs (the library computes the rule in another
order). The default step must differ from it exactly where ``docs/reproducing.rst`` says it departs.

The model is a tiny CIFAR-shaped network (two convolutions with BatchNorm, a linear layer, 10
classes), 8 images of 3x32x32 per batch, with saturated rows (pixels at 0 and 1, as natural images
have) so that the authors' PGD iterates do leave [0, 1].
"""

from __future__ import annotations

import pytest
import torch
from _authors_reference import PGD as AuthorsPGD
from _authors_reference import Authors, StepRecord
from torch import nn

from agr_optim import AGROptimizer
from agr_optim.recipes import PGD, StepOutput, avmixup_step, awp_step, mart_step, pgd_at_step, trades_step

METHODS = ["at", "trades", "mart", "awp", "avmixup"]
STEPS = {"at": pgd_at_step, "trades": trades_step, "mart": mart_step, "awp": awp_step, "avmixup": avmixup_step}
DTYPES = [torch.float32, torch.float64]
AWP_GAMMA = 0.01  # their --gamma
CLIP = 0.1  # their --clip_norm
MIX_SEED = 21


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread (two spinning OpenMP threads on a busy machine made each op ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),  # a bias before BatchNorm has a zero gradient
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    return net.to(dtype).train()


def batches(count: int, dtype: torch.dtype, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.rand(size, 3, 32, 32, generator=g, dtype=dtype)
        x[:, :, :6] = (x[:, :, :6] > 0.5).to(dtype)  # saturated rows: 0 and 1
        out.append((x, torch.randint(0, 10, (size,), generator=g)))
    return out


def attack_seed(i: int) -> int:
    return 100 + i  # the global stream the random starts are drawn from, before step i on both sides


def run_recipe(method: str, dtype: torch.dtype, arm: str, count: int, start_step: int = 0, **kwargs):
    """``count`` steps of the recipe; ``arm``: "plain" (torch SGD) or "agr" (AGROptimizer)."""
    model = tiny_net(dtype)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = sgd if arm == "plain" else AGROptimizer(sgd, clip_norm=CLIP, start_step=start_step)
    mix = torch.Generator().manual_seed(MIX_SEED)
    extra = {"awp": {"gamma": AWP_GAMMA}, "avmixup": {"generator": mix}}.get(method, {})
    outs, stats = [], []
    for i, (x, y) in enumerate(batches(count, dtype)):
        torch.manual_seed(attack_seed(i))
        outs.append(STEPS[method](model, opt, x, y, **extra, **kwargs))
        stats.append(getattr(opt, "last_stats", None))
    return model, sgd, outs, stats


def run_reference(method: str, dtype: torch.dtype, arm: str, count: int, start_step: int = 0):
    model = tiny_net(dtype)
    mix = torch.Generator().manual_seed(MIX_SEED)
    authors = Authors(
        model, method, agr=arm == "agr", agr_start_step=start_step, gamma=AWP_GAMMA, clip_norm=CLIP,
        mix_draw=lambda shape: torch.rand(shape, generator=mix, dtype=dtype),
    )
    records: list[StepRecord] = []
    for i, (x, y) in enumerate(batches(count, dtype)):
        torch.manual_seed(attack_seed(i))
        records.append(authors.step(x, y))
    return model, authors.optim, records


def assert_same_state(model, sgd, ref_model, ref_sgd, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Parameters, buffers (BatchNorm's running statistics and counts) and momentum buffers."""
    ours, theirs = model.state_dict(), ref_model.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters(), strict=True)):
        torch.testing.assert_close(
            sgd.state[p]["momentum_buffer"], ref_sgd.state[q]["momentum_buffer"], rtol=rtol, atol=atol,
            msg=lambda m, i=i: f"momentum of parameter {i}: {m}",
        )


def assert_same_outputs(out: StepOutput, rec: StepRecord) -> None:
    assert torch.equal(out.x_adv, rec.imgs_adv)
    assert torch.equal(out.loss, rec.loss_train_adv)
    assert out.clean_loss is not None and torch.equal(out.clean_loss, rec.loss_train_clean)
    assert out.logits_adv is not None and torch.equal(out.logits_adv, rec.output_adv)


# ---------------------------------------------------------------------- their PGD
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_authors_is_their_attack_bit_for_bit(dtype, random_start):
    model, ((x, y),) = tiny_net(dtype), batches(1, dtype)
    torch.manual_seed(5)
    theirs = AuthorsPGD(random_start=random_start)(model, x, y)
    model.train()  # their attack leaves the model in eval mode
    torch.manual_seed(5)
    ours = PGD(authors=True, random_start="uniform" if random_start else "none")(model, x, y)
    assert torch.equal(ours, theirs)
    assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0


class _InputRange(nn.Module):
    """Records the range of every input the wrapped model sees."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append((float(x.detach().min()), float(x.detach().max())))
        return self.net(x)


def test_pgd_authors_iterates_leave_the_data_range_and_the_default_ones_do_not():
    """The departure itself: their model is attacked at points outside [0, 1]; the returned
    points differ from the default PGD's on some elements."""
    ((x, y),) = batches(1, torch.float64)
    results = {}
    for authors in (True, False):
        model = _InputRange(tiny_net(torch.float64))
        torch.manual_seed(5)
        results[authors] = PGD(authors=authors)(model, x, y)
        lows, highs = zip(*model.seen, strict=True)
        left = min(lows) < 0.0 or max(highs) > 1.0
        assert left == authors
    differ = results[True] != results[False]
    assert 0 < int(differ.sum()) < differ.numel()


# ---------------------------------------------------------------------- the step, AGR off
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_plain_arm_equals_the_authors_bit_for_bit(method, dtype):
    """Three steps with torch SGD (momentum, weight decay): their arm without AGR."""
    model, sgd, outs, _ = run_recipe(method, dtype, "plain", 3, authors=True)
    ref_model, ref_sgd, records = run_reference(method, dtype, "plain", 3)
    assert_same_state(model, sgd, ref_model, ref_sgd)
    for out, rec in zip(outs, records, strict=True):
        assert_same_outputs(out, rec)


# ---------------------------------------------------------------------- the AGR arm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_agr_arm_warm_start_bit_for_bit_then_agr_within_rounding(method, dtype):
    """Their AGR arm: two warm-start steps (both gradients taken, the adversarial one applied,
    the statistics logged) equal bit for bit; then two AGR steps within rounding of the dtype."""
    model, sgd, outs, stats = run_recipe(method, dtype, "agr", 2, start_step=2, authors=True)
    ref_model, ref_sgd, records = run_reference(method, dtype, "agr", 2, start_step=2)
    assert_same_state(model, sgd, ref_model, ref_sgd)
    for out, rec, st in zip(outs, records, stats, strict=True):
        assert_same_outputs(out, rec)
        assert_same_statistics(st, rec, dtype)

    model, sgd, outs, stats = run_recipe(method, dtype, "agr", 4, start_step=2, authors=True)
    ref_model, ref_sgd, records = run_reference(method, dtype, "agr", 4, start_step=2)
    # Measured: at most 6e-6 (float32) and 2e-15 (float64) relative, elementwise, after the two AGR steps.
    rtol = 5e-5 if dtype == torch.float32 else 1e-12
    assert_same_state(model, sgd, ref_model, ref_sgd, rtol=rtol, atol=rtol * 1e-2)
    assert [bool(s.clip_scale.lt(1).any()) for s in stats[2:]] == [True, True]  # the clip path is exercised
    for st, rec in zip(stats, records, strict=True):
        assert_same_statistics(st, rec, dtype)


def assert_same_statistics(stats, rec: StepRecord, dtype: torch.dtype) -> None:
    """Their per-tensor ``cs`` and projection branch against ``last_stats``."""
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(stats.cosine.double(), torch.tensor(rec.cosines, dtype=torch.float64), rtol=0, atol=tol)
    assert stats.projected.tolist() == rec.projected


# ---------------------------------------------------------------------- the default departs
def _departures(method: str, arm: str):
    """The default step (with their attack and clean pass, so only the step's own departures
    remain) and the reference, two steps in float64."""
    model, sgd, outs, _ = run_recipe(
        method, torch.float64, arm, 2, attack=PGD(authors=True), clean_pass="gradient"
    )
    ref_model, ref_sgd, records = run_reference(method, torch.float64, arm, 2)
    return model, sgd, outs, ref_model, ref_sgd, records


@pytest.mark.parametrize("method", ["at", "trades"])
def test_default_step_departs_by_its_pgd_only(method):
    """PGD-AT and TRADES: with their PGD the default step is theirs bit for bit; with the
    default PGD (iterates clamped) the adversarial inputs, hence the weights, differ."""
    model, sgd, outs, ref_model, ref_sgd, records = _departures(method, "plain")
    assert_same_state(model, sgd, ref_model, ref_sgd)
    default_model, _, default_outs, _ = run_recipe(
        method, torch.float64, "plain", 2, attack=PGD(), clean_pass="gradient"
    )
    assert not torch.equal(default_outs[0].x_adv, records[0].imgs_adv)
    assert not torch.equal(default_model[0].weight, ref_model[0].weight)


@pytest.mark.parametrize("method", ["mart", "avmixup"])
def test_default_step_departs_in_batch_norm_statistics(method):
    """MART and AVmixup: the extra train-mode forward passes move BatchNorm's running statistics
    (their counts: 4 and 3 forward passes per step, the default's 2); the first step's gradients
    are the same, so after one step the parameters agree to rounding."""
    model, sgd, outs, ref_model, ref_sgd, records = _departures(method, "plain")
    per_step = {"mart": 4, "avmixup": 3}[method]
    assert int(ref_model[1].num_batches_tracked) == 2 * per_step
    assert int(model[1].num_batches_tracked) == 2 * 2
    assert not torch.allclose(model[1].running_mean, ref_model[1].running_mean, rtol=1e-3)
    one, _, _, _ = run_recipe(method, torch.float64, "plain", 1, attack=PGD(authors=True), clean_pass="gradient")
    ref_one, _, _ = run_reference(method, torch.float64, "plain", 1)
    for p, q in zip(one.parameters(), ref_one.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert outs[0].logits_adv is (None if method == "avmixup" else outs[0].logits)


@pytest.mark.parametrize("arm", ["plain", "agr"])
def test_default_awp_departs_in_its_order(arm):
    """AWP: without AGR the default steps at w (weight decay on w) and restores w exactly; with
    AGR it also takes the clean gradient at w. Both differ from theirs beyond rounding."""
    model, sgd, _, ref_model, ref_sgd, records = _departures("awp", arm)
    pairs = zip(model.parameters(), ref_model.parameters(), strict=True)
    diff = max(float((p - q).detach().abs().max()) for p, q in pairs)
    assert diff > 1e-9  # float64 rounding of two steps is ~1e-16


def test_default_awp_clean_gradient_is_at_the_unperturbed_weights():
    """The AGR arm's clean gradient: theirs is a mix of w and w + v; the default's is the
    gradient at w (both seen through the AGR statistics of one step, same everything else)."""
    _, _, _, stats_default = run_recipe(
        "awp", torch.float64, "agr", 1, attack=PGD(authors=True), clean_pass="gradient"
    )
    _, _, _, stats_authors = run_recipe("awp", torch.float64, "agr", 1, authors=True)
    model, ((x, y),) = tiny_net(torch.float64), batches(1, torch.float64)
    clean = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    norms = torch.stack([g.norm() for g in clean])
    torch.testing.assert_close(stats_default[0].norm_clean, norms, rtol=1e-12, atol=0)
    weights = [i for i, (n, p) in enumerate(model.named_parameters()) if p.dim() > 1]
    moved = (stats_authors[0].norm_clean - norms).abs() / norms
    assert float(moved[weights[:-1]].min()) > 1e-6  # the layers the clean backward passes through w + v


@pytest.mark.parametrize("method", METHODS)
def test_authors_step_under_a_grad_scaler_equals_the_unscaled_one(method):
    """Both losses scaled (AGR arm, float32): AGROptimizer unscales both, the step is the same."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model, _, outs, _ = run_recipe(method, torch.float32, "agr", 1, authors=True, scaler=scaler)
        results.append(model.state_dict())
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method", METHODS)
def test_authors_refusals_change_nothing(method):
    model, ((x, y),) = tiny_net(torch.float64), batches(1, torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="clean_pass='needed'.*authors=True"):
        STEPS[method](model, opt, x, y, authors=True, clean_pass="needed")
    with pytest.raises(TypeError, match="authors must be True or False"):
        STEPS[method](model, opt, x, y, authors="yes")
    if method == "avmixup":
        with pytest.raises(ValueError, match="label_smoothing.*authors=True"):
            avmixup_step(model, opt, x, y, authors=True, label_smoothing=(0.5, 0.7))
    if method == "awp":
        with pytest.raises(ValueError, match="gamma"):
            awp_step(model, opt, x, y, authors=True, gamma=-1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kwargs", [{"loss": "kl"}, {"random_start": "normal"}])
def test_pgd_authors_refuses_what_their_attack_does_not_have(kwargs):
    with pytest.raises(ValueError, match="authors=True"):
        PGD(authors=True, **kwargs)
    with pytest.raises(TypeError, match="authors"):
        PGD(authors=1)
