"""``agr_optim.functional``: the AGR rule against a float64 reference, its invariants, bad input.

Inputs are drawn by hypothesis: 1-4 tensors of random shapes (zero-size and 1-element
included), float32/float64/bfloat16/float16, magnitudes 1e-30..1e30 (float16: 1e-2..1e2),
and a relation between ``a`` and ``c`` (random, parallel, antiparallel, exactly orthogonal,
nearly antiparallel, zero, missing). Every check compares with ``_asserts.reference_agr``, the
paper's rule in float64 numpy, or with a geometric property that needs no reference at all.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _asserts import (
    SegmentRef,
    assert_between,
    assert_close_to_reference,
    assert_finite,
    assert_norm_at_most,
    assert_orthogonal_to_clean,
    assert_same_layout,
    assert_unchanged,
    assert_within_clip,
    check_stats,
    condition,
    flat,
    reference_agr,
    result_tolerance,
    rounding_bound,
    segment_ids,
    snapshot,
    to_numpy,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor

from agr_optim import ReconstructionStats
from agr_optim import functional as _functional

#: The implementations every property runs on: ``True`` is the fused path as it runs on CPU
#: (with a tiny block size, so that every case is cut into several blocks), ``"device"`` the
#: fused path as it runs on accelerators (no host reads: no range rescue, no exact clipping
#: of ill-conditioned segments), ``False`` the loop.
DEVICE = "device"
#: ``"dtensor"``: the gradients as DTensors on a world-size-1 gloo mesh (sharded on dim 0 where
#: they have one): the fused schedules on local shards, with the sums through ``all_reduce``.
DTENSOR = "dtensor"
IMPLEMENTATIONS = pytest.mark.parametrize(
    "fused", [True, DEVICE, False, DTENSOR], ids=["fused", "device", "loop", "dtensor"]
)


def _as(fused):
    if fused is True:
        return _functional._use_implementation("host", block=5)
    if fused == DEVICE:
        return _functional._use_implementation("device")
    if fused == DTENSOR:
        return contextlib.nullcontext()
    return _functional._use_implementation("loop")


_own_process_group = False


def _mesh():
    """A world-size-1 gloo mesh on an in-process store, made on first use in this module and
    destroyed after it (other test modules start their own process groups)."""
    global _own_process_group
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _own_process_group = True
    return init_device_mesh("cpu", (1,))


@pytest.fixture(scope="module", autouse=True)
def _destroy_own_process_group():
    yield
    global _own_process_group
    import torch.distributed as dist

    if _own_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _own_process_group = False


def _to_dtensors(tensors):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = _mesh()
    return [
        None if t is None else DTensor.from_local(t, mesh, [Shard(0) if t.dim() else Replicate()], run_check=False)
        for t in tensors
    ]


def reconstruct(adversarial, clean, *, fused=True, **kwargs):
    if fused == DTENSOR:
        results = _functional.reconstruct(_to_dtensors(adversarial), _to_dtensors(clean), **kwargs)
        return [r.to_local() for r in results]
    with _as(fused):
        return _functional.reconstruct(adversarial, clean, fused=fused is not False, **kwargs)


def reconstruct_(adversarial, clean, *, fused=True, **kwargs):
    if fused == DTENSOR:  # the local shards are the test's tensors: written in place
        return _functional.reconstruct_(_to_dtensors(adversarial), _to_dtensors(clean), **kwargs)
    with _as(fused):
        return _functional.reconstruct_(adversarial, clean, fused=fused is not False, **kwargs)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Decimal exponents of the magnitudes drawn per dtype (float16 tops out at 65504).
EXPONENTS = {torch.float32: 30, torch.float64: 30, torch.bfloat16: 30, torch.float16: 2}
RELATIONS = (
    "random",
    "parallel",  # c = 2^j a, exactly
    "antiparallel",  # c = -2^j a, exactly
    "orthogonal",  # disjoint supports: <a, c> = 0 exactly
    "near_antiparallel",  # c = -a + small noise: the ill-conditioned projection
    "near_parallel",
    "near_orthogonal",  # |cos| tiny, either sign: where the two branches meet
    "zero_a",
    "zero_c",
    "zero_both",
    "missing_c",  # clean None: counts as zeros
    "mixed",  # each tensor draws its own relation
)


@dataclass
class Case:
    adversarial: list[torch.Tensor]
    clean: list[torch.Tensor | None]
    dtype: torch.dtype
    granularity: str
    clip_norm: float | None
    relation: str

    @property
    def n(self) -> int:
        return sum(a.numel() for a in self.adversarial)

    @property
    def delta(self) -> float:
        return rounding_bound([self.dtype], self.n)

    def reference(self, clip_norm: float | None = ...) -> tuple[list[np.ndarray], list[SegmentRef]]:  # type: ignore[assignment]
        clip = self.clip_norm if clip_norm is ... else clip_norm
        return reference_agr(
            self.adversarial, self.clean, clip_norm=clip, segments=segment_ids(self.granularity, len(self.adversarial))
        )

    def sums_in_range(self) -> bool:
        """Whether every tensor's squares sum accurately in the accumulation dtype as they are
        (norms in [1e-11, 1e18] for float32 sums): the device path takes them as they come."""
        if self.dtype == torch.float64:
            return True
        for a, c in zip(self.adversarial, self.clean, strict=True):
            norm_a = float(np.linalg.norm(to_numpy(a, a)))
            norm_c = 0.0 if c is None else float(np.linalg.norm(to_numpy(c, c)))
            if any(v != 0 and not 1e-11 <= v <= 1e18 for v in (norm_a, norm_c)):
                return False
        return True

    def ill_clipped(self, ref: SegmentRef) -> bool:
        """A clipped, ill-conditioned projected segment: the device path clips it by an upper
        bound of ``|r|``, not exactly (``test_clip_safe_without_host_reads``)."""
        return self.clip_norm is not None and ref.cosine < -2 * self.delta and condition(ref, self.delta) ** 2 > 8

    def segments(self) -> list[list[int]]:
        if self.granularity == "global":
            return [list(range(len(self.adversarial)))]
        return [[i] for i in range(len(self.adversarial))]


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).filter(lambda s: math.prod(s) <= 96)


def _pair(rng: np.random.Generator, shape: tuple[int, ...], relation: str, ka: float, kc: float, dtype):
    """One (a, c) pair, rounded to ``dtype``; c is built from the rounded a where it matters."""
    a = torch.from_numpy(np.asarray(rng.standard_normal(shape) * ka)).to(dtype)
    noise = torch.from_numpy(np.asarray(rng.standard_normal(shape) * kc)).to(dtype)
    power = float(2.0 ** int(rng.integers(-4, 5)))
    if relation == "random":
        c = noise
    elif relation == "parallel":
        c = a * power
    elif relation == "antiparallel":
        c = -a * power
    elif relation == "orthogonal":
        mask = (torch.arange(a.numel()) % 2 == 0).reshape(shape)
        a, c = torch.where(mask, a, 0), torch.where(mask, 0, noise)
    elif relation in ("near_antiparallel", "near_parallel"):
        sign = -1.0 if relation == "near_antiparallel" else 1.0
        eps = 10.0 ** float(rng.uniform(-6, -1))
        c = np.asarray(sign * power * to_numpy(a, a) + eps * power * to_numpy(noise, noise) * ka / kc)
        c = torch.from_numpy(c).to(dtype)
    elif relation == "near_orthogonal":
        a64, n64 = to_numpy(a, a).ravel(), to_numpy(noise, noise).ravel()
        sq = float(a64 @ a64)
        c0 = n64 - (float(a64 @ n64) / sq) * a64 if sq > 0 else n64
        eps = float(rng.choice([-1.0, 1.0])) * 10.0 ** float(rng.uniform(-6, -1))
        c = c0 + eps * math.sqrt(float(c0 @ c0) / sq) * a64 if sq > 0 else c0
        c = torch.from_numpy(np.asarray(c).reshape(shape)).to(dtype)
    elif relation == "zero_a":
        a, c = torch.zeros_like(a), noise
    elif relation == "zero_c":
        c = torch.zeros_like(a)
    elif relation == "zero_both":
        a, c = torch.zeros_like(a), torch.zeros_like(a)
    elif relation == "missing_c":
        c = None
    else:  # pragma: no cover
        raise AssertionError(relation)
    return a, c


@st.composite
def cases(draw, dtypes=DTYPES, clip: bool | None = None, granularities=("tensor", "global")) -> Case:
    dtype = draw(st.sampled_from(dtypes))
    top = EXPONENTS[dtype]
    exp_a = draw(st.integers(-top, top))
    exp_c = min(top, max(-top, exp_a + draw(st.integers(-3, 3))))
    relation = draw(st.sampled_from(RELATIONS))
    n_tensors = draw(st.integers(1, 4))
    tensor_shapes = [tuple(draw(shapes)) for _ in range(n_tensors)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    adversarial, clean = [], []
    for shape in tensor_shapes:
        rel = str(rng.choice(RELATIONS[:-1])) if relation == "mixed" else relation
        a, c = _pair(rng, shape, rel, 10.0**exp_a, 10.0**exp_c, dtype)
        adversarial.append(a)
        clean.append(c)
    assume(all(bool(t.isfinite().all()) for t in adversarial + [c for c in clean if c is not None]))
    use_clip = draw(st.booleans()) if clip is None else clip
    clip_norm = None
    if use_clip:
        # Around |a|: sometimes active, sometimes not.
        clip_norm = 10.0 ** (exp_a + draw(st.floats(-2.0, 2.0)))
    granularity = draw(st.sampled_from(granularities))
    return Case(adversarial, clean, dtype, granularity, clip_norm, relation)


def _segment_arrays(case: Case, result: list[torch.Tensor]):
    """Per segment: (r, a, c) flattened to float64, and the member indices."""
    for members in case.segments():
        r = flat([result[i] for i in members])
        a = flat([case.adversarial[i] for i in members])
        c = flat([case.clean[i] for i in members], like=[case.adversarial[i] for i in members])
        yield members, r, a, c


# --------------------------------------------------------------------------- against the reference
@IMPLEMENTATIONS
@given(case=cases())
def test_matches_float64_reference(case: Case, fused: bool | str) -> None:
    assume(fused != DEVICE or case.sums_in_range())
    before_a, before_c = snapshot(case.adversarial), snapshot(case.clean)
    result = reconstruct(case.adversarial, case.clean, clip_norm=case.clip_norm, granularity=case.granularity,
                         fused=fused)
    assert_same_layout(result, case.adversarial)
    assert_finite(result)
    assert_unchanged(before_a, case.adversarial, "adversarial")
    assert_unchanged(before_c, case.clean, "clean")
    r_ref, refs = case.reference()
    for (members, r, _, _), ref in zip(_segment_arrays(case, result), refs, strict=True):
        if fused == DEVICE and case.ill_clipped(ref):
            continue
        expected = flat([r_ref[i] for i in members])
        tol = result_tolerance(ref, case.clip_norm, case.delta)
        assert_close_to_reference(r, expected, tol, what=f"{case.relation}, segment {members}: ")


@given(case=cases())
def test_fused_equals_loop(case: Case) -> None:
    """Both implementations within twice the reference bound of each other.

    The bound is the one of ``result_tolerance``: ``delta * (|a| + |c|)`` from the dtype and
    the segment size, plus, where clipping is active, ``clip_norm * delta * kappa^2``. The
    second term is large only for a nearly antiparallel pair that gets projected and clipped:
    the fused path takes ``|r|`` from ``|a|^2 (1 - cos)(1 + cos)`` and ``1 + cos`` there is a
    difference of nearly equal numbers (relative error ``eps / sin^2``), while the loop
    measures the explicit ``r``. Everywhere else the tolerance stays at the dtype's level.
    """
    kwargs = dict(clip_norm=case.clip_norm, granularity=case.granularity)
    fused = reconstruct(case.adversarial, case.clean, fused=True, **kwargs)
    loop = reconstruct(case.adversarial, case.clean, fused=False, **kwargs)
    for (members, r_f, _, _), (_, r_l, _, _), ref in zip(
        _segment_arrays(case, fused), _segment_arrays(case, loop), case.reference()[1], strict=True
    ):
        tol = 2 * result_tolerance(ref, case.clip_norm, case.delta)
        assert_close_to_reference(r_f, r_l, tol, what=f"fused vs loop, {case.relation}, segment {members}: ")
    for f, lo in zip(fused, loop, strict=True):
        assert f.dtype == lo.dtype and f.shape == lo.shape


def test_fused_equals_loop_float64_with_zero_size_tensor() -> None:
    """torch's foreach-vs-loop pattern: float64, a zero-size tensor among others, tight bound."""
    f64 = dict(dtype=torch.float64)
    a = [torch.randn(5, 3, **f64), torch.zeros(0, **f64), torch.randn(7, **f64)]
    c = [torch.randn(5, 3, **f64), torch.zeros(0, **f64), -a[2] + 0.1]
    for granularity in ("tensor", "global"):
        for clip_norm in (None, 0.5):
            fused = reconstruct(a, c, clip_norm=clip_norm, granularity=granularity, fused=True)
            loop = reconstruct(a, c, clip_norm=clip_norm, granularity=granularity, fused=False)
            for f, lo in zip(fused, loop, strict=True):
                torch.testing.assert_close(f, lo, rtol=1e-12, atol=1e-12)
                assert f.dtype == torch.float64


