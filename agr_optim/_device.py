r"""The accelerator schedule (``fused=True`` off CPU, ``fused="device"`` anywhere): flat rows, a
fixed number of kernels, no host synchronisation.

Per step, whatever the number of parameter tensors (:mod:`._flat` holds the rows):

1. the chunk sums: ``|a|`` and ``|c|`` of every chunk by ``linalg.vector_norm`` with float64
   accumulation (so squares of float32 gradients are exact and never over- or underflow), and
   ``<a,c>`` as products rounded once in the row dtype, summed in float64;
2. the segment sums: the chunks of each segment gathered by a cached index and added;
3. the rule on ``[S]`` tensors (:func:`~agr_optim._geometry.packed_rule`, about 25 kernels);
4. the combine ``a <- k_a a + k_c c``, each chunk by its segment's coefficients (two kernels).

Nothing is read back to the host: out-of-range segments (``|a||c|`` below
:func:`~agr_optim._geometry.product_floor`, where products of elements may be subnormal) keep
their clipped adversarial gradient, non-finite sums give NaN, and ``stats.out_of_range`` says
where. DTensor shards keep a per-tensor schedule (:func:`reconstruct_device_tensors`) whose sums
are reduced over the mesh; it feeds the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._flat import Layout, index_tensor, layout_of, row_dtype
from ._geometry import coefficient_dtype, combine_rounding, packed_doubt, packed_rule, product_floor
from ._gramian import LOCAL, Reduction
from ._stats import NO_OUTPUT, ReconstructionStats

__all__ = [
    "reconstruct_device", "reconstruct_rows", "on_rows", "result_rows", "rule_settings", "reconstruct_device_tensors",
]


def rule_settings(dtypes: Sequence[torch.dtype]) -> tuple[float, float]:
    """``(floor, doubt)`` of :func:`~agr_optim._geometry.packed_rule` for gradients of ``dtypes``:
    those of the narrowest product dtype (float32 unless every gradient is float64)."""
    product = torch.float64 if dtypes and all(d == torch.float64 for d in dtypes) else torch.float32
    return product_floor(product), packed_doubt(product, combine_rounding(dtypes))


def _chunk_sums(bucket_matrix_a: Tensor, bucket_matrix_c: Tensor, acc: torch.dtype) -> Tensor:
    """``[K + 1, 3]``: per chunk ``|a|^2, <a,c>, |c|^2`` (the last chunk is padding: zeros)."""
    sums = torch.empty(bucket_matrix_a.shape[0], 3, dtype=acc, device=bucket_matrix_a.device)
    torch.linalg.vector_norm(bucket_matrix_a, dim=1, dtype=acc, out=sums[:, 0])
    torch.linalg.vector_norm(bucket_matrix_c, dim=1, dtype=acc, out=sums[:, 2])
    sums[:, 0::2].square_()
    # a_i c_i rounded once in the row dtype, summed in float64.
    torch.sum(bucket_matrix_a * bucket_matrix_c, 1, dtype=acc, out=sums[:, 1])
    return sums


def _symmetric(device: torch.device) -> Tensor:
    """Columns ``0, 1, 1, 2`` of ``|a|^2, <a,c>, |c|^2``: the Gramian row by row."""
    return index_tensor((0, 1, 1, 2), device)


def reconstruct_rows(
    layout: Layout,
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    combine: bool = True,
) -> ReconstructionStats:
    """The schedule on rows of ``layout`` (one adversarial and one clean row per bucket): the
    result is written into the adversarial rows (``combine=False``: the statistics only)."""
    ids = tuple(segment_ids)
    device = layout.buckets[0].device
    acc = coefficient_dtype(device)
    sums: Tensor | None = None
    maps = []
    for bucket, a_row, c_row in zip(layout.buckets, adversarial, clean, strict=True):
        m = bucket.segment_maps(ids, num_segments)
        maps.append(m)
        chunks = _chunk_sums(bucket.matrix(a_row), bucket.matrix(c_row), coefficient_dtype(bucket.device))
        part = chunks.index_select(0, m.gather).view(num_segments, m.width, 3).sum(1)
        sums = part if sums is None else sums + part.to(device=device, dtype=acc)
    assert sums is not None
    floor, doubt = rule_settings([b.dtype for b in layout.buckets])
    k, stats = packed_rule(sums.index_select(1, _symmetric(device)), clip_norm=clip_norm, floor=floor, doubt=doubt)
    if combine:
        for bucket, m, a_row, c_row in zip(layout.buckets, maps, adversarial, clean, strict=True):
            per_chunk = k.to(bucket.device).index_select(0, m.chunk_segment)
            a = bucket.matrix(a_row)
            a.mul_(per_chunk[:, :1]).addcmul_(bucket.matrix(c_row), per_chunk[:, 1:])
    return stats


def reconstruct_device(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """The functional form: both gradients gathered into rows (one copy each), the schedule, then
    the results written into ``out`` (one copy) or returned as views of the result rows."""
    return on_rows(reconstruct_rows, adversarial, clean, segment_ids=segment_ids, num_segments=num_segments,
                   clip_norm=clip_norm, out=out)


def on_rows(
    schedule: Callable[..., ReconstructionStats],
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """A rows ``schedule`` (:func:`reconstruct_rows` or its compiled twin) as a functional
    implementation: gather, the schedule, the results into ``out`` or as views of new rows."""
    layout = layout_of(adversarial)
    a_rows, c_rows = layout.gather(adversarial), layout.gather(clean)
    if out is NO_OUTPUT:
        return [], reconstruct_rows(layout, a_rows, c_rows, segment_ids=segment_ids, num_segments=num_segments,
                                    clip_norm=clip_norm, combine=False)
    stats = schedule(layout, a_rows, c_rows, segment_ids=segment_ids, num_segments=num_segments, clip_norm=clip_norm)
    if out is not None:
        targets = list(out)
        torch._foreach_copy_(targets, layout.views(a_rows))
        return targets, stats
    # New tensors: views of the result rows (rows of bf16/fp16 gradients rounded once first).
    return layout.views(result_rows(layout, a_rows)), stats


def result_rows(layout: Layout, rows: Sequence[Tensor]) -> list[Tensor]:
    """``rows`` in their gradients' dtypes: float32 rows of bf16/fp16 gradients rounded once."""
    return [row if row.dtype == b.dtype else row.to(b.dtype) for b, row in zip(layout.buckets, rows, strict=True)]


