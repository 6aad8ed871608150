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
from collections.abc import Container, Sequence
from typing import Any

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


def replicas_may_reduce(params: Sequence[Tensor]) -> bool:
    """Whether the gradients of ``params`` may be all-reduced behind the optimizer's back: plain
    tensors (not FSDP2's DTensors) in a process group of more than one process, as under
    ``DistributedDataParallel``, whose module the optimizer never sees."""
    dist = torch.distributed
    return (bool(params) and not is_dtensor(params[0]) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def refuse_flat_shards(params: Sequence[Tensor], where: str, granularity: str | None = None) -> None:
    """Refuse parameters of FSDP1 (``FullyShardedDataParallel``) across processes.

    FSDP1 flattens a module's parameters into one ``FlatParameter`` per wrapped module and keeps
    each process's shard of it (with ``use_orig_params=True`` the original parameters become views
    into that shard); it marks them ``_fsdp_flattened``. They are plain tensors, so AGR would take
    its cosines and norms of each process's shard: a different update on every process, silently.
    FSDP2's DTensors carry their placement and are reduced exactly (:class:`MeshReduction`).

    In one process the gradients are whole, but a ``FlatParameter`` (``use_orig_params=False``)
    is a whole wrapped module flattened: with ``granularity="tensor"`` AGR would take one cosine
    per module, not per tensor (measured 0.04 from the unwrapped model after 3 steps), so that
    combination is refused too.
    """
    if not replicas_may_reduce(params):
        flat = sys.modules.get("torch.distributed.fsdp._flat_param")
        if granularity == "tensor" and flat is not None:
            for index, p in enumerate(params):
                if isinstance(p, flat.FlatParameter):
                    raise ValueError(
                        f"{where}: parameter {index} (shape {tuple(p.shape)}) is a FlatParameter of "
                        "FullyShardedDataParallel (FSDP1, use_orig_params=False), a whole wrapped module flattened "
                        "into one tensor: granularity='tensor' would take one cosine per module, not per parameter "
                        "tensor. Wrap with use_orig_params=True, or pass granularity='group' or 'global'"
                    )
        return
    for index, p in enumerate(params):
        if getattr(p, "_fsdp_flattened", False):
            raise ValueError(
                f"{where}: parameter {index} (shape {tuple(p.shape)}) is managed by FullyShardedDataParallel "
                "(FSDP1), whose parameters and gradients are flat shards on each process (NO_SHARD's are whole but "
                "flattened per wrapped module, and refused too): AGR's cosines and norms would be taken of one shard, "
                "a different algorithm on every process. Use FSDP2 "
                "(torch.distributed.fsdp.fully_shard, whose DTensor gradients AGR reduces exactly) or "
                "DistributedDataParallel"
            )


class GradientChangeProbe:
    """Whether something changed a backward pass's gradients after autograd computed them.

    ``DistributedDataParallel`` does: its hooks run after a parameter's gradient is accumulated
    and write the average over the processes into ``.grad``, but only in the one backward pass
    that follows each forward it prepared. A hook on the (up to ``count``) largest parameters
    records each gradient's norm as autograd computes it; :meth:`changed` compares the norm of
    what the pass left. Averaging gradients that differ between processes changes them (when
    they are equal it changes nothing, and nothing can drift); norms equal by coincidence in
    every probed parameter do not happen in practice. The probes are the largest parameters and
    the largest of those the pass's graph reaches (``reached``: their ``id``): a probe on a
    parameter left unused (DDP's ``find_unused_parameters``) records nothing, and parameters
    inside a reentrant checkpoint are missing from the graph though the pass reaches them. Use
    as a context manager around the pass.
    """

    def __init__(self, params: Sequence[Tensor], count: int = 4, reached: Container[int] = ()) -> None:
        largest = [i for i in sorted(range(len(params)), key=lambda i: -params[i].numel()) if params[i].requires_grad]
        chosen = largest[:count] + [i for i in largest if id(params[i]) in reached][:count]
        self._probed = [(i, params[i]) for i in dict.fromkeys(chosen)]
        self._computed: dict[int, Tensor] = {}
        self._several: set[int] = set()  # accumulated in parts (reentrant checkpoints): not comparable
        self._handles: list[Any] = []

    def __enter__(self) -> GradientChangeProbe:
        for i, p in self._probed:
            self._handles.append(p.register_hook(lambda grad, i=i: self._record(i, grad)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, i: int, grad: Tensor) -> None:
        if i in self._computed:  # a second part: .grad will hold the sum, whose norm no part's is
            self._several.add(i)
        elif grad.layout == torch.strided:  # sparse gradients are refused later, with their own message
            self._computed[i] = torch.linalg.vector_norm(grad.detach())

    def changed(self, grads: Sequence[Tensor | None]) -> Tensor:
        """A 0-dim bool tensor: whether a probed gradient in ``grads`` (what the pass left in
        ``.grad``, indexed like the parameters) differs from what autograd computed."""
        differs = [torch.linalg.vector_norm(grads[i].detach()) != norm  # type: ignore[union-attr]
                   for i, norm in self._computed.items()
                   if i not in self._several and grads[i] is not None and grads[i].layout == torch.strided]  # type: ignore[union-attr]
        return torch.stack(differs).any() if differs else torch.tensor(False)


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