# --------------------------------------------------------------------------- invariants
@IMPLEMENTATIONS
@given(case=cases())
def test_projection_is_orthogonal_to_clean_and_not_longer(case: Case, fused: bool | str) -> None:
    assume(fused != DEVICE or case.sums_in_range())
    result = reconstruct(case.adversarial, case.clean, clip_norm=case.clip_norm, granularity=case.granularity,
                         fused=fused)
    delta = case.delta
    for (_, r, a, c), ref in zip(_segment_arrays(case, result), case.reference()[1], strict=True):
        # Clearly projected (or exactly orthogonal / zero): the library takes that branch too.
        if ref.cosine < -2 * delta or ref.dot == 0:
            assert_orthogonal_to_clean(r, c, a, delta)
            assert_norm_at_most(r, ref.norm_a, delta, "|a|")


@IMPLEMENTATIONS
@given(case=cases(clip=False))
def test_interpolation_lies_between_a_and_c(case: Case, fused: bool | str) -> None:
    assume(fused != DEVICE or case.sums_in_range())
    result = reconstruct(case.adversarial, case.clean, granularity=case.granularity, fused=fused)
    delta = case.delta
    for (_, r, a, c), ref in zip(_segment_arrays(case, result), case.reference()[1], strict=True):
        if ref.cosine > 2 * delta:
            assert_between(r, a, c, delta)


