r"""Per-segment sums: the 2x2 Gramian :math:`\begin{pmatrix}\lVert a\rVert^2 & \langle a,c\rangle\\
\langle a,c\rangle & \lVert c\rVert^2\end{pmatrix}` of every segment, the one input of the rule.

Every schedule (CPU blocks, accelerators, DTensor shards) takes its sums here:

- :func:`tensor_sums`: three ``torch.dot`` per tensor, back to back (the second and third find
  the tensor in the cache), in float32 at least;
- :func:`out_of_range`: whether a segment's sums may be inexact (squares outside the accurate
  range of the accumulation dtype), decided on the segment's totals;
- :func:`scaled_sums`: a segment's sums redone exactly: of :math:`a / s_a` and :math:`c / s_c`,
  with :math:`s_a, s_c` powers of two near the largest magnitudes, accumulated in float64.

A :class:`Reduction` says how the per-tensor sums become segment totals: :class:`LocalReduction`
for ordinary tensors; the DTensor one (``_distributed.py``) adds one ``all_reduce``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ._geometry import accumulation_dtype

LOW_PRECISION = (torch.float16, torch.bfloat16)


def flat_pair(a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """1-D views of ``a`` and ``c`` in ``a``'s memory order, elements paired.

    Contiguous and channels-last gradients flatten without a copy; any other layout is
    copied by ``reshape`` (correct, only slower).
    """
    if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
        a = a.permute(0, 2, 3, 1)
        c = None if c is None else c.permute(0, 2, 3, 1)
    return a.reshape(-1), (None if c is None else c.reshape(-1))


def tensor_sums(adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]) -> list[Tensor]:
    """0-dim ``|a_i|^2``, ``<a_i,c_i>``, ``|c_i|^2`` for every tensor, in that order (``3 T``)."""
    sums: list[Tensor] = []
    zero = None
    for a, c in zip(adversarial, clean, strict=True):
        if a.dtype in LOW_PRECISION:
            # Sums of bf16/fp16 in float32: a bf16 accumulator loses the sign of small cosines.
            # Converted one tensor at a time, so at most one float32 copy is alive.
            a, c = a.float(), (None if c is None else c.float())
        if a.dim() != 1:
            a, c = flat_pair(a, c)
        # The three dots back to back: the second and third read a and c from the cache.
        sums.append(torch.dot(a, a))
        if c is None:
            if zero is None:
                zero = torch.zeros((), dtype=a.dtype, device=a.device)
            sums += (zero, zero)
        else:
            sums += (torch.dot(a, c), torch.dot(c, c))
    return sums


def range_floor(dtype: torch.dtype) -> float:
    """Smallest norm whose square the accumulation dtype of ``dtype`` still sums accurately.

    Below about ``sqrt(tiny) * 2^24`` the squares of the elements fall among the subnormals and
    the sums lose digits; above the range an overflow shows up as Inf.
    """
    return (torch.finfo(accumulation_dtype(dtype)).tiny ** 0.5) * 2.0**24


def out_of_range(dot: Any, sq_a: Any, sq_c: Any, floor: float) -> Any:
    """Whether a segment's totals may be inexact: non-finite, or squares (or their product)
    below ``floor**2``; on floats or on ``[S]`` tensors (no host read). A zero square is not
    suspect here: an all-zero gradient is exact (see :func:`underflowed_to_zero`)."""
    low = floor * floor
    # A non-zero <a,c> next to a zero |a|^2 or |c|^2: that square underflowed.
    if isinstance(dot, Tensor):
        finite = torch.isfinite(dot) & torch.isfinite(sq_a) & torch.isfinite(sq_c)
        small = lambda x, limit: (x > 0) & (x < limit)  # noqa: E731
        underflowed = (dot != 0) & ((sq_a == 0) | (sq_c == 0))
        return ~finite | small(sq_a, low) | small(sq_c, low) | small(sq_a * sq_c, low * low) | underflowed
    if not (math.isfinite(dot) and math.isfinite(sq_a) and math.isfinite(sq_c)):
        return True
    underflowed = dot != 0.0 and (sq_a == 0.0 or sq_c == 0.0)
    return 0.0 < sq_a < low or 0.0 < sq_c < low or 0.0 < sq_a * sq_c < low * low or underflowed


def power_of_two_at_least(x: Tensor) -> Tensor:
    """The smallest power of two >= ``x`` (> 0 and finite), 1 elsewhere: dividing by it is exact.

    Capped at the largest finite power of two (``x / scale`` is then at most 2, not 0 or inf)."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    # frexp's exponent e means 2^(e-1) <= x < 2^e; the largest finite power of two is
    # 2^(e_max - 1) with e_max the exponent of the largest finite value (1023 for float64).
    top = math.frexp(torch.finfo(x.dtype).max)[1] - 1
    scale = torch.ldexp(torch.ones_like(x), torch.clamp(exponent, max=top))
    return torch.where(torch.isfinite(x) & (x > 0), scale, torch.ones_like(x))


