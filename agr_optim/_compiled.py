"""``fused="compile"`` (opt-in): the device schedule written for ``torch.compile``.

The sums as ``(a * c).sum()`` and friends, which inductor fuses into one loop per tensor reading
``a`` and ``c`` once, the coefficients by the device schedule's own
:func:`~agr_optim._fused.device_coefficients`, and the combine as one expression per tensor (one
loop: read ``a`` and ``c``, write ``r``). Compiled on first use (tens of seconds on CPU) and again
for new shapes, dtypes or ``clip_norm`` values (the floats are specialised; past torch's recompile
limit it falls back to eager). Like the eager device schedule it never reads a value back: out-of-range
segments keep only their adversarial gradient (``stats.out_of_range``), ill-conditioned
projections are clipped by a safe bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._fused import budget, device_coefficients, reconstruct_device
from ._geometry import narrowest_accumulation_dtype, stats_of
from ._gramian import LOW_PRECISION, range_floor
from ._stats import NO_OUTPUT, ReconstructionStats


def _fused_compilable(
    adversarial: list[Tensor],
    clean: list[Tensor | None],
    ids: Tensor | None,
    num_segments: int,
    clip_norm: float | None,
    rounding: float,
    error: float,
    floor: float,
    inplace: bool,
) -> tuple[list[Tensor], ReconstructionStats]:
    sums = []
    for a, c in zip(adversarial, clean, strict=True):
        a = a.float() if a.dtype in LOW_PRECISION else a
        if c is None:
            sums.append(torch.stack([(a * a).sum(), torch.zeros_like(a.sum()), torch.zeros_like(a.sum())]))
        else:
            c = c.float() if c.dtype in LOW_PRECISION else c
            sums.append(torch.stack([(a * a).sum(), (a * c).sum(), (c * c).sum()]))
    r, suspect = device_coefficients(torch.stack(sums), ids, num_segments, clip_norm=clip_norm, rounding=rounding,
                                     error=error, floor=floor)
    k_a = r.adversarial if ids is None else r.adversarial[ids]
    k_c = r.clean if ids is None else r.clean[ids]
    results = []
    for i, (a, c) in enumerate(zip(adversarial, clean, strict=True)):
        work = torch.float32 if a.dtype in LOW_PRECISION else a.dtype
        out = a.to(work) * k_a[i].to(work)
        if c is not None:
            out = out + c.to(work) * k_c[i].to(work)
        results.append(a.copy_(out) if inplace else out.to(a.dtype))
    return results, stats_of(r, suspect)


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
    """:func:`_fused_compilable` through ``torch.compile`` (the kernel is compiled once per process)."""
    global _compiled_kernel
    if out is NO_OUTPUT:  # statistics only: the same coefficients, eagerly, no kernel to compile
        return reconstruct_device(adversarial, clean, segment_ids=segment_ids, num_segments=num_segments,
                                  clip_norm=clip_norm, out=out)
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(_fused_compilable, dynamic=False)
    device = adversarial[0].device
    per_tensor = list(segment_ids) == list(range(num_segments))
    ids = None if per_tensor else torch.tensor(list(segment_ids), device=device)
    rounding, error = budget(adversarial, segment_ids, num_segments)
    floor = range_floor(narrowest_accumulation_dtype(a.dtype for a in adversarial))
    inplace = out is not None and all(o is a for o, a in zip(out, adversarial, strict=True))
    results, stats = _compiled_kernel(  # type: ignore[operator]
        list(adversarial), list(clean), ids, num_segments, clip_norm, rounding, error, floor, inplace
    )
    if out is not None and not inplace:
        for target, r in zip(out, results, strict=True):
            target.copy_(r)
        results = list(out)
    return results, stats