@IMPLEMENTATIONS
@given(case=cases(clip=True))
def test_result_norm_within_clip(case: Case, fused: bool | str) -> None:
    """``|r| <= clip_norm`` up to the output rounding.

    The loop clips by the norm of the ``r`` it computed. The fused path clips by the closed-form
    norm, whose relative error is ``delta * kappa^2`` (``kappa = 1/sin``) for a projected pair;
    past ``kappa^2 = 16`` it switches to the explicit norm (see
    ``test_fused_clip_exact_when_nearly_antiparallel``), so the slack is at most ``64 delta``.
    The device path uses a safe upper bound there instead: the same slack holds.
    """
    assume(fused != DEVICE or case.sums_in_range())
    result = reconstruct(case.adversarial, case.clean, clip_norm=case.clip_norm, granularity=case.granularity,
                         fused=fused)
    assert case.clip_norm is not None
    for (_, r, _, _), ref in zip(_segment_arrays(case, result), case.reference()[1], strict=True):
        slack = case.delta
        if fused is not False:
            # Ill-conditioned segments (kappa^2 > 16): exact norm (CPU) or an upper bound (device).
            kappa = condition(ref, case.delta)
            slack += min(1.0, 4 * case.delta * min(kappa * kappa, 16.0))
        assert_within_clip(r, case.clip_norm, slack)


def _nearly_antiparallel(sin: float, n: int = 100_000) -> tuple[Tensor, Tensor, float]:
    """float32 ``a`` and ``c`` with ``sin(a, -c) = sin``; ``clip_norm`` far below ``|a|``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=g)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    c = (-a.double() + sin * noise * a.double().norm() / n**0.5).float()
    return a, c, 1e-6 * a.double().norm().item()


@pytest.mark.parametrize("sin", [1e-1, 1e-2, 1e-3, 1e-5])
def test_fused_clip_exact_when_nearly_antiparallel(sin: float) -> None:
    """Near ``c = -a`` the closed-form ``|r|^2 = |a|^2 (1 - cos)(1 + cos)`` loses ``1 + cos`` to
    the float32 sums (at ``sin = 1e-3`` it once let through 1000x ``clip_norm``). On CPU the fused
    path clips such ill-conditioned segments by the norm of the explicit ``r``: the result is
    within ``clip_norm`` and equals the loop's."""
    a, c, clip_norm = _nearly_antiparallel(sin)
    eps = torch.finfo(torch.float32).eps
    (fused,) = reconstruct([a], [c], clip_norm=clip_norm, fused=True)
    (loop,) = reconstruct([a], [c], clip_norm=clip_norm, fused=False)
    assert fused.double().norm().item() <= clip_norm * (1 + 4 * eps)
    # The explicit r is itself only accurate to eps |a| / |r| relative (|r| = sin |a|).
    tol = 64 * eps / sin * clip_norm
    assert (fused.double() - loop.double()).norm().item() <= tol
    stats = reconstruct_([a.clone()], [c], clip_norm=clip_norm)
    assert bool(stats.projected.all())
    a64, c64 = a.double(), c.double()
    exact = (a64 - (a64 @ c64) / (c64 @ c64) * c64).norm().item()  # float64, independent
    assert stats.norm_reconstructed.item() == pytest.approx(exact, rel=64 * eps / sin)


