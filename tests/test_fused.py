"""The fused path's fast-path machinery: cache-sized chunks, layouts, the compiled path, no host sync.

The maths (fused equals loop on random cases, invariants, bad input) is in test_functional.py;
here are the cases that only the implementation makes special: tensors cut into several chunks,
channels-last and mixed layouts, new versus in-place outputs, ``fused="compile"``, and CUDA
without host synchronisation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from agr_optim import AGROptimizer
from agr_optim._combine import _CHUNK
from agr_optim._fused import _BLOCK, blocks
from agr_optim._geometry import FloatOps, TensorOps, rule
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


def test_blocks_cover_whole_segments_in_order():
    sizes = [_BLOCK // 2, 10, _BLOCK, 3, 3, 2 * _BLOCK, 0, 5]
    tensors = [torch.empty(n) for n in sizes]
    per_tensor = blocks(tensors, list(range(len(sizes))), _BLOCK)
    assert per_tensor == [(0, 3), (3, 6), (6, 8)]  # cut once a block holds _BLOCK elements
    # "group": a segment's tensors stay together, even past _BLOCK.
    assert blocks(tensors, [0, 0, 0, 0, 1, 1, 2, 2], _BLOCK) == [(0, 4), (4, 6), (6, 8)]
    assert blocks(tensors, [0] * len(sizes), _BLOCK) == [(0, len(sizes))]
    # Segments whose tensors are not consecutive: one block (the two-pass order).
    assert blocks(tensors, [0, 1, 0, 1, 2, 2, 3, 3], _BLOCK) == [(0, len(sizes))]


def test_several_real_blocks_equal_loop():
    """Blocks at the real ``_BLOCK`` (a tensor bigger than a block alone, smaller ones grouped,
    tensors cut into several combine chunks), per tensor and as one segment, against the loop."""
    shapes = [(_BLOCK + 5,), (_BLOCK // 4,), (7,), (_BLOCK,), (64, 64, 3, 3)] * 2
    a, c = _pairs(shapes, torch.float32, ["contiguous"] * len(shapes))
    assert blocks(a, list(range(len(a))), _BLOCK) == [(0, 1), (1, 4), (4, 6), (6, 9), (9, 10)]
    assert max(x.numel() for x in a) > _CHUNK  # and a tensor cut into several combine chunks
    for granularity in ("tensor", "global"):
        want = reconstruct(a, c, clip_norm=1.0, granularity=granularity, fused=False)
        got = [x.clone() for x in a]
        stats = reconstruct_(got, c, clip_norm=1.0, granularity=granularity, fused=True)
        for g, w in zip(got, want, strict=True):
            assert_close_normwise(g, w)
        assert stats.num_segments == (len(a) if granularity == "tensor" else 1)


def _agree(x: float, y: float) -> bool:
    """Equal (infinities and zeros alike), both NaN, or within 1e-9 relative."""
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y or (math.isfinite(x) and math.isfinite(y) and abs(x - y) <= 1e-9 * max(abs(x), abs(y)))


# Sums as they come from real gradients: squares >= 0 (or inf/nan), dots of either sign,
# zeros, subnormals, huge values.
_squares = st.one_of(st.floats(0.0, 1e300), st.sampled_from([0.0, 5e-324, math.inf, math.nan]))
_dots = st.one_of(st.floats(-1e300, 1e300), st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan]))


_scales = st.sampled_from([None, 1.0, 3.5e-20, 2.0**60, 2.0**-1000, 2.0**1000])


@given(dot=_dots, sq_a=_squares, sq_c=_squares, scale=_scales, scale_c=_scales,
       clip_norm=st.sampled_from([None, 0.1, 1e-30, 1e30]), rounding=st.sampled_from([0.0, 2.0**-23]),
       sum_error=st.sampled_from([0.0, 1e-3]), exact=st.sampled_from([None, 0.0, 0.5, 1e20]))
def test_rule_on_floats_equals_rule_on_tensors(dot, sq_a, sq_c, scale, scale_c, clip_norm, rounding, sum_error,
                                               exact):
    """The CPU path runs the rule on Python floats, the device path on float64 tensors: the
    same zero policy, branches and NaN/Inf propagation, and the same values up to float64
    rounding (torch's ``sqrt`` and ``math.sqrt`` may differ by an ulp, which ``1 - cos`` or
    ``1 + cos`` would magnify near ``cos = +-1``: those inputs are left out)."""
    kwargs = dict(clip_norm=clip_norm, rounding=rounding, sum_error=sum_error)
    on_floats = rule(dot, sq_a, sq_c, scale_a=scale, scale_c=scale_c, exact_norm=exact, ops=FloatOps, **kwargs)
    cos = on_floats.cosine
    assume(math.isnan(cos) or cos == 0.0 or min(abs(1 - cos), abs(1 + cos)) > 1e-6)

    def t(x):
        return None if x is None else torch.tensor([x], dtype=torch.float64)

    on_tensors = rule(t(dot), t(sq_a), t(sq_c), scale_a=t(scale), scale_c=t(scale_c), exact_norm=t(exact),
                      ops=TensorOps, **kwargs)
    for name, f, x in zip(on_floats._fields, on_floats, on_tensors, strict=True):
        if name == "projected":
            assert f == bool(x.item()), name
        else:
            assert _agree(float(f), x.item()), f"{name}: {f!r} (floats) vs {x.item()!r} (tensors)"


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
