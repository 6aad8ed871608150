r"""The AGR rule on per-segment sums: the one place that holds the geometry and its zero policy.

Both implementations (the loop and the fused path) reduce every segment to three sums,
:math:`d = \langle a, c\rangle`, :math:`\lVert a\rVert^2`, :math:`\lVert c\rVert^2`, and then
ask this module for two coefficients per segment so that the reconstructed gradient is

.. math:: r = k_a\, a + k_c\, c .

The coefficients are degree-0 homogeneous in :math:`(a, c)`, so the sums may be taken of
``a / s`` and ``c / s`` for any common scale ``s > 0`` (the implementations do this to keep
squares of huge or tiny gradients inside the floating-point range); only the norms, and so
the clipping, need ``s`` back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._stats import ReconstructionStats


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for the element-wise sums: float32 at least ("sums in at least float32")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def narrowest_accumulation_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The accumulation dtype with the least range and precision among ``dtypes``' (float32
    unless all are float64): the one that sets the rounding and the range limits."""
    dtypes = list(dtypes)
    return torch.float64 if dtypes and all(d == torch.float64 for d in dtypes) else torch.float32


def combine_rounding(dtypes: Iterable[torch.dtype]) -> float:
    """Relative rounding of the combine ``k_a a + k_c c`` before its final rounding.

    bf16/fp16 gradients are combined in float32 and rounded once at the end, so their
    combine noise is float32's, not their own (which would over-clip by up to a few %); the
    largest over the tensors present (float32's unless all are float64).
    """
    return 2.0 * torch.finfo(narrowest_accumulation_dtype(dtypes)).eps


def coefficient_dtype(device: torch.device) -> torch.dtype:
    """Dtype for the [S]-sized coefficient maths: float64, except where a device lacks it.

    The tensors are tiny, and float64 keeps ``1 - cos`` and ``(1 - cos)(1 + cos)`` exact
    enough that the coefficients add no error of their own to float32 sums.
    """
    return torch.float32 if device.type == "mps" else torch.float64


#: A projected segment with :math:`\sin^2(a, c) = (1-\cos)(1+\cos)` below this is
#: ill-conditioned: :math:`\lVert r\rVert^2 = \lVert a\rVert^2 \sin^2` is then a small
#: difference of the three sums, and their rounding (relative :math:`\gamma`) moves it by up
#: to about :math:`4\gamma\lVert a\rVert^2`, i.e. :math:`4\gamma/\sin^2` relative.
ILL_CONDITIONED = 1.0 / 16.0


def sum_error(dtype: torch.dtype, numel: int) -> float:
    r"""Relative error allowance for a sum of ``numel`` products accumulated in ``dtype``.

    Rounding errors of a long float32 sum behave like a random walk, about
    :math:`\epsilon\sqrt{n}` relative; four times that is a wide margin in practice (the
    worst case, :math:`n\epsilon`, is never approached by blocked and pairwise sums).
    """
    return 4.0 * torch.finfo(accumulation_dtype(dtype)).eps * math.sqrt(max(numel, 1))


class TensorOps:
    """The element-wise operations of :func:`rule` on ``[S]`` tensors (no host reads)."""

    where = staticmethod(torch.where)
    sqrt = staticmethod(torch.sqrt)
    isnan = staticmethod(torch.isnan)
    clamp = staticmethod(torch.clamp)
    hypot = staticmethod(torch.hypot)
    abs = staticmethod(torch.abs)
    maximum = staticmethod(torch.maximum)

    @staticmethod
    def ones_like(x: Tensor) -> Tensor:
        return torch.ones_like(x)

    @staticmethod
    def rdiv(x: float | Tensor, y: Tensor) -> Tensor:
        """``x / y`` rounded once (``float / tensor`` in torch is ``reciprocal`` times ``x``)."""
        return (torch.full_like(y, x) if not isinstance(x, Tensor) else x) / y


