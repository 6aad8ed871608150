"""The CPU schedule of the fused path (``fused=True`` on eager CPU): :func:`reconstruct_host`.

Block by block of about ``_BLOCK`` elements: the per-tensor sums (:mod:`._gramian`), the rule on
Python floats per segment (:func:`~agr_optim._geometry.rule`; reading a CPU value back costs
nothing) and the combine (:mod:`._combine`), so that the combine finds the block's gradients still
in the cache. Host reads also make the exact repairs free: a segment whose sums left the accurate
range is summed again, scaled, in float64 and combined exactly; an ill-conditioned projected
segment is clipped by the norm of its explicit ``r``. The accelerator schedule, which may not read
anything back, is :mod:`._device`.

It takes a ``reduction`` (:class:`~agr_optim._gramian.Reduction`): DTensor shards run the same
code on their local tensors, with one ``all_reduce`` of the sums (``_distributed.py``).

Why ``torch.dot`` and not ``torch._foreach_norm``: on CPU the norm kernels are compute bound
(about 30 GB/s on one of these cores, whether the data is in the cache or not) while ``dot``
runs at memory speed and several times faster on cached data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._combine import combine, combine_exact
from ._geometry import (
    FloatOps,
    Rule,
    combine_rounding,
    ill_conditioned,
    narrowest_accumulation_dtype,
    rule,
    sum_error,
)
from ._gramian import (
    LOCAL,
    Reduction,
    out_of_range,
    power_of_two_at_least,
    range_floor,
    scaled_sums,
    tensor_sums,
    underflowed_to_zero,
)
from ._stats import NO_OUTPUT, ReconstructionStats

#: Elements per block of the CPU path: a block's ``a`` and ``c`` (4 MiB of float32) are
#: summed and then combined while they are still in the cache. Measured on a 2-core EPYC
#: (32 MiB L3), in-place reconstruction of PreActResNet-18 gradients: 9.6 ms with 0.5M-element
#: blocks, 10.2 ms with 1M, 10.6 ms as one block.
_BLOCK = 1 << 19


def blocks(adversarial: Sequence[Tensor], segment_ids: Sequence[int], size: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` runs of whole segments of about ``size`` elements (a segment never
    straddles two blocks; ids that are not non-decreasing by steps of 0 or 1, or ``size=None``,
    make one block)."""
    n = len(adversarial)
    if size is None or any(segment_ids[i + 1] not in (segment_ids[i], segment_ids[i] + 1) for i in range(n - 1)):
        return [(0, n)]
    out: list[tuple[int, int]] = []
    start, total = 0, 0
    for i in range(n):
        total += adversarial[i].numel()
        if i + 1 == n or (total >= size and segment_ids[i + 1] != segment_ids[i]):
            out.append((start, i + 1))
            start, total = i + 1, 0
    return out


def budget(
    adversarial: Sequence[Tensor], segment_ids: Sequence[int], num_segments: int, reduction: Reduction = LOCAL
) -> tuple[float, float]:
    """The combine's rounding and the sums' error allowance of the largest segment (floats: no
    sync); shards count with their global sizes."""
    sizes = [0] * num_segments
    numels = getattr(reduction, "numels", None) or [a.numel() for a in adversarial]
    for numel, segment in zip(numels, segment_ids, strict=True):
        sizes[segment] += numel
    dtypes = [a.dtype for a in adversarial]
    return combine_rounding(dtypes), sum_error(narrowest_accumulation_dtype(dtypes), max(sizes, default=1))


def _weighted(per_tensor: Tensor, weights: Sequence[float] | None) -> Tensor:
    if weights is None:
        return per_tensor
    return per_tensor * torch.tensor(list(weights), dtype=per_tensor.dtype, device=per_tensor.device)[:, None]


@dataclass(frozen=True)
class _Block:
    """A run of whole segments: its tensors (positions ``start`` on) and each segment's members
    (positions in the block), segments in order."""

    start: int
    adversarial: Sequence[Tensor]
    clean: Sequence[Tensor | None]
    members: dict[int, list[int]]
    weights: Sequence[float] | None  # per tensor of the block (DTensor replicas counted once)

    @property
    def segments(self) -> list[int]:
        return sorted(self.members)

    def tensors(self, segment: int) -> tuple[list[Tensor], list[Tensor | None], list[float] | None]:
        members = self.members[segment]
        weights = None if self.weights is None else [self.weights[m] for m in members]
        return [self.adversarial[m] for m in members], [self.clean[m] for m in members], weights


