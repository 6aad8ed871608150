"""The fused path's fast-path machinery: cache-sized chunks, layouts, the compiled path, no host sync.

The maths (fused equals loop on random cases, invariants, bad input) is in test_functional.py;
here are the cases that only the implementation makes special: tensors cut into several chunks,
channels-last and mixed layouts, new versus in-place outputs, ``fused="compile"``, and CUDA
without host synchronisation.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from agr_optim import AGROptimizer
from agr_optim._fused import _CHUNK
from agr_optim.functional import reconstruct, reconstruct_


def _pairs(shapes, dtype, layouts):
    a, c = [], []
    for i, (shape, layout) in enumerate(zip(shapes, layouts, strict=True)):
        x = torch.randn(shape, dtype=dtype)
        y = (0.5 if i % 2 else -0.5) * x + torch.randn(shape, dtype=dtype)
        if layout in ("cl", "cl_a"):
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "cl":
            y = y.contiguous(memory_format=torch.channels_last)
        a.append(x)
        c.append(y)
    return a, c


def assert_close_normwise(got, want):
    """|got - want| <= tol |want| for the whole tensor: the two paths sum in different orders
    (the loop sums a/s), so single elements of a nearly cancelled result may differ more."""
    tol = 1e-5 if want.dtype == torch.float32 else 1e-12
    assert got.dtype == want.dtype
    error = (got.double() - want.double()).norm()
    assert error <= tol * want.double().norm() + 1e-30, (error.item(), want.double().norm().item())


# Tensors larger than a chunk (cut into pieces), a tensor exactly one chunk, channels-last
# pairs, a channels-last gradient with a contiguous clean partner, tiny tensors in between.
SHAPES = [(_CHUNK + 123,), (7,), (96, 64, 11, 11), (_CHUNK,), (40, 64, 16, 16), (3,), (2, 5)]
LAYOUTS = ["contiguous", "contiguous", "cl", "contiguous", "cl_a", "contiguous", "contiguous"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_chunked_combine_equals_loop(dtype, granularity, clip_norm):
    a, c = _pairs(SHAPES, dtype, LAYOUTS)
    c[1] = None  # a missing clean gradient inside a chunk
    before = [t.clone() for t in a]
    want = reconstruct(a, c, clip_norm=clip_norm, granularity=granularity, fused=False)
    got = reconstruct(a, c, clip_norm=clip_norm, granularity=granularity, fused=True)
    for g, w, x, x0 in zip(got, want, a, before, strict=True):
        assert torch.equal(x, x0), "reconstruct changed its input"
        assert g.dtype == x.dtype and g.shape == x.shape and g.stride() == x.stride()
        assert_close_normwise(g, w)
    stats = reconstruct_(a, c, clip_norm=clip_norm, granularity=granularity, fused=True)
    assert stats.num_segments == (len(a) if granularity == "tensor" else 1)
    for x, w in zip(a, want, strict=True):
        assert_close_normwise(x, w)


def _train_small_channels_last(fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 2))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    model(x)
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_norm=0.5, fused=fused)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.stash_clean()
        model(x + 0.3).abs().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_optimizer_step_with_channels_last_model_equals_loop():
    for got, want in zip(_train_small_channels_last(True), _train_small_channels_last(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_compiled_path_equals_loop(granularity):
    torch._dynamo.reset()
    a = [torch.randn(16, 8, 3, 3), torch.randn(8), torch.randn(10, 8), torch.zeros(3)]
    c = [torch.randn(16, 8, 3, 3), -a[1], None, torch.randn(3)]
    want = reconstruct(a, c, clip_norm=0.5, granularity=granularity, fused=False)
    got = reconstruct(a, c, clip_norm=0.5, granularity=granularity, fused="compile")
    inplace = [t.clone() for t in a]
    reconstruct_(inplace, c, clip_norm=0.5, granularity=granularity, fused="compile")
    for g, i, w in zip(got, inplace, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(i, w, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_optimizer_compiled_path_equals_loop():
    torch._dynamo.reset()
    for got, want in zip(_train_small_channels_last("compile"), _train_small_channels_last(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_fused_flag_is_validated():
    with pytest.raises(ValueError, match="fused"):
        reconstruct([torch.ones(2)], [torch.ones(2)], fused="yes")
    with pytest.raises(ValueError, match="fused"):
        AGROptimizer(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1), fused="yes")


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("granularity", ["tensor", "group", "global"])
def test_cuda_step_never_synchronises(granularity):
    """stash_clean() and step() make no host synchronisation (sync debug mode raises on one)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).cuda()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True), clip_norm=0.1,
                       granularity=granularity)
    x = torch.randn(16, 32, device="cuda")
    for _ in range(3):  # the first step allocates the momentum buffers
        opt.zero_grad()
        model(x).square().mean().backward()
        with _sync_is_an_error():
            opt.stash_clean()
        model(x + 0.5).abs().mean().backward()
        with _sync_is_an_error():
            opt.step()
    assert opt.step_count == 3
