"""bf16/fp16 gradients: sums in float32, results within one rounding of a float64 computation;
float64 stays float64 (and is not reduced in float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _asserts import reference_agr
from torch import nn

from agr_optim import AGROptimizer
from agr_optim.functional import reconstruct, reconstruct_

LOW = [torch.bfloat16, torch.float16]


def pair(dtype, n=1000, correlation=0.3):
    a = torch.randn(n, dtype=torch.float64)
    c = correlation * a + torch.randn(n, dtype=torch.float64)
    return a.to(dtype), c.to(dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("correlation", [0.5, -0.5])  # interpolation and projection
def test_low_precision_within_one_rounding_of_float64(dtype, fused, correlation):
    a, c = pair(dtype, correlation=correlation)
    (r,) = reconstruct([a], [c], clip_norm=5.0, fused=fused)
    assert r.dtype == dtype
    # The reference takes the same (already rounded) inputs, exactly, in float64.
    (expected,), _ = reference_agr([a], [c], clip_norm=5.0, segments=[0])
    expected = torch.from_numpy(expected)
    # One rounding to the output dtype, plus the float32 sums' error (n u_32), both tiny next
    # to a bf16 sum's (a bf16 accumulator has 8 bits: n = 1000 terms lose everything).
    u = torch.finfo(dtype).eps / 2
    bound = u * expected.abs() + 64 * a.numel() * 2.0**-24 * (a.double().abs() + c.double().abs())
    assert ((r.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", LOW)
def test_sums_are_taken_in_float32(dtype):
    """|ones(4096)|^2 is 4096; summed in bf16 it would stop at 256 (256 + 1 rounds to 256)."""
    a = torch.ones(4096, dtype=dtype)
    stats = reconstruct_([a.clone()], [a.clone()])
    assert stats.norm_adversarial.item() == 64.0 and stats.cosine.item() == 1.0


def test_float64_stays_float64():
    """A cosine that float32 sums cannot resolve: 1 - cos = 1e-12."""
    a = torch.zeros(2, dtype=torch.float64)
    a[0] = 1.0
    c = a.clone()
    c[1] = 2e-6  # 1 - cos = 2e-12, below float32's resolution of the cosine
    (r,), stats = reconstruct([a], [c]), reconstruct_([a.clone()], [c])
    assert r.dtype == torch.float64 and stats.norm_adversarial.dtype == torch.float64
    (expected,), refs = reference_agr([a], [c], clip_norm=None, segments=[0])
    assert abs(stats.cosine.item() - refs[0].cosine) < 1e-15
    torch.testing.assert_close(r, torch.from_numpy(expected), rtol=1e-14, atol=1e-20)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_model_trains(dtype):
    """A bf16/fp16 model under the wrapper: grads and params keep their dtype; the update is AGR of
    the bf16 gradients, computed in float64, rounded once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=1.0), clip_norm=0.5)
    x, x_adv, y = torch.randn(8, 16, dtype=dtype), torch.randn(8, 16, dtype=dtype), torch.randn(8, 4, dtype=dtype)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    clean = [p.grad.clone() for p in params]
    opt.stash_clean()
    F.mse_loss(model(x_adv), y).backward()
    adversarial = [p.grad.clone() for p in params]
    opt.step()
    expected, _ = reference_agr(adversarial, clean, clip_norm=0.5, segments=list(range(len(params))))
    u = torch.finfo(dtype).eps / 2
    for p, b, g, e, a, c in zip(params, before, [p.grad for p in params], expected, adversarial, clean, strict=True):
        assert p.dtype == g.dtype == dtype
        e = torch.from_numpy(e)
        bound = u * e.abs() + 64 * a.numel() * 2.0**-24 * (a.double().abs() + c.double().abs()).max()
        assert ((g.double() - e).abs() <= bound).all()
        torch.testing.assert_close(p, (b - g), rtol=0, atol=0)  # lr = 1: p - r, in the dtype


