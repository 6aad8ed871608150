"""``fused="compile"`` (opt-in): the accelerator schedule on the same flat rows, through ``torch.compile``.

The chunk sums as ``(a * a).sum(1)`` and friends (inductor reads each row once for all three),
the segment sums and the rule (:func:`~agr_optim._geometry.packed_rule`, fused into a few small
kernels) and the combine as one expression (one pass: read ``a`` and ``c``, write ``r``).
Compiled on first use (tens of seconds on CPU) and again for a new layout (shapes, dtypes) or a
new ``clip_norm`` (the floats are specialised; past torch's recompile limit it falls back to
eager). Like the eager schedule (:mod:`._device`) it never reads a value back: out-of-range
segments keep their clipped adversarial gradient (``stats.out_of_range``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._device import on_rows, rule_settings
from ._flat import Layout
from ._geometry import coefficient_dtype, packed_rule
from ._stats import ReconstructionStats


def _rows_compilable(
    adversarial: list[Tensor],
    clean: list[Tensor],
    shapes: list[tuple[int, int]],
    gathers: list[Tensor],
    widths: list[int],
    chunk_segments: list[Tensor],
    num_segments: int,
    acc: torch.dtype,
    clip_norm: float | None,
    settings: dict[str, float],
) -> ReconstructionStats:
    gram = None
    for a_row, c_row, shape, gather, width in zip(adversarial, clean, shapes, gathers, widths, strict=True):
        a, c = a_row.view(shape).to(acc), c_row.view(shape).to(acc)
        dot = (a * c).sum(1)  # the last chunk is padding: its sums pad the gather
        chunks = torch.stack([(a * a).sum(1), dot, dot, (c * c).sum(1)], 1)
        part = chunks.index_select(0, gather.view(-1)).view(num_segments, width, 4).sum(1)
        gram = part if gram is None else gram + part.to(gram.device)
    assert gram is not None
    k, stats = packed_rule(gram, clip_norm=clip_norm, **settings)
    for a_row, c_row, shape, chunk_segment in zip(adversarial, clean, shapes, chunk_segments, strict=True):
        per_chunk = k.to(a_row.device).index_select(0, chunk_segment)
        a, c = a_row.view(shape), c_row.view(shape)
        a.copy_(a.to(acc) * per_chunk[:, :1] + c.to(acc) * per_chunk[:, 1:])  # one pass, rounded once
    return stats


_compiled_kernel: object = None


def reconstruct_rows_compiled(
    layout: Layout,
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
) -> ReconstructionStats:
    """:func:`~agr_optim._device.reconstruct_rows` through ``torch.compile`` (compiled once per
    process, recompiled per layout)."""
    global _compiled_kernel
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(_rows_compilable, dynamic=False)
    ids = tuple(segment_ids)
    maps = [b.segment_maps(ids, num_segments) for b in layout.buckets]
    settings = rule_settings([b.dtype for b in layout.buckets], max(b.chunk for b in layout.buckets))
    return _compiled_kernel(  # type: ignore[operator, no-any-return]
        list(adversarial), list(clean), [(b.num_chunks + 1, b.chunk) for b in layout.buckets],
        [m.gather for m in maps], [m.width for m in maps], [m.chunk_segment for m in maps], num_segments,
        coefficient_dtype(layout.buckets[0].device), clip_norm, settings,
    )


def reconstruct_compiled(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """The functional form (:func:`~agr_optim._device.on_rows`); statistics alone are computed
    eagerly (no kernel to compile)."""
    return on_rows(reconstruct_rows_compiled, adversarial, clean, segment_ids=segment_ids,
                   num_segments=num_segments, clip_norm=clip_norm, out=out)
