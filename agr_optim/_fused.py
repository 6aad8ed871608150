"""The fused path (``fused=True``): one reduction pass and one combine pass for all segments.

Per tensor it reads ``a`` and ``c`` for the three sums (three ``torch.dot`` calls back to back,
so the second and third find the tensor in the cache), turns all segments' sums into
coefficients with a handful of ``[S]``-sized tensor ops (no ``.item()``, no Python branch on
values), and combines in place with two multi-tensor ops per cache-sized chunk. Nothing
N-sized is allocated for float32 and float64 gradients.

Why ``torch.dot`` and not ``torch._foreach_norm``: on CPU the norm kernels are compute bound
(about 30 GB/s on one of these cores, whether the data is in the cache or not) while ``dot``
runs at memory speed and several times faster on cached data. Why chunks: ``mul_`` then
``addcmul_`` over the whole model reads the gradient from memory twice; over a chunk that fits
in the cache, the second pass reads it from there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._geometry import (
    Coefficients,
    coefficient_dtype,
    coefficients,
    combine_rounding,
    ill_conditioned,
    narrowest_accumulation_dtype,
    sum_error,
)
from ._loop import combined, scaled_sums
from ._stats import ReconstructionStats

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _range_limits(acc: torch.dtype) -> float:
    """Smallest norm whose square the accumulation dtype still sums accurately.

    Below ``sqrt(tiny / eps)``-ish the squares of the elements fall into subnormals and the
    sums lose digits; above, an overflow shows up as Inf. Both cases are rescued exactly.
    """
    info = torch.finfo(acc)
    return (info.tiny ** 0.5) * 2.0**24


def _flat_pair(a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """1-D views of ``a`` and ``c`` in ``a``'s memory order, elements paired.

    Contiguous and channels-last gradients flatten without a copy; any other layout is
    copied by ``reshape`` (correct, only slower).
    """
    if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
        a = a.permute(0, 2, 3, 1)
        c = None if c is None else c.permute(0, 2, 3, 1)
    return a.reshape(-1), (None if c is None else c.reshape(-1))


def per_tensor_sums(
    adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """``[T]`` tensors of ``<a_i,c_i>``, ``|a_i|^2``, ``|c_i|^2`` in the coefficient dtype."""
    out_dtype = coefficient_dtype(adversarial[0].device)
    dots: list[Tensor] = []
    sq_a: list[Tensor] = []
    sq_c: list[Tensor] = []
    for a, c in zip(adversarial, clean, strict=True):
        if a.dtype in _LOW_PRECISION:
            # Sums of bf16/fp16 in float32: a bf16 accumulator loses the sign of small cosines.
            # Converted one tensor at a time, so at most one float32 copy is alive.
            a, c = a.float(), (None if c is None else c.float())
        a, c = _flat_pair(a, c)
        # The three dots back to back: the second and third read a and c from the cache.
        sq_a.append(torch.dot(a, a))
        if c is None:
            zero = torch.zeros((), dtype=a.dtype, device=a.device)
            dots.append(zero)
            sq_c.append(zero)
        else:
            dots.append(torch.dot(a, c))
            sq_c.append(torch.dot(c, c))
    # stack promotes mixed float32/float64 sums; the cast is then one [T]-sized op.
    return torch.stack(dots).to(out_dtype), torch.stack(sq_a).to(out_dtype), torch.stack(sq_c).to(out_dtype)


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
    dots, squares_a, squares_c = per_tensor_sums(adversarial, clean)
    per_tensor = num_segments == len(adversarial) and list(segment_ids) == list(range(num_segments))
    # The index tensor exists only for "group"/"global": "tensor" (the default) needs none.
    ids = None if per_tensor else torch.tensor(list(segment_ids), device=device)

    def to_segments(values: Tensor) -> Tensor:
        if ids is None:
            return values
        return torch.zeros(num_segments, dtype=values.dtype, device=device).index_add_(0, ids, values)

    dot, sq_a, sq_c = to_segments(dots), to_segments(squares_a), to_segments(squares_c)
    scale = torch.ones_like(dot)
    if not torch.compiler.is_compiling() and device.type == "cpu":
        # Squares outside the accumulation range (|g| > ~1e19 or < ~1e-12 in float32) are
        # redone exactly, segment by segment, with the loop's scaled sums. On CPU this check
        # is free; on accelerators it would be a host sync per step, so there it is skipped
        # (see the docs: "Range").
        dot, sq_a, sq_c, scale = _rescue(adversarial, clean, segment_ids, dots, squares_a.sqrt(),
                                         squares_c.sqrt(), to_segments, dot, sq_a, sq_c, scale)
    rounding = combine_rounding(a.dtype for a in adversarial)
    error = _sum_error(adversarial, segment_ids, num_segments)
    k = coefficients(dot, sq_a, sq_c, scale=scale, clip_norm=clip_norm, rounding=rounding, sum_error=error)
    if clip_norm is not None and not torch.compiler.is_compiling() and device.type == "cpu":
        k = exact_clip(adversarial, clean, segment_ids, k, (dot, sq_a, sq_c, scale), clip_norm, rounding)
    k_a = k.adversarial if ids is None else k.adversarial[ids]
    k_c = k.clean if ids is None else k.clean[ids]
    results = _combine(adversarial, clean, k_a, k_c, out)
    return results, k.stats


def _sum_error(adversarial: Sequence[Tensor], segment_ids: Sequence[int], num_segments: int) -> float:
    """:func:`~agr_optim._geometry.sum_error` of the largest segment (a Python float: no sync)."""
    sizes = [0] * num_segments
    for a, segment in zip(adversarial, segment_ids, strict=True):
        sizes[segment] += a.numel()
    return sum_error(narrowest_accumulation_dtype(a.dtype for a in adversarial), max(sizes, default=1))


def exact_clip(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    segment_ids: Sequence[int],
    k: Coefficients,
    sums: tuple[Tensor, Tensor, Tensor, Tensor],
    clip_norm: float,
    rounding: float,
) -> Coefficients:
    r"""Clip ill-conditioned projected segments by their exact norm (CPU: the check is free).

    When :math:`a` is nearly antiparallel to :math:`c`, :math:`\lVert r\rVert` is a small
    difference of the sums and the closed form can be off by orders of magnitude; there the
    loop's explicit ``r`` gives the norm. Such segments are rare in training (cosine below
    about -0.97), so this costs nothing on most steps.
    """
    ill = ill_conditioned(k.stats)
    if not bool(ill.any()):
        return k
    dot, sq_a, sq_c, scale = sums
    unclipped = coefficients(dot, sq_a, sq_c, scale=scale, clip_norm=None)
    norm_r = k.stats.norm_reconstructed.clone()
    for segment in ill.nonzero().flatten().tolist():
        members = [i for i, s in enumerate(segment_ids) if s == segment]
        _, norm = combined(
            [adversarial[i] for i in members],
            [clean[i] for i in members],
            unclipped.adversarial[segment],
            unclipped.clean[segment],
            scale[segment],
        )
        norm_r[segment] = norm
    # As in coefficients(): never below the combine's own rounding noise, which differs from
    # that of the explicit r above (the fused combine rounds in another order).
    stats = k.stats
    noise = rounding * (
        unclipped.adversarial.abs() * stats.norm_adversarial + unclipped.clean.abs() * stats.norm_clean
    )
    bound = torch.sqrt(norm_r * norm_r + noise * noise)
    exact = torch.where(bound > 0, clip_norm / torch.where(bound > 0, bound, 1.0), 1.0)
    exact = torch.where(exact.isnan(), exact, exact.clamp(max=1.0))
    clip_scale = torch.where(ill, exact, stats.clip_scale)
    stats = type(stats)(
        cosine=stats.cosine,
        projected=stats.projected,
        norm_adversarial=stats.norm_adversarial,
        norm_clean=stats.norm_clean,
        norm_reconstructed=norm_r,
        clip_scale=clip_scale,
    )
    return Coefficients(unclipped.adversarial * clip_scale, unclipped.clean * clip_scale, stats)


def _rescue(adversarial, clean, segment_ids, dots, norms_a, norms_c, to_segments, dot, sq_a, sq_c, scale):
    # The float32 limit unless every gradient is float64 (the stricter one wins).
    low = _range_limits(narrowest_accumulation_dtype(a.dtype for a in adversarial))
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
    if out is None:
        # New outputs (the functional API); empty_like keeps each gradient's strides, so the
        # chunks below pair elements of a, c and r alike.
        targets = [torch.empty_like(a) for a in adversarial]
    else:
        targets = list(out)
    fast = [i for i in range(n) if adversarial[i].dtype not in _LOW_PRECISION]
    if fast:
        # Coefficients in the gradients' dtype: a float64 0-dim tensor would not change the
        # result dtype, but per-tensor casts inside the foreach kernels cost more.
        ka_by_dtype = {d: k_a.to(d).unbind() for d in {adversarial[i].dtype for i in fast}}
        kc_by_dtype = {d: k_c.to(d).unbind() for d in ka_by_dtype}
        _combine_chunked(
            [(targets[i], adversarial[i], clean[i], ka_by_dtype[adversarial[i].dtype][i],
              kc_by_dtype[adversarial[i].dtype][i]) for i in fast]
        )
    for i in range(n):
        if adversarial[i].dtype in _LOW_PRECISION:
            # One rounding to bf16/fp16: combine in float32, round once at the end.
            r = adversarial[i].float() * k_a[i].float()
            c = clean[i]
            if c is not None:
                r = r + c.float() * k_c[i].float()
            targets[i].copy_(r)
    return targets


#: Elements per chunk of the combine (2 MiB of float32): ``mul_`` leaves the chunk in the
#: cache for ``addcmul_``. Measured on a 2-core EPYC: 0.5M-1M elements best, whole-model
#: passes about 1.5x slower.
_CHUNK = 1 << 19


def _combine_chunked(items: list[tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]]) -> None:
    """``r = k_a a + k_c c`` for ``(r, a, c, k_a, k_c)`` items, chunk by cache-sized chunk.

    Gradients are cut into pieces of at most ``_CHUNK`` elements (views, no copies) and
    every group of about ``_CHUNK`` elements gets ``copy_`` (only when ``r`` is not ``a``),
    ``mul_`` and ``addcmul_`` in a row, so the later passes read from the cache. The items
    are walked last first: the reduction pass just left the last gradients in the cache.
    """
    r_chunk: list[Tensor] = []
    a_chunk: list[Tensor] = []
    ka_chunk: list[Tensor] = []
    rc_chunk: list[Tensor] = []
    c_chunk: list[Tensor] = []
    kc_chunk: list[Tensor] = []
    size = 0

    def flush() -> None:
        copies = [(r, a) for r, a in zip(r_chunk, a_chunk, strict=True) if r is not a]
        if copies:
            torch._foreach_copy_([r for r, _ in copies], [a for _, a in copies])
        torch._foreach_mul_(r_chunk, ka_chunk)
        if rc_chunk:
            torch._foreach_addcmul_(rc_chunk, c_chunk, kc_chunk)
        for chunk in (r_chunk, a_chunk, ka_chunk, rc_chunk, c_chunk, kc_chunk):
            chunk.clear()

    for r, a, c, ka, kc in reversed(items):
        pieces: list[tuple[Tensor, Tensor, Tensor | None]]
        layout = _dense_layout(r, a, c) if r.numel() > _CHUNK else None
        if layout is not None:
            r_flat, a_flat, c_flat = _flat_views(layout, r, a, c)
            pieces = [
                (r_flat[s : s + _CHUNK], a_flat[s : s + _CHUNK], None if c_flat is None else c_flat[s : s + _CHUNK])
                for s in range(0, r_flat.numel(), _CHUNK)
            ]
        else:
            pieces = [(r, a, c)]
        for r_piece, a_piece, c_piece in pieces:
            r_chunk.append(r_piece)
            a_chunk.append(a_piece)
            ka_chunk.append(ka)
            if c_piece is not None:
                rc_chunk.append(r_piece)
                c_chunk.append(c_piece)
                kc_chunk.append(kc)
            size += r_piece.numel()
            if size >= _CHUNK:
                flush()
                size = 0
    if r_chunk:
        flush()


def _dense_layout(r: Tensor, a: Tensor, c: Tensor | None) -> str | None:
    """The layout in which ``r``, ``a`` and ``c`` all cut into matching 1-D views, if any."""
    tensors = (r, a) if c is None else (r, a, c)
    if all(t.is_contiguous() for t in tensors):
        return "contiguous"
    if r.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return "channels_last"
    return None


def _flat_views(layout: str, r: Tensor, a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    if layout == "channels_last":  # NHWC in memory: this permutation is a contiguous view
        r, a = r.permute(0, 2, 3, 1), a.permute(0, 2, 3, 1)
        c = None if c is None else c.permute(0, 2, 3, 1)
    return r.view(-1), a.view(-1), (None if c is None else c.view(-1))


# ---------------------------------------------------------------------- compiled path (opt-in)
def _fused_compilable(
    adversarial: list[Tensor],
    clean: list[Tensor | None],
    ids: Tensor | None,
    num_segments: int,
    clip_norm: float | None,
    rounding: float,
    error: float,
    inplace: bool,
) -> tuple[list[Tensor], ReconstructionStats]:
    """The fused path written for ``torch.compile``: sums as ``(a * c).sum()`` and friends,
    which inductor fuses into one loop per tensor reading ``a`` and ``c`` once, and the
    combine as one expression per tensor (one loop: read ``a`` and ``c``, write ``r``)."""
    sums = []
    for a, c in zip(adversarial, clean, strict=True):
        a = a.float() if a.dtype in _LOW_PRECISION else a
        if c is None:
            sums.append(torch.stack([torch.zeros_like(a.sum()), (a * a).sum(), torch.zeros_like(a.sum())]))
        else:
            c = c.float() if c.dtype in _LOW_PRECISION else c
            sums.append(torch.stack([(a * c).sum(), (a * a).sum(), (c * c).sum()]))
    s = torch.stack(sums).to(coefficient_dtype(adversarial[0].device))
    if ids is not None:
        s = torch.zeros(num_segments, 3, dtype=s.dtype, device=s.device).index_add_(0, ids, s)
    k = coefficients(s[:, 0], s[:, 1], s[:, 2], clip_norm=clip_norm, rounding=rounding, sum_error=error)
    k_a = k.adversarial if ids is None else k.adversarial[ids]
    k_c = k.clean if ids is None else k.clean[ids]
    results = []
    for i, (a, c) in enumerate(zip(adversarial, clean, strict=True)):
        work = torch.float32 if a.dtype in _LOW_PRECISION else a.dtype
        r = a.to(work) * k_a[i].to(work)
        if c is not None:
            r = r + c.to(work) * k_c[i].to(work)
        results.append(a.copy_(r) if inplace else r.to(a.dtype))
    return results, k.stats


_compiled_kernel: object = None


def reconstruct_compiled(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """``fused="compile"``: :func:`_fused_compilable` through ``torch.compile`` (compiled on
    first use and again for new shapes; the first call takes tens of seconds on CPU).

    Unlike the eager fused path it never rescues out-of-range squares (that needs a host
    read): float32 gradients with norms beyond about 1e19 give non-finite sums here, and
    below about 1e-12 the squares lose digits, as in most fused optimizers.
    """
    global _compiled_kernel
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(_fused_compilable, dynamic=False)
    device = adversarial[0].device
    per_tensor = num_segments == len(adversarial) and list(segment_ids) == list(range(num_segments))
    ids = None if per_tensor else torch.tensor(list(segment_ids), device=device)
    rounding = combine_rounding(a.dtype for a in adversarial)
    inplace = out is not None and all(o is a for o, a in zip(out, adversarial, strict=True))
    results, stats = _compiled_kernel(  # type: ignore[operator]
        list(adversarial), list(clean), ids, num_segments, clip_norm, rounding,
        _sum_error(adversarial, segment_ids, num_segments), inplace
    )
    if out is not None and not inplace:
        for target, r in zip(out, results, strict=True):
            target.copy_(r)
        results = list(out)
    return results, stats