@pytest.mark.parametrize("sin", [1e-1, 1e-2, 1e-3, 1e-5, 0.0])
def test_clip_safe_without_host_reads(sin: float) -> None:
    """Where the fused path may not read the device (accelerators, ``torch.compile``), no exact
    second pass is possible: ill-conditioned segments are clipped by a safe upper bound of
    ``|r|``. The result never exceeds ``clip_norm`` (it may be clipped more than exactly)."""
    a, c, clip_norm = _nearly_antiparallel(sin)
    eps = torch.finfo(torch.float32).eps
    with _functional._use_implementation("device"):
        (r,) = _functional.reconstruct([a], [c], clip_norm=clip_norm, fused=True)
    (loop,) = reconstruct([a], [c], clip_norm=clip_norm, fused=False)
    assert r.double().norm().item() <= clip_norm * (1 + 4 * eps)
    # Same direction as the exact result, only shorter: r = t * loop with 0 < t <= 1.
    if sin > 0:
        t = torch.dot(r.double(), loop.double()).item() / loop.double().norm().item() ** 2
        assert 0 < t <= 1 + 64 * eps / sin
        assert (r.double() - t * loop.double()).norm().item() <= 64 * eps / sin * clip_norm


@IMPLEMENTATIONS
@given(case=cases(), log_k=st.floats(-6, 6))
def test_projection_invariant_to_scaling_clean(case: Case, fused: bool | str, log_k: float) -> None:
    k = 10.0**log_k
    scaled = [None if c is None else c * k for c in case.clean]
    scaled_case = Case(case.adversarial, scaled, case.dtype, case.granularity, case.clip_norm, case.relation)
    assume(fused != DEVICE or (case.sums_in_range() and scaled_case.sums_in_range()))
    assume(all(s is None or bool(s.isfinite().all()) for s in scaled))
    # k c is rounded to the dtype and may under/overflow in float16: only exact-enough copies.
    for s, c in zip(scaled, case.clean, strict=True):
        if s is not None:
            back = s.double() / k
            assume(bool(((back - c.double()).abs() <= 2 * torch.finfo(c.dtype).eps * c.double().abs()).all()))
    kwargs = dict(clip_norm=case.clip_norm, granularity=case.granularity, fused=fused)
    r1 = reconstruct(case.adversarial, case.clean, **kwargs)
    r2 = reconstruct(case.adversarial, scaled, **kwargs)
    delta = case.delta
    for (members, x, _, _), (_, y, _, _), ref in zip(
        _segment_arrays(case, r1), _segment_arrays(case, r2), case.reference()[1], strict=True
    ):
        if ref.cosine < -2 * delta or ref.dot == 0:
            # Same exact result for both; each within the reference bound taken with |c| -> 0
            # (the projection's error scales with |a| only, whatever |c| is).
            ref_a = SegmentRef(ref.dot, ref.norm_a, 0.0, ref.cosine, True, ref.norm_r, ref.clip_scale)
            tol = 2 * result_tolerance(ref_a, case.clip_norm, 2 * delta)
            assert_close_to_reference(x, y, tol, what=f"c -> {k:g} c, segment {members}: ")


@IMPLEMENTATIONS
@given(case=cases(), bad=st.sampled_from([math.nan, math.inf, -math.inf]), where=st.sampled_from(["a", "c"]))
def test_non_finite_input_is_not_made_finite(case: Case, fused: bool | str, bad: float, where: str) -> None:
    target = case.adversarial if where == "a" else case.clean
    candidates = [i for i, t in enumerate(target) if t is not None and t.numel() > 0]
    assume(candidates)
    i = candidates[0]
    target[i] = target[i].clone()
    target[i].view(-1)[0] = bad
    result = reconstruct(case.adversarial, case.clean, clip_norm=case.clip_norm, granularity=case.granularity,
                         fused=fused)
    members = [m for m in case.segments() if i in m][0]
    segment = torch.cat([result[m].reshape(-1).double() for m in members])
    assert not bool(segment.isfinite().all()), f"{bad} in {where}[{i}] gave a finite segment: {segment}"


