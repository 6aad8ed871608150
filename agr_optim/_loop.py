"""The plain per-segment loop: the readable statement of AGR (``fused=False``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._geometry import Coefficients, clip_scale_of, coefficients, widest_accumulation_dtype
from ._stats import ReconstructionStats


def scaled_sums(
    adversarial: Sequence[Tensor], clean: Sequence[Tensor | None], acc: torch.dtype | None = None
) -> tuple[Tensor, ...]:
    """``<a,c>``, ``|a|^2``, ``|c|^2`` of one segment, taken of ``a/s`` and ``c/s``.

    ``s`` is the largest magnitude in the segment, so no square overflows whatever the
    gradients' scale (1e-30 and 1e30 alike in float32), and the largest squares are of order
    one. Squares of entries far below ``s`` can still underflow in float32: a ``c`` below about
    ``1e-19 |a|`` counts as zero there; ``acc=torch.float64`` (what the fused path's range
    rescue uses) takes float32 gradients' sums in float64, where they cannot. Returns
    ``(dot, sq_a, sq_c, s)`` as 0-dim tensors in the accumulation dtype (``acc``, by default
    float64 if any gradient is float64, else float32). A non-finite gradient gives ``s = 1``,
    so the sums stay non-finite instead of being divided away.
    """
    acc = acc or widest_accumulation_dtype(a.dtype for a in adversarial)
    device = adversarial[0].device
    magnitudes = [g.detach().abs().amax().to(acc) for g in adversarial if g.numel() > 0]
    magnitudes += [g.detach().abs().amax().to(acc) for g in clean if g is not None and g.numel() > 0]
    scale = torch.stack(magnitudes).amax() if magnitudes else torch.zeros((), dtype=acc, device=device)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)
    dot = torch.zeros((), dtype=acc, device=device)
    sq_a = torch.zeros((), dtype=acc, device=device)
    sq_c = torch.zeros((), dtype=acc, device=device)
    for a, c in zip(adversarial, clean, strict=True):
        a = a.detach().to(acc).flatten() / scale
        sq_a = sq_a + torch.dot(a, a)
        if c is not None:
            c = c.detach().to(acc).flatten() / scale
            dot = dot + torch.dot(a, c)
            sq_c = sq_c + torch.dot(c, c)
    return dot, sq_a, sq_c, scale


def combined(
    adversarial: Sequence[Tensor], clean: Sequence[Tensor | None], k_a: Tensor, k_c: Tensor, scale: Tensor
) -> tuple[list[Tensor], Tensor]:
    """``r = k_a a + k_c c`` of one segment, written out in the accumulation dtype, and ``|r|``.

    The norm is taken of ``r/s`` like the sums, so it neither over- nor underflows.
    """
    acc = widest_accumulation_dtype(a.dtype for a in adversarial)
    k_a, k_c, scale = k_a.to(acc), k_c.to(acc), scale.to(acc)
    r_list = []
    sq_r = torch.zeros((), dtype=acc, device=k_a.device)
    for a, c in zip(adversarial, clean, strict=True):
        r = k_a * a.detach().to(acc)
        if c is not None:
            r = r + k_c * c.detach().to(acc)
        sq_r = sq_r + (r / scale).square().sum()
        r_list.append(r)
    return r_list, sq_r.sqrt() * scale


def reconstruct_loop(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """One segment at a time: sums, coefficients, the explicit ``r``, then clip by ``|r|``."""
    members: list[list[int]] = [[] for _ in range(num_segments)]
    for index, segment in enumerate(segment_ids):
        members[segment].append(index)
    results: list[Tensor] = [torch.empty(0)] * len(adversarial)
    parts: list[ReconstructionStats] = []
    for indices in members:
        a_list = [adversarial[i] for i in indices]
        c_list = [clean[i] for i in indices]
        dot, sq_a, sq_c, scale = scaled_sums(a_list, c_list)
        k = coefficients(dot[None], sq_a[None], sq_c[None], scale=scale[None], clip_norm=None)
        r_list, norm_r = combined(a_list, c_list, k.adversarial[0], k.clean[0], scale)
        clip = torch.ones_like(norm_r) if clip_norm is None else clip_scale_of(norm_r, norm_r, clip_norm)
        for i, r in zip(indices, r_list, strict=True):
            results[i] = (r * clip).to(adversarial[i].dtype)
        parts.append(
            _with_clip(k, norm_r.to(k.stats.cosine.dtype)[None], clip.to(k.stats.cosine.dtype)[None])
        )
    if out is not None:
        for target, r in zip(out, results, strict=True):
            target.copy_(r)
        results = list(out)
    if not parts:
        return results, _empty_stats(adversarial)
    return results, ReconstructionStats.concat(parts)


def _with_clip(k: Coefficients, norm_r: Tensor, clip: Tensor) -> ReconstructionStats:
    s = k.stats
    return ReconstructionStats(s.cosine, s.projected, s.norm_adversarial, s.norm_clean, norm_r, clip)


def _empty_stats(adversarial: Sequence[Tensor]) -> ReconstructionStats:
    empty = torch.zeros(0, dtype=torch.float64)
    return ReconstructionStats(empty, empty.bool(), empty, empty, empty, empty)
