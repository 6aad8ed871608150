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


class Coefficients(NamedTuple):
    adversarial: Tensor  # k_a, shape [S], clipping included
    clean: Tensor  # k_c, shape [S], clipping included
    stats: ReconstructionStats


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for the element-wise sums: float32 at least ("sums in at least float32")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def widest_accumulation_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """Accumulation dtype for the loop's sums and explicit combine over tensors of several
    dtypes: float64 if any is float64, so a float64 tensor is never rounded through float32."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


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
    ones_like = staticmethod(torch.ones_like)

    hypot = staticmethod(torch.hypot)

    @staticmethod
    def rdiv(x: float, y: Tensor) -> Tensor:
        """``x / y`` rounded once (``float / tensor`` in torch is ``reciprocal`` times ``x``)."""
        return torch.full_like(y, x) / y


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
    clean: Any  # k_c, clipping included
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
    scale: Tensor | None = None,
    clip_norm: float | None,
    rounding: float = 0.0,
    sum_error: float = 0.0,
) -> Coefficients:
    r"""Turn per-segment sums into the AGR coefficients :math:`(k_a, k_c)`.

    With :math:`\cos = d / (\lVert a\rVert \lVert c\rVert)` (0 when either norm is 0):

    - :math:`\cos \le 0` (projection): :math:`k_a = 1`, :math:`k_c = -d/\lVert c\rVert^2`
      (:math:`k_c = 0` when :math:`c = 0`: projecting onto a zero vector changes nothing);
    - :math:`\cos > 0` (interpolation): :math:`k_a = 1 - \cos`, :math:`k_c = \cos`;
    - clipping multiplies both by :math:`\min(1, \text{clip\_norm}/\lVert r\rVert)`, with
      :math:`\lVert r\rVert^2 = \lVert a\rVert^2 (1-\cos)(1+\cos)` when projecting and
      :math:`(1-\cos)^2\lVert a\rVert^2 + 2\cos(1-\cos)\,d + \cos^2\lVert c\rVert^2` when
      interpolating (both written so that no term can cancel another).

    Args:
        dot, sq_adversarial, sq_clean: ``[S]`` sums of ``a/s * c/s``, ``(a/s)^2``, ``(c/s)^2``.
        scale: ``[S]`` common scale ``s`` of each segment (``None``: 1).
        clip_norm: the clipping threshold, or ``None``.
        rounding: relative rounding error of the combine ``k_a a + k_c c`` in the output dtype.
            The norm used for clipping never goes below that rounding noise, so that a result
            which is all rounding noise (``c = -k a`` exactly) is clipped too, not passed on.
        sum_error: relative error allowance :math:`\gamma` of the sums (:func:`sum_error`).
            In ill-conditioned projected segments (:data:`ILL_CONDITIONED`) the norm used for
            clipping is raised to :math:`\sqrt{\lVert r\rVert^2 + 4\gamma\lVert a\rVert^2}`,
            so the clipped result stays within ``clip_norm`` even where the closed form has
            lost its digits (it may then clip more than the exact rule would). Callers that can
            afford a host read redo those segments' clipping exactly instead (the fused path
            on CPU does: :func:`rule` with ``exact_norm``).

    Non-finite sums propagate: a NaN or Inf gradient gives NaN coefficients, never finite ones.
    The rule itself is :func:`rule`; this is its tensor form.
    """
    dtype = coefficient_dtype(dot.device)
    dot, sq_a, sq_c = dot.to(dtype), sq_adversarial.to(dtype), sq_clean.to(dtype)
    scale = None if scale is None else scale.to(dtype)
    r = rule(dot, sq_a, sq_c, scale=scale, clip_norm=clip_norm, rounding=rounding, sum_error=sum_error,
             ops=TensorOps)
    stats = ReconstructionStats(
        cosine=r.cosine,
        projected=r.projected,
        norm_adversarial=r.norm_adversarial,
        norm_clean=r.norm_clean,
        norm_reconstructed=r.norm_reconstructed,
        clip_scale=r.clip_scale,
    )
    return Coefficients(r.adversarial, r.clean, stats)


def rule(
    dot: Any,
    sq_a: Any,
    sq_c: Any,
    *,
    scale: Any = None,
    clip_norm: float | None,
    rounding: float = 0.0,
    sum_error: float = 0.0,
    exact_norm: Any = None,
    ops: type = TensorOps,
) -> Rule:
    r"""The AGR rule of :func:`coefficients`, on ``[S]`` tensors (``ops=TensorOps``) or on one
    segment's Python floats (``ops=FloatOps``): the same operations in the same order, so
    float64 tensors and floats agree to float64 rounding (an ulp where torch's ``sqrt``
    rounds otherwise than ``math.sqrt``).

    ``exact_norm``, when given, is :math:`\lVert r\rVert` measured on the explicit ``r`` of
    an ill-conditioned segment (before clipping, ``scale`` included): the clipping then uses it instead
    of the closed form, without the ``sum_error`` allowance.
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
    projection = ops.where(clean_nonzero, -dot / ops.where(clean_nonzero, sq_c, 1.0), 0.0)
    projection = ops.where(ops.isnan(dot), dot, projection)
    k_a = ops.where(projected, 1.0, 1.0 - cosine)
    k_c = ops.where(projected, projection, cosine)

    one_minus = 1.0 - cosine
    sq_r = ops.clamp(
        ops.where(
            projected,
            sq_a * one_minus * (1.0 + cosine),
            one_minus * one_minus * sq_a + 2.0 * cosine * one_minus * dot + cosine * cosine * sq_c,
        ),
        min=0.0,
    )
    norm_r = ops.sqrt(sq_r)
    if scale is not None:
        norm_a, norm_c, norm_r = norm_a * scale, norm_c * scale, norm_r * scale
    if exact_norm is not None:
        norm_r = exact_norm
    if clip_norm is None:
        clip_scale = ops.ones_like(norm_r)
    else:
        noise = rounding * (abs(k_a) * norm_a + abs(k_c) * norm_c)
        # sqrt(|r|^2 + doubt^2 + noise^2) by hypot, never squaring a norm: the squares of
        # float64 norms above about 1e154 would overflow and clip the segment to zero.
        if exact_norm is None:
            doubt = ops.where(ill_conditioned(cosine, projected), (2.0 * math.sqrt(sum_error)) * norm_a, 0.0)
            bound = ops.hypot(ops.hypot(norm_r, doubt), noise)
        else:
            bound = ops.hypot(norm_r, noise)
        clip_scale = clip_scale_of(bound, norm_r, clip_norm, ops)
    return Rule(k_a * clip_scale, k_c * clip_scale, cosine, projected, norm_a, norm_c, norm_r, clip_scale)


def clip_scale_of(bound: Any, norm_r: Any, clip_norm: float, ops: type = TensorOps) -> Any:
    """``min(1, clip_norm / bound)``, 1 where ``bound`` is 0, NaN where ``norm_r`` is NaN (a
    NaN norm is never clipped to 1). The loop calls it with ``bound = norm_r``, its exact norm."""
    scale = ops.where(bound > 0, ops.rdiv(clip_norm, ops.where(bound > 0, bound, 1.0)), 1.0)
    scale = ops.where(ops.isnan(scale), scale, ops.clamp(scale, max=1.0))
    return ops.where(ops.isnan(norm_r), norm_r, scale)