class FloatOps:
    """The same operations on Python floats (IEEE float64, like the tensors' float64 maths).

    Where a CPU caller holds the sums as floats anyway, :func:`rule` costs microseconds per
    segment this way instead of a few dozen tensor dispatches. Both branches of ``where`` are
    evaluated, as with tensors, so every division in :func:`rule` is guarded: a float division
    by zero would raise.
    """

    @staticmethod
    def where(condition: bool, x: float, y: float) -> float:
        return x if condition else y

    @staticmethod
    def sqrt(x: float) -> float:
        return math.sqrt(x) if x >= 0.0 else math.nan  # torch.sqrt: NaN below 0, -0.0 kept

    isnan = staticmethod(math.isnan)
    hypot = staticmethod(math.hypot)
    abs = staticmethod(abs)
    maximum = staticmethod(max)

    @staticmethod
    def clamp(x: float, min: float | None = None, max: float | None = None) -> float:  # noqa: A002
        if math.isnan(x):
            return x
        if min is not None and x < min:
            x = min
        if max is not None and x > max:
            x = max
        return x

    @staticmethod
    def ones_like(x: float) -> float:
        return 1.0

    @staticmethod
    def rdiv(x: float, y: float) -> float:
        return x / y


class Rule(NamedTuple):
    """What :func:`rule` gives per segment (tensors or floats, as its inputs were)."""

    adversarial: Any  # k_a, clipping included
    clean: Any  # k_c, clipping included (can exceed the gradients' range: see clean_scaled)
    clean_scaled: Any  # k_c * scale_c: the coefficient of c / scale_c, finite for finite input
    cosine: Any
    projected: Any
    norm_adversarial: Any
    norm_clean: Any
    norm_reconstructed: Any
    clip_scale: Any


def ill_conditioned(cosine: Any, projected: Any) -> Any:
    """Projected segments whose closed-form norm is ill-conditioned (:data:`ILL_CONDITIONED`)."""
    return projected & ((1.0 - cosine) * (1.0 + cosine) < ILL_CONDITIONED)


def coefficients(
    dot: Tensor,
    sq_adversarial: Tensor,
    sq_clean: Tensor,
    *,
    scale_adversarial: Tensor | None = None,
    scale_clean: Tensor | None = None,
    clip_norm: float | None,
    rounding: float = 0.0,
    sum_error: float = 0.0,
) -> Rule:
    """:func:`rule` on ``[S]`` tensors, in :func:`coefficient_dtype` (no host reads)."""
    dtype = coefficient_dtype(dot.device)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return rule(cast(dot), cast(sq_adversarial), cast(sq_clean), scale_a=cast(scale_adversarial),
                scale_c=cast(scale_clean), clip_norm=clip_norm, rounding=rounding, sum_error=sum_error,
                ops=TensorOps)


def stats_of(r: Rule, out_of_range: Any) -> ReconstructionStats:
    """The :class:`~agr_optim.ReconstructionStats` of a tensor :class:`Rule` (fields by name)."""
    return ReconstructionStats(
        cosine=r.cosine,
        projected=r.projected,
        norm_adversarial=r.norm_adversarial,
        norm_clean=r.norm_clean,
        norm_reconstructed=r.norm_reconstructed,
        clip_scale=r.clip_scale,
        out_of_range=out_of_range,
    )