def _antiparallel(n: int, cos: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, dtype=torch.float64, generator=g)
    e = torch.randn(n, dtype=torch.float64, generator=g)
    e = e - (e @ a) / (a @ a) * a
    e = e / e.norm() * a.norm()
    return a.to(dtype), (cos * a + (1 - cos * cos) ** 0.5 * e).to(dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("cos", [-0.9, -0.97, -0.99, -0.999])
def test_low_precision_clip_is_not_overstated(dtype, cos):
    """bf16/fp16 are combined in float32 and rounded once: the clip's noise floor must be
    float32's, not the bf16 epsilon (which clipped 18 % too much at cos = -0.999)."""
    a, c = _antiparallel(1000, cos, dtype)
    (expected,), _ = reference_agr([a], [c], clip_norm=0.1, segments=[0])
    for fused in (True, False):
        (r,) = reconstruct([a], [c], clip_norm=0.1, fused=fused)
        norm = r.double().norm().item()
        assert norm == pytest.approx(float(torch.from_numpy(expected).norm()), rel=2 * torch.finfo(dtype).eps)


def test_one_low_precision_tensor_leaves_float32_clipping_exact():
    """The noise floor is per dtype class: a bf16 tensor elsewhere in the model must not change
    how a float32 tensor is clipped (it moved it by 2e-3 relative)."""
    a32, c32 = _antiparallel(1000, -0.9, torch.float32)
    a16, c16 = _antiparallel(10, 0.5, torch.bfloat16)
    (alone,) = reconstruct([a32], [c32], clip_norm=0.1)
    mixed, _ = reconstruct([a32, a16], [c32, c16], clip_norm=0.1)
    torch.testing.assert_close(mixed, alone, rtol=2e-7, atol=0)


def test_mixed_float32_and_float64_segment_keeps_float64_exact():
    """One "global" segment of a float32 and a float64 tensor: the float64 tensor's result is
    not rounded through float32 (fused and loop), and tiny float32 gradients behind a float64
    one are still rescued from float32 underflow."""
    g = torch.Generator().manual_seed(4)
    # The float32 member is small, so the float32 rounding of its sums (fused path) reaches
    # the shared coefficients only at ~1e-15: a float64 result off by ~eps_32 |r| (5e-9 here)
    # can then only come from rounding the float64 member through float32.
    a = [torch.randn(50, generator=g) * 1e-4, torch.randn(50, dtype=torch.float64, generator=g)]
    c = [torch.randn(50, generator=g) * 1e-4, torch.randn(50, dtype=torch.float64, generator=g)]
    (_, expected), _ = reference_agr(a, c, clip_norm=None, segments=[0, 0])
    for fused, tol in ((False, 1e-12), (True, 1e-12)):
        result = reconstruct(a, c, clip_norm=None, granularity="global", fused=fused)
        assert result[1].dtype == torch.float64
        assert (result[1] - torch.from_numpy(expected)).abs().max().item() <= tol
    # Clipped, the segment's clip allows for its float32 member's combine rounding (to first
    # order, docs/algorithm.rst): the float64 result may be clipped by that much more, no more.
    (_, expected), _ = reference_agr(a, c, clip_norm=0.5, segments=[0, 0])
    eps32 = torch.finfo(torch.float32).eps
    for fused in (False, True):
        result = reconstruct(a, c, clip_norm=0.5, granularity="global", fused=fused)
        want = torch.from_numpy(expected)
        assert (result[1] - want).norm().item() <= 8 * eps32 * want.norm().item()
        assert result[1].norm().item() <= want.norm().item() * (1 + 1e-12)
    tiny = [torch.randn(50, dtype=torch.float64, generator=g) * 1e-23, torch.randn(50, generator=g) * 1e-23]
    tiny_c = [torch.randn(50, dtype=torch.float64, generator=g) * 1e-23, torch.randn(50, generator=g) * 1e-23]
    expected, _ = reference_agr(tiny, tiny_c, clip_norm=None, segments=[0, 1])
    for fused in (True, False):
        result = reconstruct(tiny, tiny_c, fused=fused)
        err = (result[1].double() - torch.from_numpy(expected[1])).norm() / torch.from_numpy(expected[1]).norm()
        assert err.item() <= 1e-6
