"""The fused path (``fused=True``): three sums per tensor, the rule per segment, one combine.

Per tensor it reads ``a`` and ``c`` for the three sums (three ``torch.dot`` calls back to back,
so the second and third find the tensor in the cache) and combines in place with two
multi-tensor ops per cache-sized chunk. Nothing N-sized is allocated for float32 and float64
gradients. Two schedules:

- eager CPU (:func:`_host_blocks`): block by block of about ``_BLOCK`` elements, the sums, the
  rule on Python floats (reading a CPU value back costs nothing) and the combine, so that the
  combine finds the block's gradients still in the cache: the gradients come from memory once,
  not twice. Host reads also make the exact repairs (range, ill-conditioned clipping) free;
- accelerators and ``torch.compile`` (:func:`_device_two_pass`): all sums, then the rule on
  ``[S]``-sized tensors (no ``.item()``, no Python branch on values: no host synchronisation),
  then the combine.

Why ``torch.dot`` and not ``torch._foreach_norm``: on CPU the norm kernels are compute bound
(about 30 GB/s on one of these cores, whether the data is in the cache or not) while ``dot``
runs at memory speed and several times faster on cached data. Why chunks: ``mul_`` then
``addcmul_`` over the whole model reads the gradient from memory twice; over a chunk that fits
in the cache, the second pass reads it from there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._geometry import (
    FloatOps,
    Rule,
    coefficient_dtype,
    coefficients,
    combine_rounding,
    ill_conditioned,
    narrowest_accumulation_dtype,
    rule,
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


def _tensor_sums(adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]) -> list[Tensor]:
    """0-dim ``|a_i|^2``, ``<a_i,c_i>``, ``|c_i|^2`` for every tensor, in that order (``3 T``)."""
    sums: list[Tensor] = []
    zero = None
    for a, c in zip(adversarial, clean, strict=True):
        if a.dtype in _LOW_PRECISION:
            # Sums of bf16/fp16 in float32: a bf16 accumulator loses the sign of small cosines.
            # Converted one tensor at a time, so at most one float32 copy is alive.
            a, c = a.float(), (None if c is None else c.float())
        if a.dim() != 1:
            a, c = _flat_pair(a, c)
        # The three dots back to back: the second and third read a and c from the cache.
        sums.append(torch.dot(a, a))
        if c is None:
            if zero is None:
                zero = torch.zeros((), dtype=a.dtype, device=a.device)
            sums += (zero, zero)
        else:
            sums += (torch.dot(a, c), torch.dot(c, c))
    return sums


def per_tensor_sums(
    adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """``[T]`` tensors of ``<a_i,c_i>``, ``|a_i|^2``, ``|c_i|^2`` in the coefficient dtype."""
    # stack promotes mixed float32/float64 sums; the cast is then one [T]-sized op.
    sums = torch.stack(_tensor_sums(adversarial, clean)).view(-1, 3).to(coefficient_dtype(adversarial[0].device))
    return sums[:, 1], sums[:, 0], sums[:, 2]


def reconstruct_fused(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """The fused path: :func:`_host_blocks` where the sums can be read for free (CPU, eager),
    :func:`_device_two_pass` elsewhere (accelerators, ``torch.compile``)."""
    impl = _host_blocks if _host_readable(adversarial[0].device) else _device_two_pass
    return impl(adversarial, clean, segment_ids=segment_ids, num_segments=num_segments, clip_norm=clip_norm,
                out=out)


def _host_readable(device: torch.device) -> bool:
    """Whether reading a value back costs nothing: eager CPU (no device to wait for)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


#: Elements per block of the CPU path: a block's ``a`` and ``c`` (4 MiB of float32) are
#: summed and then combined while they are still in the cache. Measured on a 2-core EPYC
#: (32 MiB L3), in-place reconstruction of PreActResNet-18 gradients: 9.6 ms with 0.5M-element
#: blocks, 10.2 ms with 1M, 10.6 ms as one block (a gain of 5-10 %: tensors of up to ~2M
#: elements are still in the L3 cache for their second and third dot either way).
_BLOCK = 1 << 19