class _Coefficients(NamedTuple):
    """One segment's rule, and how to combine it: ``exact`` in float64 (rescued sums, or
    coefficients float32 cannot hold), with ``scale_c`` the clean gradient's scale."""

    segment: int
    members: list[int]
    rule: Rule
    scale_c: float
    exact: bool
    rescued: bool


def reconstruct_host(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
    reduction: Reduction = LOCAL,
    weights: Sequence[float] | None = None,
    block: int = _BLOCK,
) -> tuple[list[Tensor], ReconstructionStats]:
    """Eager CPU: per block, the sums (:func:`_block_sums`), the rule on floats with the exact
    repairs (:func:`_segment_coefficients`), the combine (:func:`_combine_block`)."""
    rounding, error = budget(adversarial, segment_ids, num_segments, reduction)
    floor = range_floor(narrowest_accumulation_dtype(a.dtype for a in adversarial))
    distributed = getattr(reduction, "distributed", False)
    found: list[_Coefficients] = []
    results: list[Tensor] = []
    # Collectives need the same blocks on every rank: one block when distributed.
    for start, stop in blocks(adversarial, segment_ids, None if distributed else block):
        members: dict[int, list[int]] = {}
        for m in range(stop - start):
            members.setdefault(segment_ids[start + m], []).append(m)
        part = _Block(start, adversarial[start:stop], clean[start:stop], members,
                      None if weights is None else weights[start:stop])
        totals, suspect = _block_sums(part, reduction, floor)
        coefficients = [
            _segment_coefficients(part, segment, totals[position], suspect[position], reduction, clip_norm=clip_norm,
                                  rounding=rounding, error=error)
            for position, segment in enumerate(part.segments)
        ]
        found += coefficients
        if out is not NO_OUTPUT:
            results += _combine_block(part, coefficients, None if out is None else out[start:stop])
    return results, _stats_from_floats([c.rule for c in found], [c.rescued for c in found])


def _block_sums(part: _Block, reduction: Reduction, floor: float) -> tuple[list[list[float]], list[bool]]:
    """Each segment's totals ``|a|^2, <a,c>, |c|^2`` (summed over the mesh when distributed) and
    whether they may be inexact (out of range, or squares that underflowed to zero)."""
    segments = part.segments
    per_tensor = torch.stack(tensor_sums(part.adversarial, part.clean))  # |a|^2, <a,c>, |c|^2 per tensor
    if getattr(reduction, "distributed", False):
        position = {m: segments.index(s) for s, ms in part.members.items() for m in ms}  # in the block's order
        local_ids = torch.tensor([position[m] for m in range(len(part.adversarial))])
        per = _weighted(per_tensor.view(-1, 3).to(torch.float64), part.weights)
        totals = reduction.segment_sums(per, local_ids.to(per.device), len(segments)).tolist()
    else:
        flat = per_tensor.tolist()
        totals = [[sum(flat[3 * m + j] for m in part.members[s]) for j in range(3)] for s in segments]
    suspect = [out_of_range(dot, sq_a, sq_c, floor) for sq_a, dot, sq_c in totals]
    underflowed_to_zero(suspect, totals, [part.members[s] for s in segments], part.adversarial, part.clean, reduction)
    return totals, suspect


def _segment_coefficients(
    part: _Block,
    segment: int,
    totals: list[float],
    suspect: bool,
    reduction: Reduction,
    *,
    clip_norm: float | None,
    rounding: float,
    error: float,
) -> _Coefficients:
    """The rule on one segment's floats, with the exact repairs a host read makes free: suspect
    sums redone scaled in float64, an ill-conditioned projection clipped by its explicit norm."""
    a, c, weights = part.tensors(segment)
    sq_a, dot, sq_c = totals
    scale_a = scale_c = 1.0
    if suspect:
        dot, sq_a, sq_c, scale_a, scale_c = scaled_sums(a, c, reduction=reduction, weights=weights)
    r = rule(dot, sq_a, sq_c, scale_a=scale_a, scale_c=scale_c, clip_norm=clip_norm, rounding=rounding,
             sum_error=error, ops=FloatOps)
    if clip_norm is not None and ill_conditioned(r.cosine, r.projected):
        unclipped = rule(dot, sq_a, sq_c, scale_a=scale_a, scale_c=scale_c, clip_norm=None, ops=FloatOps)
        norm = _explicit_norm(a, c, unclipped, scale_a, scale_c, reduction, weights)
        r = rule(dot, sq_a, sq_c, scale_a=scale_a, scale_c=scale_c, clip_norm=clip_norm, rounding=rounding,
                 exact_norm=norm, ops=FloatOps)
    # Rescued segments, and coefficients that float32 cannot hold (the fast combine rounds them
    # to float32 for float32/bf16/fp16 gradients): combined in float64.
    exact = suspect or (
        any(t.dtype != torch.float64 for t in a) and not (_fits_float32(r.adversarial) and _fits_float32(r.clean))
    )
    return _Coefficients(segment, part.members[segment], r, scale_c, exact, suspect)