def rule(
    dot: Any,
    sq_a: Any,
    sq_c: Any,
    *,
    scale_a: Any = None,
    scale_c: Any = None,
    clip_norm: float | None,
    rounding: float = 0.0,
    sum_error: float = 0.0,
    exact_norm: Any = None,
    ops: Any = TensorOps,
) -> Rule:
    r"""Turn one segment's sums into the AGR coefficients :math:`(k_a, k_c)`, :math:`r = k_a a + k_c c`.

    The sums are those of :math:`\hat a = a / s_a` and :math:`\hat c = c / s_c`
    (``dot`` :math:`= \langle\hat a, \hat c\rangle`, ``sq_a`` :math:`= \lVert\hat a\rVert^2`,
    ``sq_c`` :math:`= \lVert\hat c\rVert^2`) for scales :math:`s_a, s_c > 0` (``None``: 1), so that
    callers can keep every square inside the floating-point range, however far apart the
    magnitudes of ``a`` and ``c`` are. With :math:`\cos = d / (\lVert a\rVert \lVert c\rVert)`
    (0 when either norm is 0):

    - :math:`\cos \le 0` (projection): :math:`k_a = 1`, :math:`k_c = -d/\lVert c\rVert^2`
      (:math:`k_c = 0` when :math:`c = 0`: projecting onto a zero vector changes nothing);
    - :math:`\cos > 0` (interpolation): :math:`k_a = 1 - \cos`, :math:`k_c = \cos`;
    - clipping multiplies both by :math:`\min(1, \text{clip\_norm}/\lVert r\rVert)`, with
      :math:`\lVert r\rVert = \lVert a\rVert \sqrt{(1-\cos)(1+\cos)}` when projecting and
      :math:`\sqrt{(1-\cos)^2\lVert a\rVert^2 + 2\cos^2(1-\cos)\lVert a\rVert\lVert c\rVert
      + \cos^2\lVert c\rVert^2}` when interpolating (no term can cancel another), both taken in
      units of :math:`m = \max(s_a, s_c)` so that no norm is squared outside the range.

    :math:`k_c` itself can leave the gradients' range when :math:`\lVert c\rVert \ll \lVert a\rVert`
    (its product with :math:`c` cannot: :math:`\lVert k_c c\rVert \le \lVert a\rVert`), so the rule
    also gives ``clean_scaled`` :math:`= k_c s_c`, the coefficient of :math:`\hat c`.

    The same operations run on ``[S]`` tensors (``ops=TensorOps``, no host reads) or on one
    segment's Python floats (``ops=FloatOps``), so both agree to float64 rounding.

    Args:
        rounding: relative rounding error of the combine ``k_a a + k_c c`` in the output dtype.
            The norm used for clipping never goes below that rounding noise, so that a result
            which is all rounding noise (``c = -k a`` exactly) is clipped too, not passed on.
        sum_error: relative error allowance :math:`\gamma` of the sums (:func:`sum_error`).
            In ill-conditioned projected segments (:data:`ILL_CONDITIONED`) the norm used for
            clipping is raised to :math:`\sqrt{\lVert r\rVert^2 + 4\gamma\lVert a\rVert^2}`,
            so the clipped result stays within ``clip_norm`` even where the closed form has
            lost its digits (it may then clip more than the exact rule would).
        exact_norm: :math:`\lVert r\rVert / \max(s_a, s_c)` measured on the explicit ``r`` of the
            segment (before clipping): the clipping then uses it instead of the closed form and
            its allowance.

    Non-finite sums propagate: a NaN or Inf gradient gives NaN coefficients, never finite ones.
    """
    norm_a, norm_c = ops.sqrt(sq_a), ops.sqrt(sq_c)
    denominator = norm_a * norm_c
    # The zero policy, in one place: a zero gradient has cosine 0, and a projection onto a
    # zero clean gradient is the identity. NaN keeps flowing: NaN > 0 is False, so a NaN norm
    # is put back explicitly (its tensor may have no clean partner, leaving `dot` finite).
    nonzero = denominator > 0
    cosine = ops.where(nonzero, dot / ops.where(nonzero, denominator, 1.0), 0.0)
    cosine = ops.where(ops.isnan(denominator), denominator, cosine)
    cosine = ops.where(ops.isnan(cosine), cosine, ops.clamp(cosine, -1.0, 1.0))
    projected = cosine <= 0
    clean_nonzero = sq_c > 0
    # -<a^, c^>/|c^|^2: the projection's coefficient of c^ in units of s_a.
    projection = ops.where(clean_nonzero, -dot / ops.where(clean_nonzero, sq_c, 1.0), 0.0)
    projection = ops.where(ops.isnan(dot), dot, projection)
    k_a = ops.where(projected, 1.0, 1.0 - cosine)
    one_minus = 1.0 - cosine
    if scale_a is None and scale_c is None:
        # Sums as they came, inside the range (callers rescue the others, _gramian.out_of_range):
        # the closed forms in the sums themselves, written so that no term cancels another (all
        # are >= 0, so no partial sum exceeds |r|^2 <= max(|a|, |c|)^2: nothing overflows).
        scale_a = scale_c = m = 1.0
        x, y = norm_a, norm_c
        k_c_scaled = ops.where(projected, projection, cosine)
        sq_r = ops.where(
            projected,
            sq_a * one_minus * (1.0 + cosine),
            one_minus * one_minus * sq_a + 2.0 * cosine * one_minus * dot + cosine * cosine * sq_c,
        )
        norm_r = ops.sqrt(ops.clamp(sq_r, min=0.0))
    else:
        scale_a = ops.ones_like(sq_a) if scale_a is None else scale_a
        scale_c = ops.ones_like(sq_a) if scale_c is None else scale_c
        k_c_scaled = ops.where(projected, projection * scale_a, cosine * scale_c)
        # Norms in units of m = max(s_a, s_c): x = |a|/m and y = |c|/m are at most ~sqrt(n), and
        # never squared (x can be far below 1 when |a| << |c|): projected, |r| = x sin;
        # interpolated, with p = (1-cos) x and q = cos y, |r|^2 = p^2 + 2 cos p q + q^2, taken
        # relative to h = max(p, q).
        m = ops.maximum(scale_a, scale_c)
        x, y = norm_a * (scale_a / m), norm_c * (scale_c / m)
        sine = ops.sqrt(ops.clamp(one_minus * (1.0 + cosine), min=0.0))
        p, q = one_minus * x, cosine * y
        h = ops.maximum(p, q)
        h_safe = ops.where(h > 0, h, 1.0)
        p_h, q_h = p / h_safe, q / h_safe
        interpolated = h * ops.sqrt(ops.clamp(p_h * p_h + 2.0 * cosine * p_h * q_h + q_h * q_h, min=0.0))
        interpolated = ops.where(ops.isnan(h), h, interpolated)
        norm_r = ops.where(projected, x * sine, interpolated)
    if exact_norm is not None:
        norm_r = exact_norm
    if clip_norm is None:
        clip_scale = ops.ones_like(norm_r)
    else:
        # |k_c c| / m: |cos| x when projecting (|k_c c| = |<a,c>|/|c|), cos y when interpolating.
        noise = rounding * (ops.abs(k_a) * x + ops.where(projected, ops.abs(cosine) * x, cosine * y))
        # An upper bound of |r| (sqrt(|r|^2 + doubt^2) by hypot, never squaring a norm), plus the
        # combine's rounding to first order: the rounded r is at most that long. (Added in
        # quadrature, the rounding let a nearly antiparallel projection exceed the clip by 1e-5.)
        if exact_norm is None:
            doubt = ops.where(ill_conditioned(cosine, projected), (2.0 * math.sqrt(sum_error)) * x, 0.0)
            bound = ops.hypot(norm_r, doubt) + noise
        else:
            bound = norm_r + noise
        clip_scale = clip_scale_of(bound, norm_r, clip_norm / m, ops)
    return Rule(
        adversarial=k_a * clip_scale,
        clean=(k_c_scaled / scale_c) * clip_scale,
        clean_scaled=k_c_scaled * clip_scale,
        cosine=cosine,
        projected=projected,
        norm_adversarial=norm_a * scale_a,
        norm_clean=norm_c * scale_c,
        norm_reconstructed=norm_r * m,
        clip_scale=clip_scale,
    )


