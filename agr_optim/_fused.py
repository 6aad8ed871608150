"""The fused path (``fused=True``): one reduction pass and one combine pass for all segments.

Per tensor it reads ``a`` and ``c`` for the three sums (``torch._foreach_norm`` for the norms,
one dot per tensor), turns all segments' sums into coefficients with a handful of ``[S]``-sized
tensor ops (no ``.item()``, no Python branch on values), and combines in place with two
multi-tensor ops. Nothing N-sized is allocated for float32 and float64 gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._geometry import accumulation_dtype, coefficient_dtype, coefficients
from ._loop import scaled_sums
from ._stats import ReconstructionStats

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _range_limits(acc: torch.dtype) -> float:
    """Smallest norm whose square the accumulation dtype still sums accurately.

    Below ``sqrt(tiny / eps)``-ish the squares of the elements fall into subnormals and the
    sums lose digits; above, an overflow shows up as Inf. Both cases are rescued exactly.
    """
    info = torch.finfo(acc)
    return (info.tiny ** 0.5) * 2.0**24


def per_tensor_sums(
    adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """``[T]`` tensors of ``<a_i,c_i>``, ``|a_i|``, ``|c_i|`` in the coefficient dtype."""
    device = adversarial[0].device
    out_dtype = coefficient_dtype(device)
    low = [a.dtype in _LOW_PRECISION for a in adversarial]
    # Sums of bf16/fp16 in float32: a bf16 accumulator loses the sign of small cosines.
    a_acc = [a.float() if lp else a for a, lp in zip(adversarial, low)]
    c_acc = [c.float() if (c is not None and lp) else c for c, lp in zip(clean, low)]
    norms_a = torch._foreach_norm(a_acc) if a_acc else []
    present = [i for i, c in enumerate(c_acc) if c is not None]
    norms_c_present = torch._foreach_norm([c_acc[i] for i in present]) if present else []
    zero = torch.zeros((), dtype=out_dtype, device=device)
    norms_c = [zero] * len(adversarial)
    dots = [zero] * len(adversarial)
    for j, i in enumerate(present):
        norms_c[i] = norms_c_present[j]
        dots[i] = torch.linalg.vecdot(a_acc[i].reshape(-1), c_acc[i].reshape(-1))  # type: ignore[union-attr]
    stack = lambda xs: torch.stack([x.to(out_dtype) for x in xs])  # noqa: E731
    return stack(dots), stack(norms_a), stack(norms_c)


def reconstruct_fused(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    device = adversarial[0].device
    dots, norms_a, norms_c = per_tensor_sums(adversarial, clean)
    ids = torch.tensor(list(segment_ids), device=device)
    per_tensor = num_segments == len(adversarial) and list(segment_ids) == list(range(num_segments))

    def to_segments(values: Tensor) -> Tensor:
        if per_tensor:
            return values
        return torch.zeros(num_segments, dtype=values.dtype, device=device).index_add_(0, ids, values)

    dot, sq_a, sq_c = to_segments(dots), to_segments(norms_a.square()), to_segments(norms_c.square())
    scale = torch.ones_like(dot)
    if not torch.compiler.is_compiling() and device.type == "cpu":
        # Squares outside the accumulation range (|g| > ~1e19 or < ~1e-12 in float32) are
        # redone exactly, segment by segment, with the loop's scaled sums. On CPU this check
        # is free; on accelerators it would be a host sync per step, so there it is skipped
        # (see the docs: "Range").
        dot, sq_a, sq_c, scale = _rescue(adversarial, clean, segment_ids, dots, norms_a, norms_c,
                                         to_segments, dot, sq_a, sq_c, scale)
    rounding = 2.0 * max(torch.finfo(a.dtype).eps for a in adversarial)
    k = coefficients(dot, sq_a, sq_c, scale=scale, clip_norm=clip_norm, rounding=rounding)
    k_a = k.adversarial if per_tensor else k.adversarial[ids]
    k_c = k.clean if per_tensor else k.clean[ids]
    results = _combine(adversarial, clean, k_a, k_c, out)
    return results, k.stats


def _rescue(adversarial, clean, segment_ids, dots, norms_a, norms_c, to_segments, dot, sq_a, sq_c, scale):
    acc = accumulation_dtype(adversarial[0].dtype)
    low = _range_limits(acc)
    # A segment is in range when every tensor's norms are finite and, unless exactly zero
    # by construction (a missing clean gradient), not below the accurate-square limit.
    nonfinite = ~(dots.isfinite() & norms_a.isfinite() & norms_c.isfinite())
    small = (norms_a < low) | ((norms_c < low) & (norms_c > 0)) | (
        (norms_a * norms_c < low * low) & (norms_a * norms_c > 0)
    )
    suspect = to_segments((nonfinite | small).to(dots.dtype)) > 0
    if not bool(suspect.any()):
        return dot, sq_a, sq_c, scale
    dot, sq_a, sq_c, scale = dot.clone(), sq_a.clone(), sq_c.clone(), scale.clone()
    for segment in suspect.nonzero().flatten().tolist():
        members = [i for i, s in enumerate(segment_ids) if s == segment]
        d, a2, c2, s = scaled_sums([adversarial[i] for i in members], [clean[i] for i in members])
        dot[segment], sq_a[segment], sq_c[segment], scale[segment] = d, a2, c2, s
    return dot, sq_a, sq_c, scale


def _combine(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    k_a: Tensor,
    k_c: Tensor,
    out: Sequence[Tensor] | None,
) -> list[Tensor]:
    """``out_i = k_a[i] a_i + k_c[i] c_i``; ``out`` may be ``adversarial`` itself (in place)."""
    n = len(adversarial)
    results: list[Tensor] = [torch.empty(0)] * n
    fast = [i for i in range(n) if adversarial[i].dtype not in _LOW_PRECISION]
    if fast:
        # Coefficients in the gradients' dtype: a float64 0-dim tensor would not change the
        # result dtype, but per-tensor casts inside the foreach kernels cost more.
        a_f = [adversarial[i] for i in fast]
        ka_by_dtype = {d: k_a.to(d).unbind() for d in {a.dtype for a in a_f}}
        kc_by_dtype = {d: k_c.to(d).unbind() for d in ka_by_dtype}
        ka_f = [ka_by_dtype[adversarial[i].dtype][i] for i in fast]
        if out is None:
            r_f = torch._foreach_mul(a_f, ka_f)
        else:
            r_f = [out[i] for i in fast]
            if any(r is not a for r, a in zip(r_f, a_f)):
                torch._foreach_copy_(r_f, a_f)
            torch._foreach_mul_(r_f, ka_f)
        with_c = [j for j, i in enumerate(fast) if clean[i] is not None]
        if with_c:
            torch._foreach_addcmul_(
                [r_f[j] for j in with_c],
                [clean[fast[j]] for j in with_c],  # type: ignore[misc]
                [kc_by_dtype[adversarial[fast[j]].dtype][fast[j]] for j in with_c],
            )
        for j, i in enumerate(fast):
            results[i] = r_f[j]
    for i in range(n):
        if adversarial[i].dtype in _LOW_PRECISION:
            # One rounding to bf16/fp16: combine in float32, round once at the end.
            r = adversarial[i].float() * k_a[i].float()
            c = clean[i]
            if c is not None:
                r = r + c.float() * k_c[i].float()
            if out is None:
                results[i] = r.to(adversarial[i].dtype)
            else:
                results[i] = out[i].copy_(r)
    return results
