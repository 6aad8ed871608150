"""DTensor gradients (FSDP2 ``fully_shard``, tensor parallel): global sums from local shards.

A rank holds only its shard of each gradient, so a cosine taken of the shard would be a
different (wrong) algorithm. Here every rank reduces its local shards to the three sums of
each segment, ``<a,c>``, ``|a|^2``, ``|c|^2``, and one ``all_reduce`` of the ``[3, S]`` tensor
(per sharded mesh dimension: one for FSDP2) makes them global; the coefficients that follow
are then identical on all ranks, and each rank combines its own shards in place.

Both ``fused=True`` and ``fused=False`` come here for DTensors. ``fused=True`` sums the
gradients as they are (one collective) and, on CPU, redoes the sums scaled when they fall
outside the float32 range, like the fused path; ``fused=False`` always sums ``a/s, c/s`` with
``s`` the global largest magnitude of the segment (one more collective), like the loop.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from ._geometry import (
    accumulation_dtype,
    coefficient_dtype,
    coefficients,
    combine_rounding,
    narrowest_accumulation_dtype,
    sum_error,
)
from ._stats import ReconstructionStats


def is_dtensor(t: object) -> bool:
    # No DTensor exists unless its module was imported: this keeps the ~1 s import of
    # torch.distributed.tensor out of `import agr_optim`, and traces under torch.compile.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place ops write into the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def validate_dtensors(adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]) -> bool:
    """Whether the gradients are DTensors; all or none may be, on one mesh, pairwise alike."""
    flags = [is_dtensor(a) for a in adversarial] + [is_dtensor(c) for c in clean if c is not None]
    if not any(flags):
        return False
    if not all(flags):
        plain = next(i for i, a in enumerate(adversarial) if not is_dtensor(a)) if not all(
            is_dtensor(a) for a in adversarial
        ) else next(i for i, c in enumerate(clean) if c is not None and not is_dtensor(c))
        raise ValueError(
            "DTensor and plain tensor gradients are mixed (the first plain one at index "
            f"{plain}): AGR needs every gradient sharded by the same parallelism (e.g. fully_shard the "
            "whole model) so that its sums are global"
        )
    from torch.distributed.tensor import Replicate, Shard

    mesh = adversarial[0].device_mesh  # type: ignore[attr-defined]
    for i, (a, c) in enumerate(zip(adversarial, clean, strict=True)):
        if a.device_mesh != mesh:  # type: ignore[attr-defined]
            raise ValueError(f"adversarial[{i}] is on another device mesh than adversarial[0]")
        if any(not isinstance(p, (Shard, Replicate)) for p in a.placements):  # type: ignore[attr-defined]
            raise ValueError(
                f"adversarial[{i}] has placements {a.placements}; AGR needs reduced gradients "  # type: ignore[attr-defined]
                "(Shard or Replicate), not Partial"
            )
        if c is not None and (c.device_mesh != mesh or c.placements != a.placements):  # type: ignore[attr-defined]
            raise ValueError(
                f"placement mismatch at index {i}: adversarial {a.placements}, clean {c.placements}"  # type: ignore[attr-defined]
            )
    return True


def reconstruct_dtensor(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    fused: bool,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = adversarial[0].device_mesh  # type: ignore[attr-defined]
    local_a = [a.to_local() for a in adversarial]  # type: ignore[attr-defined]
    local_c = [None if c is None else c.to_local() for c in clean]  # type: ignore[attr-defined]
    device = local_a[0].device
    dtype = coefficient_dtype(device)
    ids = torch.tensor(list(segment_ids), device=device)
    # Mesh dimensions some gradient is sharded on are summed over; a gradient replicated on
    # such a dimension is counted once (weight 1/replicas).
    placements = [a.placements for a in adversarial]  # type: ignore[attr-defined]
    dims = [d for d in range(mesh.ndim) if any(isinstance(p[d], Shard) for p in placements)]
    weights = [
        1.0 / math.prod(mesh.size(d) for d in dims if isinstance(p[d], Replicate)) for p in placements
    ]

    def all_reduce(t: Tensor, op: torch.distributed.ReduceOp.RedOpType) -> Tensor:
        for d in dims:
            torch.distributed.all_reduce(t, op=op, group=mesh.get_group(d))
        return t

    def segment_sums(scale: Tensor | None) -> Tensor:
        """``[3, S]``: the global ``<a,c>``, ``|a|^2``, ``|c|^2`` of ``a/s``, ``c/s``."""
        per_tensor = torch.zeros(3, len(local_a), dtype=dtype, device=device)
        for i, (a, c) in enumerate(zip(local_a, local_c, strict=True)):
            # Sums of bf16/fp16 in float32: a bf16 accumulator loses the sign of small cosines.
            acc = accumulation_dtype(a.dtype)
            a = a.reshape(-1).to(acc)
            c = None if c is None else c.reshape(-1).to(acc)
            if scale is not None:
                s = scale[segment_ids[i]].to(acc)
                a = a / s
                c = None if c is None else c / s
            per_tensor[1, i] = torch.dot(a, a)
            if c is not None:
                per_tensor[0, i] = torch.dot(a, c)
                per_tensor[2, i] = torch.dot(c, c)
        if any(w != 1.0 for w in weights):
            per_tensor *= torch.tensor(weights, dtype=dtype, device=device)
        sums = torch.zeros(3, num_segments, dtype=dtype, device=device).index_add_(1, ids, per_tensor)
        return all_reduce(sums, torch.distributed.ReduceOp.SUM)

    def global_scale() -> Tensor:
        """Largest magnitude of each segment over all ranks; 1 where that is 0 or not finite."""
        amax = torch.zeros(len(local_a), dtype=dtype, device=device)
        for i, (a, c) in enumerate(zip(local_a, local_c, strict=True)):
            for g in (a, c):
                if g is not None and g.numel() > 0:
                    amax[i] = torch.maximum(amax[i], g.abs().amax().to(dtype))
        segment_max = torch.zeros(num_segments, dtype=dtype, device=device).scatter_reduce_(
            0, ids, amax, reduce="amax"
        )
        segment_max = all_reduce(segment_max, torch.distributed.ReduceOp.MAX)
        return torch.where(segment_max.isfinite() & (segment_max > 0), segment_max, 1.0)

    scale = None if fused else global_scale()
    dot, sq_a, sq_c = segment_sums(scale)
    if fused and device.type == "cpu" and not torch.compiler.is_compiling():
        # The same decision on every rank (the sums are global), so all enter the rescue.
        low = torch.finfo(narrowest_accumulation_dtype(a.dtype for a in local_a)).tiny * 2.0**48
        small = lambda x: (x > 0) & (x < low)  # noqa: E731
        suspect = ~(dot.isfinite() & sq_a.isfinite() & sq_c.isfinite()) | small(sq_a) | small(sq_c)
        suspect |= small(sq_a * sq_c)
        if bool(suspect.any()):
            scale = global_scale()
            dot, sq_a, sq_c = segment_sums(scale)
    rounding = combine_rounding(a.dtype for a in local_a)
    # Ill-conditioned projections clip by a safe bound here (no exact second pass over shards).
    numels = [0] * num_segments
    for g, segment in zip(adversarial, segment_ids, strict=True):
        numels[segment] += g.numel()
    error = sum_error(local_a[0].dtype, max(numels, default=1))
    k = coefficients(dot, sq_a, sq_c, scale=scale, clip_norm=clip_norm, rounding=rounding, sum_error=error)
    k_a, k_c = k.adversarial[ids], k.clean[ids]
    results: list[Tensor] = []
    for i, (a, c) in enumerate(zip(local_a, local_c, strict=True)):
        # Combine in float32 at least, round once to the gradient's dtype.
        acc = accumulation_dtype(a.dtype)
        r = a.to(acc) * k_a[i].to(acc)
        if c is not None:
            r = r + c.to(acc) * k_c[i].to(acc)
        if out is not None:
            local_tensor(out[i]).copy_(r)
            results.append(out[i])
        else:
            g = adversarial[i]
            results.append(
                DTensor.from_local(
                    r.to(a.dtype), mesh, g.placements, shape=g.shape, stride=g.stride()  # type: ignore[attr-defined]
                )
            )
    return results, k.stats
