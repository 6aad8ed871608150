"""DTensor gradients (FSDP2 ``fully_shard``, tensor parallel): global sums from local shards.

A rank holds only its shard of each gradient, so a cosine taken of the shard would be a
different (wrong) algorithm. DTensors therefore run the fused path's own schedules on their
local shards (``_fused.py``), with a :class:`MeshReduction` in place of the local one: the
per-tensor sums become segment sums by one ``all_reduce`` (per sharded mesh dimension: one
for FSDP2), so the coefficients are identical on all ranks and each rank combines its own
shards. On CPU the host schedule's exact repairs (range rescue, exact clipping) work the same
way, with their own collectives, entered by every rank alike since they are decided on the
global sums. Every ``fused`` setting takes this route for DTensors.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from ._gramian import LOCAL
from ._stats import NO_OUTPUT, ReconstructionStats


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


class MeshReduction:
    """Segment sums and maxima over the mesh dimensions some gradient is sharded on."""

    distributed = True

    def __init__(self, mesh: object, dims: Sequence[int], numels: Sequence[int]) -> None:
        self.mesh, self.dims = mesh, list(dims)
        self.numels = list(numels)  # global sizes, for the sums' error allowance

    def _all_reduce(self, t: Tensor, op: object) -> Tensor:
        for d in self.dims:
            torch.distributed.all_reduce(t, op=op, group=self.mesh.get_group(d))  # type: ignore[attr-defined]
        return t

    def segment_sums(self, per_tensor: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        local = LOCAL.segment_sums(per_tensor, ids, num_segments)
        return self._all_reduce(local, torch.distributed.ReduceOp.SUM)

    def segment_max(self, per_tensor: Tensor, ids: Tensor, num_segments: int) -> Tensor:
        local = LOCAL.segment_max(per_tensor, ids, num_segments)
        return self._all_reduce(local, torch.distributed.ReduceOp.MAX)


def reconstruct_dtensor(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
    host_reads: bool,
) -> tuple[list[Tensor], ReconstructionStats]:
    """The fused schedules on the local shards, with sums made global over the mesh."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from ._device import reconstruct_device_tensors
    from ._fused import reconstruct_host

    mesh = adversarial[0].device_mesh  # type: ignore[attr-defined]
    local_a = [a.to_local() for a in adversarial]  # type: ignore[attr-defined]
    local_c = [None if c is None else c.to_local() for c in clean]  # type: ignore[attr-defined]
    # Mesh dimensions some gradient is sharded on are summed over; a gradient replicated on
    # such a dimension is counted once (weight 1/replicas).
    placements = [a.placements for a in adversarial]  # type: ignore[attr-defined]
    dims = [d for d in range(mesh.ndim) if any(isinstance(p[d], Shard) for p in placements)]
    weights = [1.0 / math.prod(mesh.size(d) for d in dims if isinstance(p[d], Replicate)) for p in placements]
    schedule = reconstruct_host if host_reads else reconstruct_device_tensors
    local_out = out if out is None or out is NO_OUTPUT else [local_tensor(t) for t in out]
    results, stats = schedule(
        local_a, local_c, segment_ids=segment_ids, num_segments=num_segments, clip_norm=clip_norm, out=local_out,
        reduction=MeshReduction(mesh, dims, [a.numel() for a in adversarial]),
        weights=None if all(w == 1.0 for w in weights) else weights,
    )
    if out is NO_OUTPUT:
        return [], stats
    if out is not None:
        return list(out), stats
    wrapped: list[Tensor] = [
        DTensor.from_local(r, mesh, g.placements, shape=g.shape, stride=g.stride())  # type: ignore[attr-defined]
        for r, g in zip(results, adversarial, strict=True)
    ]
    return wrapped, stats
