r"""The accelerator schedule (``fused=True`` off CPU, ``fused="device"`` anywhere): flat rows, a
fixed number of kernels, no host synchronisation.

Per step, whatever the number of parameter tensors (:mod:`._flat` holds the rows):

1. the chunk sums: ``|a|`` and ``|c|`` of every chunk by ``linalg.vector_norm`` and ``<a,c>`` from
   the products, reduced in the rows' dtype over at most ``B`` elements (a reduction into float64
   would first copy the whole row to float64: twice the memory and traffic);
2. the segment sums: the chunks of each segment gathered by a cached index and added in float64;
3. the rule on ``[S]`` tensors (:func:`~agr_optim._geometry.packed_rule`, about 25 kernels);
4. the combine ``a <- k_a a + k_c c``, each chunk by its segment's coefficients (two kernels).

Nothing is read back to the host: out-of-range segments (a norm below
:func:`~agr_optim._gramian.range_floor`, where squares of elements may be subnormal) keep their
clipped adversarial gradient, non-finite sums (a float32 chunk's squares above ~3e38, or an
overflowing product) give NaN, and ``stats.out_of_range`` says where. DTensor shards keep a
per-tensor schedule (:func:`reconstruct_device_tensors`) whose sums are reduced over the mesh; it
feeds the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._flat import Layout, index_tensor, layout_of, row_dtype
from ._geometry import (
    coefficient_dtype,
    combine_rounding,
    narrowest_accumulation_dtype,
    packed_doubt,
    packed_rule,
    sum_error,
)
from ._gramian import LOCAL, Reduction, range_floor
from ._stats import NO_OUTPUT, ReconstructionStats

__all__ = [
    "reconstruct_device", "reconstruct_rows", "on_rows", "result_rows", "rule_settings", "reconstruct_device_tensors",
]


def rule_settings(dtypes: Sequence[torch.dtype], chunk: int) -> dict[str, float]:
    """The settings of :func:`~agr_optim._geometry.packed_rule` for rows of gradients of
    ``dtypes`` summed in chunks of ``chunk`` elements: those of the narrowest row dtype (float32
    unless every gradient is float64). The underflow probe: float32 products are at least about
    1e-45 and sums at most about 1e43, so 1e-120 <a,c>^2 lies between 0 and the floor (float64's
    range is too wide for one probe: none; its squares underflow only below ~1e-162)."""
    acc = narrowest_accumulation_dtype(dtypes)
    rounding = combine_rounding(dtypes)
    return {"floor": range_floor(acc), "doubt": packed_doubt(sum_error(acc, chunk), rounding), "rounding": rounding,
            "probe": 1e-120 if acc == torch.float32 else 0.0}


def _chunk_sums(bucket_matrix_a: Tensor, bucket_matrix_c: Tensor, acc: torch.dtype) -> Tensor:
    """``[K + 1, 3]`` in ``acc``: per chunk ``|a|^2, <a,c>, |c|^2`` (the last chunk is padding:
    zeros). Reduced in the rows' dtype (a reduction to another dtype would copy the whole row),
    then widened: the chunks of a segment are added in ``acc``."""
    sums = torch.empty(bucket_matrix_a.shape[0], 3, dtype=bucket_matrix_a.dtype, device=bucket_matrix_a.device)
    torch.linalg.vector_norm(bucket_matrix_a, dim=1, out=sums[:, 0])
    torch.linalg.vector_norm(bucket_matrix_c, dim=1, out=sums[:, 2])
    sums[:, 0::2].square_()
    torch.sum(bucket_matrix_a * bucket_matrix_c, 1, out=sums[:, 1])
    return sums.to(acc)


_SYMMETRIC: dict[torch.device, Tensor] = {}


def _symmetric(device: torch.device) -> Tensor:
    """``[1, 4]``: columns ``0, 1, 1, 2`` of ``|a|^2, <a,c>, |c|^2``, the Gramian row by row
    (made once per device)."""
    if device not in _SYMMETRIC:
        _SYMMETRIC[device] = torch.tensor([[0, 1, 1, 2]], device=device)
    return _SYMMETRIC[device]


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
        # The chunks of each segment, and the columns of its Gramian row by row, in one gather.
        part = chunks[m.gather, _symmetric(bucket.device)].view(num_segments, m.width, 4).sum(1)
        sums = part if sums is None else sums + part.to(device=device, dtype=acc)
    assert sums is not None
    settings = rule_settings([b.dtype for b in layout.buckets], max(b.chunk for b in layout.buckets))
    k, stats = packed_rule(sums, clip_norm=clip_norm, **settings)
    if combine:
        for bucket, m, a_row, c_row in zip(layout.buckets, maps, adversarial, clean, strict=True):
            # In the rows' dtype (one rounding, as the host schedule's combine): mixed dtypes
            # would make CPU kernels widen whole rows into temporaries.
            per_chunk = k.to(device=bucket.device, dtype=a_row.dtype).index_select(0, m.chunk_segment)
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
    """``rows`` in their gradients' dtypes: float32 rows of bf16/fp16 gradients rounded once (into
    normal tensors even under ``inference_mode``, as :meth:`~agr_optim._flat.Bucket.new_row`)."""
    with torch.inference_mode(False):
        return [row if row.dtype == b.dtype else row.to(b.dtype) for b, row in zip(layout.buckets, rows, strict=True)]


def _tensor_sums(adversarial: Sequence[Tensor], clean: Sequence[Tensor | None], acc: torch.dtype) -> Tensor:
    """``[T, 4]`` per-tensor ``|a|^2, <a,c>, <a,c>, |c|^2`` with the numerics of the chunk sums."""
    rows = []
    zero = None
    for a, c in zip(adversarial, clean, strict=True):
        work = row_dtype(a.dtype)
        a_flat = a.reshape(-1).to(work)
        sq_a = torch.linalg.vector_norm(a_flat).to(acc).square()
        if c is None:
            if zero is None:
                zero = torch.zeros((), dtype=acc, device=a.device)
            rows.append(torch.stack([sq_a, zero, zero, zero]))
            continue
        c_flat = c.reshape(-1).to(work)
        dot = torch.sum(a_flat * c_flat).to(acc)
        rows.append(torch.stack([sq_a, dot, dot, torch.linalg.vector_norm(c_flat).to(acc).square()]))
    return torch.stack(rows)


_WEIGHTS: dict[tuple[object, ...], Tensor] = {}


def _weights(weights: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[T, 1]`` replica weights on the device, made once per list (under tracing: a constant)."""
    if torch.compiler.is_compiling():
        return torch.tensor(weights, dtype=dtype, device=device)[:, None]
    key = (dtype, device, *weights)
    if key not in _WEIGHTS:
        if len(_WEIGHTS) > 32:
            _WEIGHTS.clear()
        _WEIGHTS[key] = torch.tensor(weights, dtype=dtype, device=device)[:, None]
    return _WEIGHTS[key]


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
    if weights is not None:  # a cached device tensor: no host-to-device copy per step
        per_tensor = per_tensor * _weights(tuple(weights), acc, device)
    ids = (torch.tensor(list(segment_ids), device=device) if torch.compiler.is_compiling()  # a graph constant
           else index_tensor(segment_ids, device))
    gram = reduction.segment_sums(per_tensor, ids, num_segments)
    settings = rule_settings([a.dtype for a in adversarial], max([1, *(a.numel() for a in adversarial)]))
    k, stats = packed_rule(gram, clip_norm=clip_norm, **settings)
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
