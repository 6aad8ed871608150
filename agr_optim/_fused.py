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
    """Eager CPU: per block, the sums, the rule on floats with the exact repairs, the combine."""
    rounding, error = budget(adversarial, segment_ids, num_segments, reduction)
    floor = range_floor(narrowest_accumulation_dtype(a.dtype for a in adversarial))
    distributed = getattr(reduction, "distributed", False)
    rows: list[Rule] = []
    rescued_rows: list[bool] = []
    results: list[Tensor] = []
    # Collectives need the same blocks on every rank: one block when distributed.
    for start, stop in blocks(adversarial, segment_ids, None if distributed else block):
        adv, cln = adversarial[start:stop], clean[start:stop]
        members_of: dict[int, list[int]] = {}  # segment -> its tensors' indices in the block
        for m in range(stop - start):
            members_of.setdefault(segment_ids[start + m], []).append(m)
        segments = sorted(members_of)
        per_tensor = torch.stack(tensor_sums(adv, cln))  # |a|^2, <a,c>, |c|^2 per tensor
        if distributed:
            position_of = {segment: position for position, segment in enumerate(segments)}
            local_ids = torch.tensor([position_of[segment_ids[start + m]] for m in range(stop - start)])
            per = _weighted(per_tensor.view(-1, 3).to(torch.float64), weights)
            totals = reduction.segment_sums(per, local_ids.to(per.device), len(segments)).tolist()
        else:
            flat = per_tensor.tolist()
            totals = [[sum(flat[3 * m + j] for m in members_of[s]) for j in range(3)] for s in segments]
        suspect = [out_of_range(dot, sq_a, sq_c, floor) for sq_a, dot, sq_c in totals]
        underflowed_to_zero(suspect, totals, [members_of[s] for s in segments], adv, cln, reduction)
        k_a = [0.0] * (stop - start)
        k_c = [0.0] * (stop - start)
        exact: list[tuple[list[int], Rule, float]] = []
        for position, segment in enumerate(segments):
            members = members_of[segment]
            sq_a, dot, sq_c = totals[position]
            scale_a = scale_c = 1.0
            if suspect[position]:
                dot, sq_a, sq_c, scale_a, scale_c = scaled_sums(
                    [adv[m] for m in members], [cln[m] for m in members], reduction=reduction,
                    weights=None if weights is None else [weights[start + m] for m in members],
                )
            sums = dict(scale_a=scale_a, scale_c=scale_c, ops=FloatOps)
            r = rule(dot, sq_a, sq_c, clip_norm=clip_norm, rounding=rounding, sum_error=error, **sums)
            if clip_norm is not None and ill_conditioned(r.cosine, r.projected):
                unclipped = rule(dot, sq_a, sq_c, clip_norm=None, **sums)
                norm = _explicit_norm([adv[m] for m in members], [cln[m] for m in members], unclipped, scale_a,
                                      scale_c, reduction,
                                      None if weights is None else [weights[start + m] for m in members])
                r = rule(dot, sq_a, sq_c, clip_norm=clip_norm, rounding=rounding, exact_norm=norm, **sums)
            rows.append(r)
            rescued_rows.append(suspect[position])
            # Rescued segments, and coefficients that float32 cannot hold (the fast combine
            # rounds them to float32 for float32/bf16/fp16 gradients): combined in float64.
            if suspect[position] or (
                any(adv[m].dtype != torch.float64 for m in members)
                and not (_fits_float32(r.adversarial) and _fits_float32(r.clean))
            ):
                exact.append((members, r, scale_c))
            for m in members:
                k_a[m], k_c[m] = r.adversarial, r.clean
        if out is NO_OUTPUT:
            continue
        exact_members = {m for members, _, _ in exact for m in members}
        plain = [m for m in range(stop - start) if m not in exact_members]
        block_out: list[Tensor | None] = [None] * (stop - start)
        if plain:
            done = combine([adv[m] for m in plain], [cln[m] for m in plain], [k_a[m] for m in plain],
                           [k_c[m] for m in plain], None if out is None else [out[start + m] for m in plain])
            for m, r in zip(plain, done, strict=True):
                block_out[m] = r
        for members, r, scale_c in exact:
            done = combine_exact([adv[m] for m in members], [cln[m] for m in members], r.adversarial,
                                 r.clean_scaled, scale_c, None if out is None else [out[start + m] for m in members])
            for m, t in zip(members, done, strict=True):
                block_out[m] = t
        results += block_out  # type: ignore[arg-type]
    return results, _stats_from_floats(rows, rescued_rows)


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