def _combine_block(part: _Block, coefficients: list[_Coefficients], out: Sequence[Tensor] | None) -> list[Tensor]:
    """The block's results: the fast multi-tensor combine, and float64 for the exact segments."""
    block_out: list[Tensor | None] = [None] * len(part.adversarial)
    plain = [(m, c.rule) for c in coefficients if not c.exact for m in c.members]
    if plain:
        positions = [m for m, _ in plain]
        done = combine([part.adversarial[m] for m in positions], [part.clean[m] for m in positions],
                       [r.adversarial for _, r in plain], [r.clean for _, r in plain],
                       None if out is None else [out[m] for m in positions])
        for m, t in zip(positions, done, strict=True):
            block_out[m] = t
    for c in coefficients:
        if c.exact:
            a, cl, _ = part.tensors(c.segment)
            done = combine_exact(a, cl, c.rule.adversarial, c.rule.clean_scaled, c.scale_c,
                                 None if out is None else [out[m] for m in c.members])
            for m, t in zip(c.members, done, strict=True):
                block_out[m] = t
    return block_out  # type: ignore[return-value]


_FLOAT32 = torch.finfo(torch.float32)


def _fits_float32(k: float) -> bool:
    """Whether a coefficient keeps its value rounded to float32 (0, or a normal float32)."""
    return k == 0.0 or (_FLOAT32.tiny <= abs(k) <= _FLOAT32.max / 2) or math.isnan(k)


def _explicit_norm(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    r: Rule,
    scale_a: float,
    scale_c: float,
    reduction: Reduction,
    weights: Sequence[float] | None,
) -> float:
    """``|k_a a + k_c c| / max(s_a, s_c)`` of one segment (the unit of the rule's
    ``exact_norm``), written out in float64 with ``c`` taken as ``c / s_c``: nothing overflows."""
    m = max(scale_a, scale_c)
    explicit = []
    for a, c in zip(adversarial, clean, strict=True):
        x = a.to(torch.float64).reshape(-1) * (r.adversarial / m)
        if c is not None:
            x += (c.to(torch.float64).reshape(-1) / scale_c) * (r.clean_scaled / m)
        explicit.append(x)
    # Squares of x / s_r, with s_r the largest magnitude (over all ranks): none underflows.
    ids = torch.zeros(len(explicit), dtype=torch.long, device=explicit[0].device)
    largest = torch.stack([x.abs().amax() if x.numel() else torch.zeros((), dtype=x.dtype) for x in explicit])
    s_r = power_of_two_at_least(reduction.segment_max(largest, ids, 1)[0])
    per_tensor = _weighted(torch.stack([torch.dot(x / s_r, x / s_r) for x in explicit])[:, None], weights)
    return math.sqrt(reduction.segment_sums(per_tensor, ids, 1).item()) * s_r.item()


def _stats_from_floats(rows: list[Rule], out_of_range_rows: list[bool]) -> ReconstructionStats:
    def column(name: str) -> Tensor:
        return torch.tensor([getattr(r, name) for r in rows], dtype=torch.float64)

    return ReconstructionStats(
        cosine=column("cosine"),
        projected=torch.tensor([r.projected for r in rows], dtype=torch.bool),
        norm_adversarial=column("norm_adversarial"),
        norm_clean=column("norm_clean"),
        norm_reconstructed=column("norm_reconstructed"),
        clip_scale=column("clip_scale"),
        out_of_range=torch.tensor(out_of_range_rows, dtype=torch.bool),
    )