@IMPLEMENTATIONS
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("zero", ["a", "c", "none"])
def test_non_finite_next_to_a_zero_gradient(fused: bool | str, bad: float, zero: str) -> None:
    """The zero policy (cos = 0, projection onto 0 is the identity) must not mask a NaN/Inf."""
    a, c = torch.randn(4), torch.randn(4)
    if zero == "a":
        a, c = torch.zeros(4), c.index_fill(0, torch.tensor([1]), bad)
    elif zero == "c":
        a, c = a.index_fill(0, torch.tensor([1]), bad), torch.zeros(4)
    else:
        a = a.index_fill(0, torch.tensor([1]), bad)
    for clip_norm in (None, 0.1):
        (r,) = reconstruct([a], [c], clip_norm=clip_norm, fused=fused)
        assert not bool(r.isfinite().all()), f"a={a}, c={c} gave finite {r}"
    (r,) = reconstruct([a], [None], fused=fused)
    assert not bool(r.isfinite().all()) or bool(a.isfinite().all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("k", [1.0, 2.0, 3.0, 0.1])
def test_fused_clip_safe_for_exactly_antiparallel(dtype: torch.dtype, n: int, k: float) -> None:
    """``c = -k a`` rounded: the exact ``r`` is (nearly) 0, the computed one is rounding noise of
    size ``eps |a|`` (exactly 0 when k is a power of 2). With ``clip_norm`` far below that, the
    fused path's noise floor must still clip it (the closed-form ``|r|`` alone says 0 and would
    pass the noise on unclipped)."""
    a = torch.randn(n).to(dtype) * 100
    c = -a * k
    clip_norm = 1e-4 * torch.finfo(dtype).eps * a.double().norm().item()
    for fused in (True, DEVICE, False):
        for granularity in ("tensor", "global"):
            (r,) = reconstruct([a], [c], clip_norm=clip_norm, granularity=granularity, fused=fused)
            assert_within_clip(flat([r]), clip_norm, 4 * torch.finfo(dtype).eps)


@IMPLEMENTATIONS
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradients_give_zero_not_nan(fused: bool | str, dtype: torch.dtype) -> None:
    a = [torch.zeros(3, dtype=dtype), torch.zeros((), dtype=dtype), torch.zeros(0, dtype=dtype)]
    c = [torch.zeros(3, dtype=dtype), None, torch.zeros(0, dtype=dtype)]
    for granularity in ("tensor", "global"):
        for clip_norm in (None, 1e-3):
            result = reconstruct(a, c, clip_norm=clip_norm, granularity=granularity, fused=fused)
            assert_same_layout(result, a)
            for r in result:
                assert bool((r == 0).all())


def test_docstring_examples_by_hand() -> None:
    """Two cases worked out on paper: projection of (1, 0) against (-1, 1), and a clip."""
    for fused in (True, DEVICE, False):
        (r,) = reconstruct([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])], fused=fused)
        torch.testing.assert_close(r, torch.tensor([0.5, 0.5]))
        # cos = 1: r = c = (3, 4), |r| = 5, clipped to norm 1.
        (r,) = reconstruct([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.0])], clip_norm=1.0, fused=fused)
        torch.testing.assert_close(r, torch.tensor([0.6, 0.8]))
        # cos = 0.6 (a = (1, 0), c = (3, 4)/5 * 2): r = 0.6 c + 0.4 a.
        c = torch.tensor([1.2, 1.6])
        (r,) = reconstruct([torch.tensor([1.0, 0.0])], [c], fused=fused)
        torch.testing.assert_close(r, 0.6 * c + 0.4 * torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------- the in-place form and stats
@IMPLEMENTATIONS
@given(case=cases(dtypes=(torch.float32, torch.float64)))
def test_in_place_and_stats_match_reference(case: Case, fused: bool | str) -> None:
    assume(fused != DEVICE or case.sums_in_range())
    expected = reconstruct(case.adversarial, case.clean, clip_norm=case.clip_norm, granularity=case.granularity,
                           fused=fused)
    targets = [a.clone() for a in case.adversarial]
    clean_before = snapshot(case.clean)
    stats = reconstruct_(targets, case.clean, clip_norm=case.clip_norm, granularity=case.granularity, fused=fused)
    assert_unchanged(clean_before, case.clean, "clean")
    for t, e in zip(targets, expected, strict=True):
        assert torch.equal(t, e), "reconstruct_ differs from reconstruct"
    assert isinstance(stats, ReconstructionStats)
    refs = case.reference()[1]
    assert stats.num_segments == len(refs)
    if fused == DEVICE:
        assume(not any(case.ill_clipped(ref) for ref in refs))
    check_stats(stats, refs, case.clip_norm, case.delta)


def test_stats_are_tensors_on_the_gradients_device_without_sync() -> None:
    a = [torch.randn(4), torch.randn(2, 2)]
    c = [torch.randn(4), torch.randn(2, 2)]
    stats = reconstruct_([x.clone() for x in a], c, clip_norm=0.5)
    assert all(getattr(stats, f).device == a[0].device for f in ("cosine", "projected", "clip_scale"))
    rate = stats.projection_rate()
    assert isinstance(rate, torch.Tensor) and rate.dim() == 0
    assert rate.item() == stats.projected.double().mean().item()
    d = stats.to_dict()
    assert set(d) == {"cosine", "projected", "norm_adversarial", "norm_clean", "norm_reconstructed", "clip_scale",
                      "out_of_range"}


def test_empty_list() -> None:
    assert reconstruct([], []) == []
    stats = reconstruct_([], [])
    assert stats.num_segments == 0


# --------------------------------------------------------------------------- bad input
def _inputs():
    a = [torch.randn(3), torch.randn(2, 2)]
    c = [torch.randn(3), torch.randn(2, 2)]
    return a, c


BAD_CALLS = [
    pytest.param(lambda a, c: dict(adversarial=a, clean=c[:1]), "different lengths", id="lengths"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=[c[0], torch.randn(4)]), "shape mismatch at index 1",
                 id="shapes"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=[c[0], c[1].double()]), "dtype mismatch at index 1",
                 id="dtypes"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=[c[0], torch.empty(2, 2, device="meta")]),
                 "device mismatch at index 1", id="devices"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=[c[0].to_sparse(), c[1]]), "sparse", id="sparse-clean"),
    pytest.param(lambda a, c: dict(adversarial=[a[0].to_sparse(), a[1]], clean=c), "sparse", id="sparse-adv"),
    pytest.param(lambda a, c: dict(adversarial=[a[0].long(), a[1]], clean=[c[0].long(), c[1]]), "floating",
                 id="integer"),
    pytest.param(lambda a, c: dict(adversarial=a[0], clean=c[0]), "sequences of tensors", id="single-tensor"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=c, clip_norm=-1.0), "clip_norm", id="negative-clip"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=c, clip_norm=0.0), "clip_norm", id="zero-clip"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=c, clip_norm=math.nan), "clip_norm", id="nan-clip"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=c, clip_norm="0.1"), "clip_norm", id="str-clip"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=c, granularity="layer"), "granularity", id="granularity"),
    pytest.param(lambda a, c: dict(adversarial=a, clean=c, granularity="group"), "granularity",
                 id="group-not-functional"),
]