def clip_scale_of(bound: Any, norm_r: Any, clip_norm: Any, ops: Any = TensorOps) -> Any:
    """``min(1, clip_norm / bound)``, 1 where ``bound`` is 0, NaN where ``norm_r`` is NaN (a
    NaN norm is never clipped to 1). ``bound`` and ``clip_norm`` in the same units."""
    scale = ops.where(bound > 0, ops.rdiv(clip_norm, ops.where(bound > 0, bound, 1.0)), 1.0)
    scale = ops.where(ops.isnan(scale), scale, ops.clamp(scale, max=1.0))
    return ops.where(ops.isnan(norm_r), norm_r, scale)


# --------------------------------------------------------------------------- packed, for accelerators
#: A projected segment is ill-conditioned (:data:`ILL_CONDITIONED`) where ``cos`` is below this.
_ILL_COSINE = -math.sqrt(1.0 - ILL_CONDITIONED)


def packed_doubt(gamma: float, rounding: float) -> float:
    r"""The allowance :math:`D^2` of :func:`packed_rule`, relative to :math:`\lVert a\rVert^2`.

    With the sums off by :math:`\gamma` relative (:func:`sum_error`), the closed-form
    :math:`\lVert r\rVert^2` of a projection is off by at most :math:`2\gamma\lVert a\rVert^2`,
    and the combine adds at most ``2 rounding`` :math:`\lVert a\rVert`:
    :math:`D = 2\sqrt{\gamma} + 2\,\text{rounding}` covers both.
    """
    return (2.0 * math.sqrt(gamma) + 2.0 * rounding) ** 2