class Reduction(Protocol):
    """How per-tensor values become segment values (locally, or over a device mesh)."""

    def segment_sums(self, per_tensor: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        """``[S, k]`` sums over each segment's tensors of ``per_tensor`` (``[T, k]``)."""
        ...

    def segment_max(self, per_tensor: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        """``[S]`` maxima over each segment's tensors of ``per_tensor`` (``[T]``)."""
        ...


class LocalReduction:
    """Segments of ordinary tensors: everything is on this process."""

    distributed = False

    def segment_sums(self, per_tensor: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        out = torch.zeros(num_segments, *per_tensor.shape[1:], dtype=per_tensor.dtype, device=per_tensor.device)
        return out.index_add_(0, ids, per_tensor)

    def segment_max(self, per_tensor: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        out = torch.zeros(num_segments, dtype=per_tensor.dtype, device=per_tensor.device)
        return out.scatter_reduce_(0, ids, per_tensor, reduce="amax")


LOCAL = LocalReduction()


def underflowed_to_zero(
    suspect: list[bool],
    totals: list[list[float]],
    members: list[list[int]],
    adv: Sequence[Tensor],
    cln: Sequence[Tensor | None],
    reduction: Reduction,
) -> None:
    """Mark segments whose zero sum of squares comes from a non-zero gradient (its squares
    underflowed); an all-zero gradient is exact. Reads only the tensors of zero-square segments."""
    zero = [i for i, (sq_a, _, sq_c) in enumerate(totals) if not suspect[i] and (sq_a == 0.0 or sq_c == 0.0)]
    if not zero:
        return
    flags = []
    for i in zero:
        tensors: list[Tensor] = [adv[m] for m in members[i]] if totals[i][0] == 0.0 else []
        tensors += [c for m in members[i] if (c := cln[m]) is not None] if totals[i][2] == 0.0 else []
        flags.append(any(bool(t.any()) for t in tensors))
    if getattr(reduction, "distributed", False):  # the same decision on every rank
        device = adv[0].device
        local = torch.tensor(flags, dtype=torch.float64, device=device)
        reduced = reduction.segment_max(local, torch.arange(len(zero), device=device), len(zero))
        flags = [f > 0 for f in reduced.tolist()]
    for i, flag in zip(zero, flags, strict=True):
        suspect[i] = bool(flag)


def scaled_sums(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    reduction: Reduction = LOCAL,
    weights: Sequence[float] | None = None,
) -> tuple[float, float, float, float, float]:
    r"""One segment's ``<a^,c^>``, ``|a^|^2``, ``|c^|^2``, ``s_a``, ``s_c``, exactly, as floats.

    :math:`\hat a = a / s_a` and :math:`\hat c = c / s_c`, where :math:`s_a` (:math:`s_c`) is the
    power of two at or above the largest magnitude of ``a`` (``c``) over the segment (over all
    ranks, through ``reduction``): no square can overflow, the largest squares are of order one,
    and squares of entries far below the largest still fit, since the sums are taken in float64
    (float32 gradients' squares are then exact). A non-finite gradient gives a scale of 1, so
    its sums stay non-finite instead of being divided away. ``weights`` scales each tensor's
    contribution (DTensor replicas counted once). A host read: callers are CPU schedules.
    """
    acc = torch.float64
    device = adversarial[0].device
    ids = torch.zeros(len(adversarial), dtype=torch.long, device=device)

    def largest(tensors: Sequence[Tensor | None]) -> Tensor:
        amax = torch.stack([
            t.detach().abs().amax().to(acc) if t is not None and t.numel() > 0 else torch.zeros((), dtype=acc,
                                                                                               device=device)
            for t in tensors
        ])
        return power_of_two_at_least(reduction.segment_max(amax, ids, 1)[0])

    s_a, s_c = largest(adversarial), largest(clean)
    per_tensor = torch.zeros(len(adversarial), 3, dtype=acc, device=device)
    for i, (a, c) in enumerate(zip(adversarial, clean, strict=True)):
        a_hat = a.detach().reshape(-1).to(acc) / s_a
        per_tensor[i, 1] = torch.dot(a_hat, a_hat)
        if c is not None:
            c_hat = c.detach().reshape(-1).to(acc) / s_c
            per_tensor[i, 0] = torch.dot(a_hat, c_hat)
            per_tensor[i, 2] = torch.dot(c_hat, c_hat)
    if weights is not None:
        per_tensor *= torch.tensor(list(weights), dtype=acc, device=device)[:, None]
    dot, sq_a, sq_c = reduction.segment_sums(per_tensor, ids, 1)[0].tolist()
    return dot, sq_a, sq_c, s_a.item(), s_c.item()
