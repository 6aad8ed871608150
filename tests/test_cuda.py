"""On a CUDA device: every implementation against float64, no host synchronisation, low precision, GradScaler.

Skipped without CUDA. ``python -m benchmarks.gpu_check`` runs ``pytest -m cuda`` on a lent GPU:
mark every test that needs CUDA ``@pytest.mark.cuda`` (with a ``skipif`` without one). On a GPU
``fused=True`` is the accelerator schedule (the same as ``fused="device"``), ``False`` the loop,
``"compile"`` the compiled schedule. The references are numpy float64, written here.
"""

from __future__ import annotations

import contextlib
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
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def _on_device(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(DEVICE, dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _pairs(dtype: torch.dtype, shapes=SHAPES, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    adversarial, clean = [], []
    for i, shape in enumerate(shapes):
        a = torch.randn(shape, generator=gen, dtype=torch.float64)
        # Alternating signs: both branches of the rule (projection and interpolation) run.
        c = (0.5 if i % 2 else -0.5) * a + torch.randn(shape, generator=gen, dtype=torch.float64)
        adversarial.append(_on_device(a, dtype))
        clean.append(_on_device(c, dtype))
    return adversarial, clean


def segments_of(granularity: str, n: int) -> list[list[int]]:
    return [[i] for i in range(n)] if granularity == "tensor" else [list(range(n))]


def reference(adversarial, clean, clip_norm, segments) -> list[np.ndarray]:
    """The AGR rule in float64: per segment, project out the clean direction when the cosine is
    <= 0, else interpolate cos * c + (1 - cos) * a; then clip the norm to ``clip_norm``."""
    a = [x.detach().double().cpu().numpy().reshape(-1) for x in adversarial]
    c = [x.detach().double().cpu().numpy().reshape(-1) for x in clean]
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


def sum_tolerance(numels: list[int]) -> float:
    """Relative error of float32 sums over the largest segment: ``eps * sqrt(n)`` for a sum in
    any order with independent roundings (tree reductions on the GPU do better), doubled."""
    return max(1e-5, 2 * torch.finfo(torch.float32).eps * math.sqrt(max(numels)))


def _tolerance(adversarial: list[torch.Tensor], granularity: str) -> float:
    numels = [a.numel() for a in adversarial]
    return sum_tolerance(numels if granularity == "tensor" else [sum(numels)])


def assert_normwise_close(got: torch.Tensor, want: np.ndarray, tol: float) -> None:
    error = np.linalg.norm(got.detach().double().cpu().numpy() - want)
    assert error <= tol * np.linalg.norm(want), (error, np.linalg.norm(want))


# ----------------------------------------------------------------------- every implementation
@pytest.mark.parametrize("fused", [True, False], ids=["accelerator", "loop"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("clip_norm", [None, 0.1])
def test_every_implementation_matches_float64(fused, granularity, clip_norm):
    adversarial, clean = _pairs(torch.float32)
    want = reference(adversarial, clean, clip_norm, segments_of(granularity, len(SHAPES)))
    got = reconstruct(adversarial, clean, clip_norm=clip_norm, granularity=granularity, fused=fused)
    inplace = [a.clone(memory_format=torch.preserve_format) for a in adversarial]
    reconstruct_(inplace, clean, clip_norm=clip_norm, granularity=granularity, fused=fused)
    tol = _tolerance(adversarial, granularity)
    for g, i, w, a in zip(got, inplace, want, adversarial, strict=True):
        assert_normwise_close(g, w, tol)
        assert_normwise_close(i, w, tol)
        assert g.device == a.device and g.dtype == torch.float32 and g.stride() == a.stride()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="torch.compile on CUDA needs triton")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_matches_float64():
    torch._dynamo.reset()
    try:
        adversarial, clean = _pairs(torch.float32)
        want = reference(adversarial, clean, 0.1, segments_of("tensor", len(SHAPES)))
        reconstruct_(adversarial, clean, clip_norm=0.1, fused="compile")
        for g, w in zip(adversarial, want, strict=True):
            assert_normwise_close(g, w, _tolerance(adversarial, "tensor"))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("fused", [True, False], ids=["accelerator", "loop"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_and_matches_float64(fused, dtype):
    adversarial, clean = _pairs(dtype)
    # The reference takes the same (rounded) low-precision inputs, exactly converted.
    want = reference(adversarial, clean, 0.1, segments_of("tensor", len(SHAPES)))
    got = reconstruct(adversarial, clean, clip_norm=0.1, fused=fused)
    # Sums in float32 or wider; the result rounded once to the dtype (eps/2 per element): a
    # few eps normwise.
    tol = 4 * torch.finfo(dtype).eps + _tolerance(adversarial, "tensor")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and bool(torch.isfinite(g).all())
        assert_normwise_close(g, w, tol)


# ------------------------------------------------------------------------ the optimizer
OPTIMIZER_SHAPES = [(64, 32, 3, 3), (64,), (10, 4096), (10,)]
GROUPS = [[0, 1], [2, 3]]  # the two param groups: the segments at granularity "group"


@pytest.mark.parametrize("fused", [True, False], ids=["accelerator", "loop"])
def test_optimizer_steps_match_float64(fused):
    """Two ``stash_clean()`` + ``step()`` iterations of AGR(SGD) with momentum and weight decay,
    two param groups at ``granularity="group"``, against the rule and torch's SGD update
    (``b = m b + g + wd p``, the first ``b = g + wd p``; ``p -= lr b``) in float64."""
    gen = torch.Generator().manual_seed(1)
    params = [_on_device(0.1 * torch.randn(s, generator=gen, dtype=torch.float64), torch.float32).requires_grad_()
              for s in OPTIMIZER_SHAPES]
    sgd = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    opt = AGROptimizer(sgd, clip_norm=0.1, granularity="group", fused=fused)
    want = [p.detach().double().cpu().numpy() for p in params]
    buffers: list[np.ndarray] | None = None
    for step in range(2):
        before = [p.detach().double().cpu().numpy() for p in params]
        adversarial, clean = _pairs(torch.float32, OPTIMIZER_SHAPES, seed=10 + step)
        opt.zero_grad()
        for p, g in zip(params, clean, strict=True):
            p.grad = g.clone(memory_format=torch.preserve_format)
        opt.stash_clean()
        for p, g in zip(params, adversarial, strict=True):
            p.grad = g.clone(memory_format=torch.preserve_format)
        opt.step()
        r = reference(adversarial, clean, 0.1, GROUPS)
        d = [ri + WEIGHT_DECAY * w for ri, w in zip(r, want, strict=True)]
        buffers = d if buffers is None else [MOMENTUM * b + di for b, di in zip(buffers, d, strict=True)]
        want = [w - LR * b for w, b in zip(want, buffers, strict=True)]
        for group in GROUPS:  # the rule's error is bounded per segment, normwise
            p0 = np.concatenate([before[i].reshape(-1) for i in group])
            update = np.concatenate([params[i].detach().double().cpu().numpy().reshape(-1) for i in group]) - p0
            expected = np.concatenate([want[i].reshape(-1) for i in group]) - p0
            # float32 parameters are rounded to eps/2 of their size at each of the two steps.
            rounding = 2 * torch.finfo(torch.float32).eps * np.linalg.norm(p0) / np.linalg.norm(expected)
            tol = sum_tolerance([p0.size]) + rounding
            assert np.linalg.norm(update - expected) <= tol * np.linalg.norm(expected), (step, group)
    assert opt.step_count == 2


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("granularity", ["tensor", "group", "global"])
@pytest.mark.parametrize("fused", [True, "device"])
def test_the_accelerator_schedule_never_synchronises(fused, granularity):
    """``zero_grad()``, ``stash_clean()`` and ``step()`` make no host synchronisation at any
    granularity (sync debug mode raises on one): the segment index is built once per layout (the
    old schedule copied it from a Python list at every "group" and "global" step). The first
    iteration is not checked: it builds the rows' layout, a one-off host-to-device copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).to(DEVICE, memory_format=torch.channels_last)
    sgd = torch.optim.SGD([{"params": model[:2].parameters()}, {"params": model[4].parameters()}], lr=0.1,
                          momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
    opt = AGROptimizer(sgd, clip_norm=0.1, granularity=granularity, fused=fused)
    x = torch.rand(8, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=DEVICE)
    for step in range(3):
        checked = _sync_is_an_error if step else contextlib.nullcontext
        with checked():
            opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with checked():
            opt.stash_clean()
        nn.functional.cross_entropy(model(x + 0.03), y).backward()
        with checked():
            opt.step()
    assert opt.step_count == 3


def test_stats_stay_on_the_device():
    adversarial, clean = _pairs(torch.float32)
    stats = reconstruct_(adversarial, clean, clip_norm=0.1)
    for name in ("cosine", "projected", "norm_adversarial", "norm_clean", "norm_reconstructed", "clip_scale"):
        value = getattr(stats, name)
        assert value.device.type == "cuda" and value.shape == (len(SHAPES),), name


# ------------------------------------------------------------------------------- GradScaler
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