def _blocks(adversarial: Sequence[Tensor], segment_ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` runs of whole segments of about ``_BLOCK`` elements (a segment
    never straddles two blocks; one whose tensors are not consecutive makes one block)."""
    n = len(adversarial)
    if any(segment_ids[i + 1] not in (segment_ids[i], segment_ids[i] + 1) for i in range(n - 1)):
        return [(0, n)]
    blocks: list[tuple[int, int]] = []
    start, size = 0, 0
    for i in range(n):
        size += adversarial[i].numel()
        last = i + 1 == n
        if last or (size >= _BLOCK and segment_ids[i + 1] != segment_ids[i]):
            blocks.append((start, i + 1))
            start, size = i + 1, 0
    return blocks


def _host_blocks(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """CPU: per block of about ``_BLOCK`` elements, the sums, the rule and the combine.

    The block's gradients are still in the cache when the combine reads them again, so the
    gradients come from memory once instead of twice. The sums are read to the host (free on
    CPU) and the rule runs on Python floats (:class:`~agr_optim._geometry.FloatOps`), which
    also makes two exact repairs free whenever they are needed:

    - range: a segment whose squares leave float32's accurate range (norms above about
      1e19 or below about 1e-12), or whose summed squares overflow, has its sums redone,
      scaled by its largest entry and accumulated in float64;
    - clipping: an ill-conditioned projected segment (cosine below about -0.97) is clipped
      by the norm of its explicit ``r``, not by the closed form, which has lost its digits.
    """
    rounding = combine_rounding(a.dtype for a in adversarial)
    error = _sum_error(adversarial, segment_ids, num_segments)
    low = _range_limits(narrowest_accumulation_dtype(a.dtype for a in adversarial))
    fields: list[list] = [[] for _ in Rule._fields]
    results: list[Tensor] = []
    for start, stop in _blocks(adversarial, segment_ids):
        adv, cln = adversarial[start:stop], clean[start:stop]
        sums_of = torch.stack(_tensor_sums(adv, cln)).tolist()  # |a|^2, <a,c>, |c|^2 per tensor
        members_of: dict[int, list[int]] = {}  # segment -> its tensors' indices in the block
        for m in range(stop - start):
            members_of.setdefault(segment_ids[start + m], []).append(m)
        k_a = [0.0] * (stop - start)
        k_c = [0.0] * (stop - start)
        for segment in sorted(members_of):
            members = members_of[segment]
            sq_a = sum(sums_of[3 * m] for m in members)
            dot = sum(sums_of[3 * m + 1] for m in members)
            sq_c = sum(sums_of[3 * m + 2] for m in members)
            scale = 1.0
            # Each tensor's sums in range, and their totals too (float64 ones can overflow).
            if not (math.isfinite(sq_a) and math.isfinite(dot) and math.isfinite(sq_c)) or any(
                _out_of_range(*sums_of[3 * m : 3 * m + 3], low, adv[m], cln[m]) for m in members
            ):
                dot, sq_a, sq_c, scale = (
                    t.item()
                    for t in scaled_sums([adv[m] for m in members], [cln[m] for m in members], acc=torch.float64)
                )
            r = rule(dot, sq_a, sq_c, scale=scale, clip_norm=clip_norm, rounding=rounding, sum_error=error,
                     ops=FloatOps)
            if clip_norm is not None and ill_conditioned(r.cosine, r.projected):
                unclipped = rule(dot, sq_a, sq_c, scale=scale, clip_norm=None, ops=FloatOps)
                _, norm = combined(
                    [adv[m] for m in members], [cln[m] for m in members],
                    *(torch.tensor(x, dtype=torch.float64) for x in (unclipped.adversarial, unclipped.clean, scale)),
                )
                r = rule(dot, sq_a, sq_c, scale=scale, clip_norm=clip_norm, rounding=rounding,
                         exact_norm=norm.item(), ops=FloatOps)
            for field, value in zip(fields, r, strict=True):
                field.append(value)
            for m in members:
                k_a[m], k_c[m] = r.adversarial, r.clean
        results += _combine(adv, cln, k_a, k_c, None if out is None else out[start:stop])
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
    stats = ReconstructionStats(
        cosine=as_tensor(fields[2]),
        projected=torch.tensor(fields[3], dtype=torch.bool),
        norm_adversarial=as_tensor(fields[4]),
        norm_clean=as_tensor(fields[5]),
        norm_reconstructed=as_tensor(fields[6]),
        clip_scale=as_tensor(fields[7]),
    )
    return results, stats


def _out_of_range(sq_a: float, dot: float, sq_c: float, low: float, a: Tensor, c: Tensor | None) -> bool:
    """Whether a tensor's finite float32 (or float64) sums may be inexact: squares so small that
    they fell among the subnormals or to zero (a zero square is checked against the tensor
    itself: an all-zero gradient is exact, a tiny non-zero one underflowed). Non-finite sums
    are caught on the segment's totals, which any non-finite term makes non-finite."""
    low_sq = low * low
    if 0.0 < sq_a < low_sq or 0.0 < sq_c < low_sq or 0.0 < sq_a * sq_c < low_sq * low_sq:
        return True
    return (sq_a == 0.0 and bool(a.any())) or (sq_c == 0.0 and c is not None and bool(c.any()))


def _device_two_pass(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """Accelerators and ``torch.compile``: all sums, then ``[S]``-tensor coefficients, then the
    combine, without ever reading a value back (no host synchronisation).

    Without host reads nothing is redone: squares outside float32's accurate range are taken
    as they are, and ill-conditioned projected segments are clipped by a safe upper bound of
    their norm (see :func:`~agr_optim._geometry.coefficients`).
    """
    device = adversarial[0].device
    dots, squares_a, squares_c = per_tensor_sums(adversarial, clean)
    per_tensor = num_segments == len(adversarial) and list(segment_ids) == list(range(num_segments))
    # The index tensor exists only for "group"/"global": "tensor" (the default) needs none.
    ids = None if per_tensor else torch.tensor(list(segment_ids), device=device)

    def to_segments(values: Tensor) -> Tensor:
        if ids is None:
            return values
        return torch.zeros(num_segments, dtype=values.dtype, device=device).index_add_(0, ids, values)

    rounding = combine_rounding(a.dtype for a in adversarial)
    error = _sum_error(adversarial, segment_ids, num_segments)
    k = coefficients(to_segments(dots), to_segments(squares_a), to_segments(squares_c), clip_norm=clip_norm,
                     rounding=rounding, sum_error=error)
    k_a = k.adversarial if ids is None else k.adversarial[ids]
    k_c = k.clean if ids is None else k.clean[ids]
    return _combine(adversarial, clean, k_a, k_c, out), k.stats


def _sum_error(adversarial: Sequence[Tensor], segment_ids: Sequence[int], num_segments: int) -> float:
    """:func:`~agr_optim._geometry.sum_error` of the largest segment (a Python float: no sync)."""
    sizes = [0] * num_segments
    for a, segment in zip(adversarial, segment_ids, strict=True):
        sizes[segment] += a.numel()
    return sum_error(narrowest_accumulation_dtype(a.dtype for a in adversarial), max(sizes, default=1))


def _combine(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    k_a: Tensor | list[float],
    k_c: Tensor | list[float],
    out: Sequence[Tensor] | None,
) -> list[Tensor]:
    """``out_i = k_a[i] a_i + k_c[i] c_i``; ``out`` may be ``adversarial`` itself (in place).

    ``k_a`` and ``k_c``: ``[T]`` tensors (device path) or lists of Python floats (CPU path).
    """
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
        ka_by_dtype, kc_by_dtype = {}, {}
        for d in {adversarial[i].dtype for i in fast}:
            if isinstance(k_a, Tensor):
                ka_by_dtype[d], kc_by_dtype[d] = k_a.to(d).unbind(), k_c.to(d).unbind()  # type: ignore[union-attr]
            else:  # one tensor for both lists, rounded once from the floats
                both = torch.tensor(k_a + k_c, dtype=d).unbind()  # type: ignore[operator]
                ka_by_dtype[d], kc_by_dtype[d] = both[:n], both[n:]
        _combine_chunked(
            [(targets[i], adversarial[i], clean[i], ka_by_dtype[adversarial[i].dtype][i],
              kc_by_dtype[adversarial[i].dtype][i]) for i in fast]
        )
    for i in range(n):
        if adversarial[i].dtype in _LOW_PRECISION:
            # One rounding to bf16/fp16: combine in float32, round once at the end.
            # float32 coefficients (one rounding from the float64 ones, or the floats); a device
            # tensor is not taken through float64, which MPS does not have.
            ka, kc = (k[i].float() if isinstance(k, Tensor) else torch.tensor(k[i], dtype=torch.float32)
                      for k in (k_a, k_c))
            r = adversarial[i].float() * ka
            c = clean[i]
            if c is not None:
                r = r + c.float() * kc
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