def _tensor_sums(adversarial: Sequence[Tensor], clean: Sequence[Tensor | None], acc: torch.dtype) -> Tensor:
    """``[T, 4]`` per-tensor ``|a|^2, <a,c>, <a,c>, |c|^2`` with the numerics of the chunk sums."""
    rows = []
    zero = None
    for a, c in zip(adversarial, clean, strict=True):
        work = row_dtype(a.dtype)
        a_flat = a.reshape(-1).to(work)
        sq_a = torch.linalg.vector_norm(a_flat, dtype=acc).square()
        if c is None:
            if zero is None:
                zero = torch.zeros((), dtype=acc, device=a.device)
            rows.append(torch.stack([sq_a, zero, zero, zero]))
            continue
        c_flat = c.reshape(-1).to(work)
        dot = torch.sum(a_flat * c_flat, dtype=acc)
        rows.append(torch.stack([sq_a, dot, dot, torch.linalg.vector_norm(c_flat, dtype=acc).square()]))
    return torch.stack(rows)


def reconstruct_device_tensors(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
    reduction: Reduction = LOCAL,
    weights: Sequence[float] | None = None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """DTensor shards: per-tensor sums (their local shards), made segment sums by ``reduction``
    (one ``all_reduce`` over the mesh), the same rule, a per-tensor combine. ``weights`` counts
    replicated gradients once."""
    device = adversarial[0].device
    acc = coefficient_dtype(device)
    per_tensor = _tensor_sums(adversarial, clean, acc)
    if weights is not None:
        per_tensor = per_tensor * torch.tensor(list(weights), dtype=acc, device=device)[:, None]
    ids = (torch.tensor(list(segment_ids), device=device) if torch.compiler.is_compiling()  # a graph constant
           else index_tensor(segment_ids, device))
    gram = reduction.segment_sums(per_tensor, ids, num_segments)
    floor, doubt = rule_settings([a.dtype for a in adversarial])
    k, stats = packed_rule(gram, clip_norm=clip_norm, floor=floor, doubt=doubt)
    if out is NO_OUTPUT:
        return [], stats
    per_item = k.index_select(0, ids)
    results = []
    for i, (a, c) in enumerate(zip(adversarial, clean, strict=True)):
        work = row_dtype(a.dtype)
        r = a.to(work) * per_item[i, 0]
        if c is not None:
            r = r + c.to(work) * per_item[i, 1]
        if out is None:
            results.append(r.to(a.dtype))
        else:
            results.append(out[i].copy_(r))
    return results, stats