class _PackedConstants(NamedTuple):
    zero: Tensor
    bounds: Tensor  # bucketize boundaries of the smaller norm: 0 | below the floor | fine | not finite
    out_of_range: Tensor  # the bands that are out of range
    low: Tensor  # clamp bounds of (cos, <a,c>/|c|^2) -> (relu(cos), min(0, <a,c>/|c|^2))
    high: Tensor
    base: Tensor  # k = base + (relu(cos), min(0, ...)) @ mix = (1 - relu(cos), relu(cos) - min(0, ...))
    mix: Tensor


_CONSTANTS: dict[tuple[torch.dtype, torch.device, float], _PackedConstants] = {}


def _packed_constants(dtype: torch.dtype, device: torch.device, floor: float) -> _PackedConstants:
    """The rule's small constant tensors, made once per dtype, device and floor (a host-to-device
    copy at the first step only)."""
    key = (dtype, device, floor)
    found = None if torch.compiler.is_compiling() else _CONSTANTS.get(key)  # traced: graph constants
    if found is None:
        info = torch.finfo(dtype)
        make = lambda values: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        found = _PackedConstants(
            zero=make(0.0),
            bounds=make([info.tiny * info.eps, floor, math.inf]),  # the smallest subnormal, the floor
            out_of_range=torch.tensor([1, 3], device=device),
            low=make([0.0, -math.inf]),
            high=make([1.0, 0.0]),
            base=make([1.0, 0.0]),
            mix=make([[-1.0, 1.0], [0.0, -1.0]]),
        )
        if not torch.compiler.is_compiling():
            _CONSTANTS[key] = found
    return found