@pytest.mark.parametrize("function", [reconstruct, reconstruct_], ids=["reconstruct", "reconstruct_"])
@pytest.mark.parametrize("make, message", BAD_CALLS)
def test_bad_input_names_the_problem_and_changes_nothing(function, make, message) -> None:
    a, c = _inputs()
    kwargs = make(a, c)
    adversarial, clean = kwargs.pop("adversarial"), kwargs.pop("clean")
    seq = isinstance(adversarial, list)
    before_a = snapshot(adversarial if seq else [adversarial])
    before_c = [x if x is None or x.device.type == "meta" or x.is_sparse else x.clone()
                for x in (clean if seq else [clean])]
    with pytest.raises(ValueError, match=message):
        function(adversarial, clean, **kwargs)
    for b, x in zip(before_a, adversarial if seq else [adversarial], strict=True):
        assert torch.equal(b.to_dense(), x.to_dense()), "adversarial changed"
    for b, x in zip(before_c, clean if seq else [clean], strict=True):
        if x.device.type != "meta":
            assert torch.equal(b.to_dense(), x.to_dense()), "clean changed"


# --------------------------------------------------------------------------- found in review
def _run_as(fused, adversarial, clean, segment_ids, clip_norm):
    """``functional._run`` with explicit segment ids (what the optimizer passes)."""
    with _as(fused):
        return _functional._run(adversarial, clean, segment_ids, max(segment_ids) + 1, clip_norm,
                                fused is not False, out=None)


@IMPLEMENTATIONS
def test_segments_whose_tensors_are_not_adjacent(fused: bool | str) -> None:
    """Segment ids like ``[0, 1, 0]``: a segment is all its tensors, wherever they sit."""
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(4, generator=g) for _ in range(3)]
    c = [torch.randn(4, generator=g) for _ in range(3)]
    results, stats = _run_as(fused, a, c, [0, 1, 0], 0.5)
    r_ref, refs = reference_agr(a, c, clip_norm=0.5, segments=[0, 1, 0])
    assert stats.num_segments == 2
    for s, ref in enumerate(refs):
        assert stats.cosine[s].item() == pytest.approx(ref.cosine, abs=1e-6)
    for r, expected in zip(results, r_ref, strict=True):
        np.testing.assert_allclose(r.double().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
def test_float64_segment_sums_that_overflow_only_summed(fused: bool) -> None:
    """Each tensor's float64 squares are finite (1.4e308), their sum over the segment is not:
    the CPU path redoes the segment scaled, like the loop."""
    f64 = dict(dtype=torch.float64)
    a = [torch.tensor([1.2e154], **f64), torch.tensor([1.2e154], **f64)]
    c = [torch.tensor([1e154], **f64), torch.tensor([-0.5e154], **f64)]
    result = reconstruct(a, c, clip_norm=1.0, granularity="global", fused=fused)
    r_ref, _ = reference_agr([x / 1e154 for x in a], [y / 1e154 for y in c], clip_norm=1.0, segments=[0, 0])
    for r, expected in zip(result, r_ref, strict=True):  # clipped to norm 1: the scale drops out
        np.testing.assert_allclose(r.numpy(), expected, rtol=1e-12)


@IMPLEMENTATIONS
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_nan_in_a_tensor_without_clean_partner_spoils_its_whole_segment(fused: bool | str, clip_norm) -> None:
    """The NaN's tensor has no clean gradient, so ``<a, c>`` stays finite: the NaN norm alone
    must make the cosine NaN (the zero policy must not read a NaN norm as a zero one)."""
    a = [torch.tensor([math.nan, 1.0]), torch.tensor([3.0, 4.0])]
    c = [None, torch.tensor([1.0, 0.0])]
    result = reconstruct(a, c, clip_norm=clip_norm, granularity="global", fused=fused)
    for r in result:
        assert bool(r.isnan().all()), result


def test_clean_far_below_adversarial_in_float32() -> None:
    """``|c| / |a|`` about 1e-30: float32 squares of ``c / max|a|`` underflow to 0. The CPU
    fused path's rescue sums in float64 and keeps ``c``'s direction. (The loop sums in
    float32 and takes such a ``c`` as zero: the limit stated in ``scaled_sums``.)"""
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(64, generator=g)]
    c = [torch.randn(64, generator=g) * 1e-30]
    (r,) = reconstruct(a, c, fused=True)
    (expected,), _ = reference_agr(a, c, clip_norm=None, segments=[0])
    assert np.linalg.norm(r.double().numpy() - expected) <= 1e-6 * np.linalg.norm(expected)


@pytest.mark.parametrize("fused", [True, False, DTENSOR], ids=["fused", "loop", "dtensor"])
@pytest.mark.parametrize("magnitude", [6e153, 1e160, 1e300])
def test_float64_norms_whose_squares_overflow_are_clipped_not_zeroed(fused: bool, magnitude: float) -> None:
    """The clipping bound was ``sqrt(|r|^2 + ...)``: past |r| ~ 1e154 the square overflowed to
    inf and the clip scale became 0, so a huge float64 gradient gave a zero update. 6e153: the
    summed squares sit at the top of the range. (The device
    path takes sums as they come, and these overflow there: no range rescue without host reads.)"""
    f64 = dict(dtype=torch.float64)
    a = [torch.tensor([1.0, 2.0], **f64) * magnitude]
    c = [torch.tensor([1.0, -0.1], **f64) * magnitude]
    (r,) = reconstruct(a, c, clip_norm=1.0, fused=fused)
    (expected,), _ = reference_agr([a[0] / magnitude], [c[0] / magnitude], clip_norm=1.0, segments=[0])
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------- issue 9: silent wrong results
def _exact(a: Tensor, c: Tensor, clip_norm: float | None) -> np.ndarray:
    """The rule on one segment in exact rational arithmetic (no range limits): only the cosine
    and the clip factor pass through a float square root, taken of ratios in [0, 1]."""
    from fractions import Fraction

    def sqrt(x: Fraction) -> Fraction:  # rescaled by a power of four: no float over/underflow
        k = (x.numerator.bit_length() - x.denominator.bit_length()) // 2
        return Fraction(math.sqrt(float(x / Fraction(4) ** k))) * Fraction(2) ** k

    av = [Fraction(x) for x in a.double().reshape(-1).tolist()]
    cv = [Fraction(y) for y in c.double().reshape(-1).tolist()]
    d = sum(x * y for x, y in zip(av, cv, strict=True))
    na2, nc2 = sum(x * x for x in av), sum(y * y for y in cv)
    cos = Fraction(0) if na2 == 0 or nc2 == 0 else d / (sqrt(na2) * sqrt(nc2))
    if cos <= 0:
        r = [x - (d / nc2) * y for x, y in zip(av, cv, strict=True)] if nc2 else av
    else:
        r = [cos * y + (1 - cos) * x for x, y in zip(av, cv, strict=True)]
    norm_sq = sum(x * x for x in r)
    if clip_norm is not None and norm_sq > Fraction(clip_norm) ** 2:
        r = [x * Fraction(clip_norm) / sqrt(norm_sq) for x in r]
    return np.array([float(x) for x in r])


