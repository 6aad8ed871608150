"""The AGR maths in float64 numpy, written independently of the library, and invariant assertions.

Nothing here imports ``agr_optim``: the reference is the paper's rule stated once more, so a bug
in the library's geometry cannot hide in its own test.

Tolerances come from :func:`rounding_bound`: a segment of ``n`` elements reduced in the
accumulation dtype (float32, or float64 for float64 gradients) has sums with relative error at
most ``n * u_acc`` (``u`` = unit roundoff = eps / 2), and the result is rounded once more to the
output dtype (``u_out``). The constant 4 covers the few operations on top of each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


# --------------------------------------------------------------------------- the reference
@dataclass
class SegmentRef:
    """The exact (float64) AGR quantities of one segment."""

    dot: float
    norm_a: float
    norm_c: float
    cosine: float
    projected: bool
    norm_r: float  # before clipping
    clip_scale: float


def to_numpy(t: Tensor | None, like: Tensor) -> np.ndarray:
    """float64 copy of a tensor (``None``: zeros shaped like ``like``)."""
    if t is None:
        return np.zeros(tuple(like.shape), dtype=np.float64)
    return t.detach().to("cpu", torch.float64).numpy().copy()


def reference_segment(
    a: Sequence[np.ndarray], c: Sequence[np.ndarray], clip_norm: float | None
) -> tuple[list[np.ndarray], SegmentRef]:
    """AGR on one segment (a list of arrays treated as one vector), in float64.

    The tests keep magnitudes within 1e-35..1e35, so float64 squares neither over- nor
    underflow and no rescaling is needed here.
    """
    a_flat = np.concatenate([x.ravel() for x in a]) if a else np.zeros(0)
    c_flat = np.concatenate([x.ravel() for x in c]) if c else np.zeros(0)
    dot = float(a_flat @ c_flat)
    norm_a, norm_c = math.sqrt(float(a_flat @ a_flat)), math.sqrt(float(c_flat @ c_flat))
    cosine = dot / (norm_a * norm_c) if norm_a * norm_c > 0 else 0.0
    cosine = min(1.0, max(-1.0, cosine))
    projected = cosine <= 0
    if projected:  # Gradient Orthogonal Projection; onto a zero vector it changes nothing
        k_a, k_c = 1.0, (-dot / norm_c**2 if norm_c > 0 else 0.0)
    else:  # interpolation
        k_a, k_c = 1.0 - cosine, cosine
    r_flat = k_a * a_flat + k_c * c_flat
    norm_r = math.sqrt(float(r_flat @ r_flat))
    clip = 1.0 if clip_norm is None or norm_r == 0 else min(1.0, clip_norm / norm_r)
    r = [(k_a * x + k_c * y) * clip for x, y in zip(a, c, strict=True)]
    return r, SegmentRef(dot, norm_a, norm_c, cosine, projected, norm_r, clip)


def reference_agr(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    clip_norm: float | None,
    segments: Sequence[int],
) -> tuple[list[np.ndarray], list[SegmentRef]]:
    """AGR over tensors grouped into segments (``segments[i]`` = segment of tensor ``i``)."""
    a = [to_numpy(x, x) for x in adversarial]
    c = [to_numpy(y, x) for x, y in zip(adversarial, clean, strict=True)]
    out: list[np.ndarray] = [np.zeros(0)] * len(a)
    refs: list[SegmentRef] = []
    for segment in sorted(set(segments)):
        members = [i for i, s in enumerate(segments) if s == segment]
        r, ref = reference_segment([a[i] for i in members], [c[i] for i in members], clip_norm)
        for i, ri in zip(members, r, strict=True):
            out[i] = ri
        refs.append(ref)
    return out, refs


def segment_ids(granularity: str, n: int) -> list[int]:
    return [0] * n if granularity == "global" else list(range(n))


# --------------------------------------------------------------------------- tolerances
def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The issue's contract: sums in at least float32, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_bound(dtypes: Sequence[torch.dtype], n: int) -> float:
    """Relative error bound (vs. ``|a| + |c|``) of an AGR result over ``n`` elements."""
    u_acc = max(unit_roundoff(accumulation_dtype(d)) for d in dtypes)
    u_out = max(unit_roundoff(d) for d in dtypes)
    return 4.0 * max(n, 1) * u_acc + 4.0 * u_out


def condition(ref: SegmentRef, delta: float) -> float:
    r"""``kappa``: how much a relative error ``delta`` in the sums is amplified in ``r / |r|``.

    Projection: the errors are relative to ``|a|`` (``|k_c c| <= |a|``) and ``|r| = |a| sin``,
    so ``kappa = 1/sin``. Interpolation (or a cosine within rounding of 0, where either
    branch may be taken): the cosine's error multiplies ``c`` too, ``kappa = (|a|+|c|)/|r|``.
    """
    scale = ref.norm_a if ref.cosine < -2 * delta else ref.norm_a + ref.norm_c
    if ref.norm_r == 0:
        return math.inf
    return scale / ref.norm_r


def result_tolerance(ref: SegmentRef, clip_norm: float | None, delta: float) -> float:
    """Bound on ``|r - r_ref|`` for one segment (Euclidean norm).

    Unclipped: ``delta * (|a| + |c|)`` (forward error of the sums and of the combine).

    Clipped: ``r`` is rescaled to ``clip_norm``, so a relative error in its direction
    (``delta * kappa``) and one in its norm show up multiplied by ``clip_norm``. The fused path
    takes ``|r|`` in closed form; when projecting, ``|r|^2 = |a|^2 (1 - cos)(1 + cos)`` and
    ``1 + cos`` carries an absolute error ``delta``, so for ``a`` nearly antiparallel to ``c``
    the norm's relative error is ``delta / sin^2 = delta * kappa^2``: ill-conditioned, and only
    there. The bound never exceeds ``2 * clip_norm`` (both results have at most that norm), which
    is all that can be said of an exactly antiparallel pair (``kappa = inf``). A segment whose
    ``|r|`` is certainly below ``clip_norm`` (even with the fused path's rounding-noise floor)
    keeps the unclipped bound.
    """
    scale = ref.norm_a + ref.norm_c
    unclipped = delta * scale
    if clip_norm is None:
        return unclipped
    # How far above |r| the library's |r| (or its noise-floored |r|) may be.
    if ref.norm_r > 0:
        norm_error = min(2 * delta * scale * scale / ref.norm_r, math.sqrt(2 * delta) * scale)
    else:
        norm_error = math.sqrt(2 * delta) * scale
    if ref.norm_r + norm_error + 8 * delta * scale < clip_norm:
        return unclipped
    kappa = condition(ref, delta)
    clipped = clip_norm * delta * (4.0 + 4.0 * kappa + 4.0 * kappa * kappa)
    return unclipped * ref.clip_scale + min(2.0 * clip_norm * (1 + delta), clipped)


# --------------------------------------------------------------------------- assertions
def _norm(x: np.ndarray) -> float:
    return math.sqrt(float(x @ x))


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y)


def flat(xs: Sequence[np.ndarray | Tensor | None], like: Sequence[Tensor] | None = None) -> np.ndarray:
    parts = []
    for i, x in enumerate(xs):
        if x is None:
            assert like is not None
            x = np.zeros(tuple(like[i].shape))
        elif isinstance(x, Tensor):
            x = to_numpy(x, x)
        parts.append(np.asarray(x, dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def assert_close_to_reference(r: np.ndarray, r_ref: np.ndarray, tol: float, what: str = "") -> None:
    err = _norm(r - r_ref)
    assert err <= tol, f"{what}|r - r_ref| = {err:.3e} > tolerance {tol:.3e} (|r_ref| = {_norm(r_ref):.3e})"


def assert_orthogonal_to_clean(r: np.ndarray, c: np.ndarray, a: np.ndarray, delta: float) -> None:
    """``<r, c>`` vanishes relative to ``|a| |c|`` (the scale of the cancelled term)."""
    bound = 2 * delta * _norm(a) * _norm(c)
    d = _dot(r, c)
    assert abs(d) <= bound, f"<r, c> = {d:.3e}, expected |<r, c>| <= {bound:.3e} (projection)"


def assert_norm_at_most(r: np.ndarray, limit: float, delta: float, what: str) -> None:
    n = _norm(r)
    assert n <= limit * (1 + delta), f"|r| = {n:.6e} > {what} = {limit:.6e} (relative tolerance {delta:.1e})"


def assert_within_clip(r: np.ndarray, clip_norm: float, delta: float) -> None:
    assert_norm_at_most(r, clip_norm, delta, "clip_norm")


def assert_between(r: np.ndarray, a: np.ndarray, c: np.ndarray, delta: float) -> None:
    """``r = a + t (c - a)`` with ``0 <= t <= 1``: ``r`` lies on the segment from ``a`` to ``c``."""
    scale = _norm(a) + _norm(c)
    ca = c - a
    gap = _norm(ca)
    if gap <= 8 * delta * scale:  # a == c up to rounding: r near the (short) segment itself
        t = min(max(_dot(r - a, ca) / (gap * gap), 0.0), 1.0) if gap > 0 else 0.0
        distance = _norm(r - a - t * ca)
        assert distance <= 4 * delta * scale, f"r is {distance:.3e} from the segment [a, c] with a == c"
        return
    t = _dot(r - a, ca) / (gap * gap)
    residual = _norm(r - a - t * ca)
    slack = 4 * delta * scale / gap
    assert -slack <= t <= 1 + slack, f"r = a + t (c - a) with t = {t} outside [0, 1] (slack {slack:.1e})"
    assert residual <= 4 * delta * scale, f"r is {residual:.3e} off the line through a and c"


def assert_finite(ts: Sequence[Tensor], what: str = "result") -> None:
    for i, t in enumerate(ts):
        assert bool(torch.isfinite(t).all()), f"{what}[{i}] has non-finite values from finite input: {t}"


def assert_same_layout(result: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    assert len(result) == len(inputs)
    for i, (r, x) in enumerate(zip(result, inputs, strict=True)):
        assert r.shape == x.shape, f"result[{i}] has shape {tuple(r.shape)}, input {tuple(x.shape)}"
        assert r.dtype == x.dtype, f"result[{i}] has dtype {r.dtype}, input {x.dtype}"
        assert r.device == x.device


def snapshot(ts: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [None if t is None else t.detach().clone() for t in ts]


def assert_unchanged(before: Sequence[Tensor | None], after: Sequence[Tensor | None], what: str) -> None:
    """Bitwise equality (NaN equals NaN), ``None`` stays ``None``."""
    assert len(before) == len(after), f"{what}: length changed"
    for i, (b, x) in enumerate(zip(before, after, strict=True)):
        if b is None or x is None:
            assert b is None and x is None, f"{what}[{i}] changed from {b} to {x}"
            continue
        assert b.shape == x.shape and b.dtype == x.dtype, f"{what}[{i}] changed layout"
        assert torch.equal(b.nan_to_num(), x.nan_to_num()) and torch.equal(b.isnan(), x.isnan()), (
            f"{what}[{i}] changed"
        )


def check_stats(stats, refs: list[SegmentRef], clip_norm: float | None, delta: float) -> None:
    """The per-segment statistics against the reference, each with its own conditioning."""
    for name in ("cosine", "projected", "norm_adversarial", "norm_clean", "norm_reconstructed", "clip_scale"):
        value = getattr(stats, name)
        assert isinstance(value, torch.Tensor) and value.shape == (len(refs),), name
    for s, ref in enumerate(refs):
        cosine = stats.cosine[s].item()
        assert abs(cosine - ref.cosine) <= 2 * delta, f"segment {s}: cosine {cosine} vs {ref.cosine}"
        if abs(ref.cosine) > 2 * delta or ref.dot == 0:
            assert bool(stats.projected[s]) == ref.projected, f"segment {s}: projected"
        assert math.isclose(stats.norm_adversarial[s].item(), ref.norm_a, rel_tol=delta, abs_tol=0.0)
        assert math.isclose(stats.norm_clean[s].item(), ref.norm_c, rel_tol=delta, abs_tol=0.0)
        # |r| before clipping: relative error delta * (kappa + kappa^2) (closed form, see above).
        scale = ref.norm_a + ref.norm_c
        norm_tol = 4 * delta * scale + (min(scale, 4 * delta * scale * scale / ref.norm_r) if ref.norm_r else 2 * scale)
        norm_r = stats.norm_reconstructed[s].item()
        assert abs(norm_r - ref.norm_r) <= norm_tol, f"segment {s}: |r| {norm_r} vs {ref.norm_r} (tol {norm_tol})"
        clip = stats.clip_scale[s].item()
        assert 0 < clip <= 1
        if clip_norm is None:
            assert clip == 1.0
        elif ref.norm_r > 0 and norm_tol < 0.5 * ref.norm_r:
            expected = min(1.0, clip_norm / ref.norm_r)
            rel = 2 * norm_tol / ref.norm_r + 4 * delta
            assert abs(clip - expected) <= rel * expected, f"segment {s}: clip scale {clip} vs {expected}"