def packed_rule(
    gram: Tensor, *, clip_norm: float | None, floor: float, doubt: float, rounding: float = 0.0, probe: float = 0.0
) -> tuple[Tensor, ReconstructionStats]:
    r""":func:`rule` on all segments at once, in a fixed handful of tensor operations.

    ``gram`` is ``[S, 4]`` (float64): per segment the Gramian :math:`G` of :math:`(a, c)` row by row,
    :math:`\lVert a\rVert^2, \langle a,c\rangle, \langle a,c\rangle, \lVert c\rVert^2`, so that
    :math:`\lVert k_a a + k_c c\rVert^2 = k G k^\top` for :math:`k = (k_a, k_c)`. Returns the
    clipped coefficients ``[S, 2]`` and the statistics, without reading anything back to the host.

    The same rule as :func:`rule`, written for the accelerator's schedule (every operation is a
    kernel launch, so fewer is faster): with :math:`u = \operatorname{relu}(\cos)` and
    :math:`p = \min(0, \langle a,c\rangle / \lVert c\rVert^2)`, :math:`k = (1 - u, u - p)` is the
    interpolation where :math:`\cos > 0` and the projection where :math:`\cos \le 0` (the signs of
    :math:`\cos` and :math:`p` are those of :math:`\langle a,c\rangle`); a zero norm gives
    :math:`k = (1, 0)`, the zero policy. :math:`\lVert r\rVert^2 = k G k^\top`, and clipping
    divides by :math:`\sqrt{\lVert r\rVert^2 + D^2\lVert a\rVert^2}` where the projection is
    ill-conditioned (:data:`ILL_CONDITIONED`: the closed form loses its digits where :math:`a` and
    :math:`c` are nearly antiparallel; ``doubt`` is :math:`D^2`, :func:`packed_doubt`), by
    :math:`\lVert r\rVert` elsewhere; every projected segment also allows for the combine's
    ``rounding`` (:math:`8\,\text{rounding}\,\lVert a\rVert^2` inside the root: a first-order
    bound of the rounding's :math:`2\,\text{rounding}\,\lVert a\rVert`). A segment with
    :math:`\lVert a\rVert` or :math:`\lVert c\rVert` below ``floor`` (squares that may be
    subnormal; ``probe`` > 0 also catches a square that underflowed to zero next to a non-zero
    :math:`\langle a,c\rangle`) counts its clean gradient as zero; non-finite sums give NaN
    coefficients. Both are ``out_of_range`` in the statistics.
    """
    c = _packed_constants(gram.dtype, gram.device, floor)
    norms = gram[:, 0::3].sqrt()  # |a|, |c|
    # NaN where a sum is not finite (a non-finite gradient, squares or products a_i c_i that
    # overflowed): never a finite k.
    norms.addcmul_(gram.sum(1, keepdim=True), c.zero)
    # The band of min(|a|, |c|) (NaN: 3). A zero square next to a non-zero <a,c> underflowed:
    # probe * <a,c>^2 (far below the floor, above 0 for any non-zero <a,c>) moves it to "below".
    low = norms.amin(1, keepdim=True).addcmul_(gram[:, 1:2], gram[:, 1:2], value=probe)
    band = torch.bucketize(low, c.bounds, right=True)
    den = norms * norms[:, 1:]  # |a||c|, |c|^2
    # cos and <a,c>/|c|^2; a zero norm, or one below the floor, gives 0 for both (the zero policy).
    ratio = (gram[:, 1:2] / den).masked_fill_(band <= 1, 0.0)
    cosine = ratio[:, 0].clamp(-1.0, 1.0)
    k = torch.addmm(c.base, ratio.clamp(c.low, c.high), c.mix)
    sq_r = torch.bmm(k[:, None], torch.bmm(gram.view(-1, 2, 2), k[:, :, None])).view(-1)
    projected = cosine <= 0
    if clip_norm is None:
        scale = torch.ones_like(sq_r)
    else:
        bound = torch.addcmul(sq_r, gram[:, 0], cosine < _ILL_COSINE, value=doubt)
        # The combine's rounding, at most 2 rounding |a| for a projection: an upper bound of |r|
        # plus that, to first order (|r| <= |a|: sqrt(|r|^2 + 8 rounding |a|^2) >= |r| + 2 rounding |a|).
        bound.addcmul_(gram[:, 0], projected, value=8.0 * rounding)
        scale = bound.rsqrt_().mul_(clip_norm).clamp_max_(1.0)  # min(1, clip / bound); clip never squared
        k.mul_(scale[:, None])
    return k, ReconstructionStats(
        cosine=cosine,
        projected=projected,
        norm_adversarial=norms[:, 0],
        norm_clean=norms[:, 1],
        norm_reconstructed=sq_r.clamp_min(0.0).sqrt(),
        clip_scale=scale,
        out_of_range=torch.isin(band.view(-1), c.out_of_range),
    )