@IMPLEMENTATIONS
def test_underflowed_clean_gradient_gives_the_exact_finite_update(fused) -> None:
    """Issue 9.1: a = [1e-6, 0], c = [-1e-45, 1e-45] (float32 subnormals): k_c = 5e38 overflows
    float32 although k_c c does not; the update was [-inf, inf]. Exact: [5e-7, 5e-7]. Without
    host reads the segment is out of range and keeps its (clipped) adversarial gradient."""
    a = torch.tensor([1e-6, 0.0])
    c = torch.tensor([-1e-45, 1e-45])
    (r,) = reconstruct([a], [c], clip_norm=0.1, fused=fused)
    assert torch.isfinite(r).all()
    if fused == DEVICE:  # c's squares are exactly 0: without a host read, c counts as zero
        assert r.tolist() == a.tolist()
    else:
        np.testing.assert_allclose(r.numpy(), [5e-7, 5e-7], rtol=1e-6)
        np.testing.assert_allclose(r.numpy(), _exact(a, c, 0.1), rtol=1e-6)


@pytest.mark.parametrize("fused", [True, False, DTENSOR], ids=["fused", "loop", "dtensor"])
def test_float64_norms_far_apart_are_clipped(fused) -> None:
    """Issue 9.1 (float64): |a| ~ 1e49 and |c| ~ 1e222 gave |r| ~ 2e15 (fused) and ~1e50 (loop)
    at clip 0.1: one common scale 1e222 made a's squares underflow. Separate scales."""
    torch.manual_seed(0)
    a = torch.randn(16, dtype=torch.float64) * 1e48
    c = torch.randn(16, dtype=torch.float64) * 1e221
    (r,) = reconstruct([a], [c], clip_norm=0.1, fused=fused)
    assert math.isclose(r.norm().item(), 0.1, rel_tol=1e-9)
    np.testing.assert_allclose(r.numpy(), _exact(a, c, 0.1), rtol=1e-9, atol=1e-12)


@IMPLEMENTATIONS
def test_clip_applies_when_the_clean_entry_dwarfs_the_adversarial_one(fused) -> None:
    """Issue 9.6: float32 a = [1, 0], c = [0, 1e25] (orthogonal: r = a, |r| = 1) came back
    unclipped from the loop (its common scale 1e25 made |r|'s squares underflow)."""
    a, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1e25])
    (r,) = reconstruct([a], [c], clip_norm=0.1, fused=fused)
    if fused == DEVICE:  # |c|^2 overflows float32: without a host read, a loud NaN
        assert torch.isnan(r).all()
        return
    np.testing.assert_allclose(r.numpy(), [0.1, 0.0], rtol=1e-6)


@pytest.mark.parametrize("fused", [True, False, DTENSOR], ids=["fused", "loop", "dtensor"])
def test_global_segment_with_one_huge_clean_entry_is_clipped(fused) -> None:
    """Issue 9.6 (float64, global): one clean entry of 1e300 among ordinary gradients returned
    |r| = 1.118 at clip 0.1 on both paths."""
    a = [torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64)]
    c = [torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1e300, 0.0], dtype=torch.float64)]
    r = reconstruct(a, c, clip_norm=0.1, granularity="global", fused=fused)
    norm = math.hypot(*(x for t in r for x in t.tolist()))
    assert math.isclose(norm, 0.1, rel_tol=1e-9)
    want = _exact(torch.cat(a), torch.cat(c), 0.1)
    np.testing.assert_allclose(torch.cat(r).numpy(), want, rtol=1e-9, atol=1e-15)


