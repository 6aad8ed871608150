"""On a CUDA device: the fused path against float64, low precision, GradScaler("cuda"), the compiled path.

Skipped without CUDA. ``python -m benchmarks.gpu_check`` runs these, with every other test marked
``@pytest.mark.cuda`` (or skipped by a ``skipif`` that names CUDA), on a lent GPU; the no-host-sync
test is in test_fused.py. The references are numpy float64, written here.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

from agr_optim import AGROptimizer
from agr_optim.functional import reconstruct, reconstruct_

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
# A tensor of 3M elements (several of any chunk or block), channels-last convolutions, odd sizes.
SHAPES = [(3_000_000,), (64, 32, 3, 3), (7,), (128, 256), (3,), (32, 16, 5, 5)]


def _pairs(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    adversarial, clean = [], []
    for i, shape in enumerate(SHAPES):
        a = torch.randn(shape, generator=gen, dtype=torch.float64)
        # Alternating signs: both branches of the rule (projection and interpolation) run.
        c = (0.5 if i % 2 else -0.5) * a + torch.randn(shape, generator=gen, dtype=torch.float64)
        a, c = a.to(DEVICE, dtype), c.to(DEVICE, dtype)
        if len(shape) == 4:
            a, c = a.contiguous(memory_format=torch.channels_last), c.contiguous(memory_format=torch.channels_last)
        adversarial.append(a)
        clean.append(c)
    return adversarial, clean


def reference(adversarial, clean, clip_norm, granularity) -> list[np.ndarray]:
    """The AGR rule in float64: per segment, project out the clean direction when the cosine is
    <= 0, else interpolate cos * c + (1 - cos) * a; then clip the norm to ``clip_norm``."""
    a = [x.detach().double().cpu().numpy().reshape(-1) for x in adversarial]
    c = [x.detach().double().cpu().numpy().reshape(-1) for x in clean]
    segments = [[i] for i in range(len(a))] if granularity == "tensor" else [list(range(len(a)))]
    out: list[np.ndarray] = [np.empty(0)] * len(a)
    for segment in segments:
        sa, sc = np.concatenate([a[i] for i in segment]), np.concatenate([c[i] for i in segment])
        dot, na, nc = sa @ sc, np.linalg.norm(sa), np.linalg.norm(sc)
        cos = dot / (na * nc)
        r = sa - dot / nc**2 * sc if cos <= 0 else cos * sc + (1 - cos) * sa
        if clip_norm is not None:
            r = r * min(1.0, clip_norm / np.linalg.norm(r))
        start = 0
        for i in segment:
            out[i] = r[start : start + a[i].size].reshape(adversarial[i].shape)
            start += a[i].size
    return out


def sum_tolerance(adversarial: list[torch.Tensor], granularity: str) -> float:
    """Relative error of float32 sums over the largest segment: ``eps * sqrt(n)`` for a sum in
    any order with independent roundings (tree reductions on the GPU do better), doubled."""
    n = max(a.numel() for a in adversarial) if granularity == "tensor" else sum(a.numel() for a in adversarial)
    return max(1e-5, 2 * torch.finfo(torch.float32).eps * math.sqrt(n))


def assert_normwise_close(got: torch.Tensor, want: np.ndarray, tol: float) -> None:
    error = np.linalg.norm(got.detach().double().cpu().numpy() - want)
    assert error <= tol * np.linalg.norm(want), (error, np.linalg.norm(want))


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("clip_norm", [None, 0.1])
def test_fused_on_cuda_matches_float64(granularity, clip_norm):
    adversarial, clean = _pairs(torch.float32)
    want = reference(adversarial, clean, clip_norm, granularity)
    got = reconstruct(adversarial, clean, clip_norm=clip_norm, granularity=granularity)
    inplace = [a.clone(memory_format=torch.preserve_format) for a in adversarial]
    reconstruct_(inplace, clean, clip_norm=clip_norm, granularity=granularity)
    tol = sum_tolerance(adversarial, granularity)
    for g, i, w, a in zip(got, inplace, want, adversarial, strict=True):
        assert_normwise_close(g, w, tol)
        assert_normwise_close(i, w, tol)
        assert g.device == a.device and g.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_cuda_keeps_dtype_and_matches_float64(dtype):
    adversarial, clean = _pairs(dtype)
    # The reference takes the same (rounded) low-precision inputs, exactly converted.
    want = reference(adversarial, clean, 0.1, "tensor")
    got = reconstruct(adversarial, clean, clip_norm=0.1)
    # The sums are taken in float32; then the combine in the dtype's arithmetic and the rounding
    # of the result to the dtype (eps/2 per element and operation): a few eps normwise.
    tol = 4 * torch.finfo(dtype).eps + sum_tolerance(adversarial, "tensor")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and bool(torch.isfinite(g).all())
        assert_normwise_close(g, w, tol)


def _train(scaler: torch.amp.GradScaler | None, inf_at: int | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(DEVICE)
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_norm=0.3)
    gen = torch.Generator().manual_seed(1)
    snapshots = []
    for step in range(4):
        x, y = torch.randn(8, 16, generator=gen).to(DEVICE), torch.randn(8, 4, generator=gen).to(DEVICE)
        scale = scaler.scale if scaler is not None else (lambda loss: loss)
        opt.zero_grad()
        scale(nn.functional.mse_loss(model(x), y)).backward()
        opt.stash_clean()
        scale(nn.functional.mse_loss(model(x + 0.1), y)).backward()
        if step == inf_at:
            model[0].weight.grad[0, 0] = float("inf")
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots, opt, scaler


def test_gradscaler_cuda_run_equals_unscaled_run():
    """A power-of-two scale is exact: the scaled run (GradScaler("cuda"), both gradients
    unscaled inside step()) equals the run without a scaler."""
    want, _, _ = _train(None)
    got, opt, scaler = _train(torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=1000))
    for step_got, step_want in zip(got, want, strict=True):
        for g, w in zip(step_got, step_want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert opt.step_count == 4 and scaler.get_scale() == 2.0**12


def test_gradscaler_cuda_skips_a_step_with_an_inf():
    got, opt, scaler = _train(torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=1000), inf_at=2)
    assert opt.step_count == 3
    assert all(torch.equal(a, b) for a, b in zip(got[1], got[2], strict=True))  # step 2 moved nothing
    assert not all(torch.equal(a, b) for a, b in zip(got[2], got[3], strict=True))
    assert scaler.get_scale() == 2.0**11


def test_stats_stay_on_the_device():
    adversarial, clean = _pairs(torch.float32)
    stats = reconstruct_(adversarial, clean, clip_norm=0.1)
    for name in ("cosine", "projected", "norm_adversarial", "norm_clean", "norm_reconstructed", "clip_scale"):
        value = getattr(stats, name)
        assert value.device.type == "cuda" and value.shape == (len(SHAPES),), name


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="torch.compile on CUDA needs triton")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_on_cuda_matches_float64():
    torch._dynamo.reset()
    try:
        adversarial, clean = _pairs(torch.float32)
        want = reference(adversarial, clean, 0.1, "tensor")
        reconstruct_(adversarial, clean, clip_norm=0.1, fused="compile")
        for g, w in zip(adversarial, want, strict=True):
            assert_normwise_close(g, w, sum_tolerance(adversarial, "tensor"))
    finally:
        torch._dynamo.reset()