@IMPLEMENTATIONS
def test_tiny_multiple_of_the_clean_gradient_is_parallel(fused) -> None:
    """Issue 9.7: float32 a = 1e-30 c: cos = 1, so r = c (clipped). The loop gave r = 0, cos 0."""
    torch.manual_seed(1)
    c = torch.randn(32)
    a = c * 1e-30
    stats = reconstruct_([r := a.clone()], [c], clip_norm=None, fused=fused)
    if fused == DEVICE:  # a's squares are exactly 0: without a host read, a counts as zero
        assert torch.equal(r, a) and stats.cosine.item() == 0.0
        return
    assert math.isclose(stats.cosine.item(), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(r.numpy(), c.numpy(), rtol=1e-5)


@IMPLEMENTATIONS
def test_underflowing_antiparallel_gradients_cancel(fused) -> None:
    """Issue 9.11: float32 a = 1e-25 randn(64), c = -a: every square underflows to 0; cos = -1
    and r = 0 exactly. The DTensor path gave |r|/|a| = 1 (no underflow check of zero sums)."""
    torch.manual_seed(2)
    a = 1e-25 * torch.randn(64)
    (r,) = reconstruct([a], [-a], clip_norm=0.1, fused=fused)
    if fused == DEVICE:  # the squares are exactly zero: indistinguishable from zero gradients
        assert torch.equal(r, a)
        return
    assert r.double().norm().item() <= 1e-6 * a.double().norm().item()


@given(
    log_a=st.integers(-45, 38), log_c=st.integers(-45, 38), n=st.integers(1, 8), seed=st.integers(0, 2**16),
    clip=st.sampled_from([None, 0.1]),
)
def test_finite_inputs_never_give_non_finite_updates_without_host_reads(log_a, log_c, n, seed, clip) -> None:
    """Without host reads nothing can be redone, but finite float32 gradients whose norms fit
    float32's squares (below ~1e19) give a finite update within the clip at any magnitude
    (out-of-range small segments keep their clipped a, flagged ``out_of_range``). Norms above
    that look like an overflow and give NaN, never a finite wrong value or a silent Inf."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, generator=g, dtype=torch.float64) * 10.0**log_a).float()
    c = (torch.randn(n, generator=g, dtype=torch.float64) * 10.0**log_c).float()
    assume(torch.isfinite(a).all() and torch.isfinite(c).all())
    with _functional._use_implementation("device"):
        stats = _functional.reconstruct_([r := a.clone()], [c], clip_norm=clip)
    largest_square = max(a.double().square().sum().item(), c.double().square().sum().item())
    f32_max = torch.finfo(torch.float32).max
    assume(not f32_max / 4 < largest_square < 4 * f32_max)  # rounding decides at the border
    if largest_square >= f32_max:
        assert torch.isnan(r).all() and stats.out_of_range.item()
        return
    assert torch.isfinite(r).all()
    if clip is not None:
        assert r.double().norm().item() <= clip * (1 + 1e-5)


_F64 = dict(dtype=torch.float64)
#: Review findings on the CPU paths: (adversarial, clean, kwargs), each once wrong.
_EXTREMES = {
    # power-of-two scales of values >= 2^1023 were inf
    "f64_clean_at_the_top": ([torch.tensor([1.0, 0.0], **_F64)], [torch.tensor([1e308, 1e308], **_F64)], {}),
    "f64_adversarial_at_the_top": ([torch.tensor([1e308], **_F64)], [None], {"clip_norm": 1.0}),
    "f64_orthogonal_top_clip": ([torch.tensor([1e10, 0.0], **_F64)], [torch.tensor([0.0, 1e308], **_F64)],
                                {"clip_norm": 1.0}),
    # float32 coefficients of a float64-dominated global segment overflowed (NaN, Inf)
    "mixed_dtypes_k_c_overflows_float32": (
        [torch.tensor([1e40, 0.0], **_F64), torch.tensor([1.0])],
        [torch.tensor([-1e-5, 1e-5], **_F64), torch.tensor([1e-30])], {"granularity": "global"}),
    # the float32 clip coefficient underflowed (clip / |r| < 1e-38)
    "k_a_below_float32_normals": ([torch.tensor([1e18, 0.0])], [torch.tensor([0.0, 1.0])], {"clip_norm": 1e-30}),
    "k_a_subnormal_in_float32": ([torch.tensor([0.6e14, 0.8e14])], [torch.tensor([0.8, -0.6])],
                                 {"clip_norm": 1e-30}),
}


@pytest.mark.parametrize("fused", [True, False, DTENSOR], ids=["fused", "loop", "dtensor"])
@pytest.mark.parametrize("name", sorted(_EXTREMES))
def test_extreme_but_finite_gradients_are_reconstructed_exactly_on_cpu(fused, name) -> None:
    a, c, kwargs = _EXTREMES[name]
    got = reconstruct(a, c, fused=fused, **kwargs)
    segments = [list(range(len(a)))] if kwargs.get("granularity") == "global" else [[i] for i in range(len(a))]
    for members in segments:
        want = _exact(torch.cat([a[i].double().reshape(-1) for i in members]),
                      torch.cat([(torch.zeros_like(a[i]) if c[i] is None else c[i]).double().reshape(-1)
                                 for i in members]), kwargs.get("clip_norm"))
        result = torch.cat([got[i].double().reshape(-1) for i in members]).numpy()
        assert np.isfinite(result).all()
        np.testing.assert_allclose(result, want, rtol=1e-6, atol=0)


def test_statistics_of_compile_are_those_of_the_compiled_path_and_change_nothing() -> None:
    """``statistics(fused="compile")`` describes the update that ``fused="compile"`` makes (no
    host reads: no rescue), not the CPU path's; under a forced compiled implementation too."""
    a, c = [torch.tensor([1e-6, 0.0])], [torch.tensor([-1e-30, 1e-30])]
    before = snapshot(a + c)
    stats = _functional.statistics(a, c, clip_norm=0.1, fused="compile")
    with _functional._use_implementation("device"):
        device = _functional.reconstruct_([x.clone() for x in a], c, clip_norm=0.1)
    with _functional._use_implementation("compiled"):
        forced = _functional.statistics(a, c, clip_norm=0.1)
    for s in (stats, forced):
        assert torch.equal(s.cosine, device.cosine) and torch.equal(s.out_of_range, device.out_of_range)
    assert_unchanged(before, a + c, "inputs")


def test_dtensor_under_a_forced_loop_still_reads_the_host() -> None:
    """DTensors always run the fused schedules; forcing "loop" must not silently drop the CPU
    path's rescue (it ran the device schedule)."""
    a, c = [torch.tensor([1e-6, 0.0])], [torch.tensor([-1e-30, 1e-30])]
    with _functional._use_implementation("loop"):
        (r,) = _functional.reconstruct(_to_dtensors(a), _to_dtensors(c))
    np.testing.assert_allclose(r.to_local().numpy(), [5e-7, 5e-7], rtol=1e-6)


def test_in_place_refuses_aliased_dtensors_and_float8_before_writing() -> None:
    (d,) = _to_dtensors([torch.randn(4)])
    with pytest.raises(ValueError, match="share memory"):
        _functional.reconstruct_([d, d], _to_dtensors([torch.randn(4), torch.randn(4)]))
    big, small = torch.randn(1 << 19), torch.randn(3).to(torch.float8_e4m3fn)
    before = big.clone()
    with pytest.raises(ValueError, match=r"adversarial\[1\] has dtype torch.float8_e4m3fn"):
        _functional.reconstruct_([big, small], [torch.randn(1 << 19), None])
    assert torch.equal(big, before)
