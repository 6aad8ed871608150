"""The operations one optimizer step dispatches, AGR's and the inner SGD's, and the H200 time they predict.

:func:`count_step` runs one AGR iteration (``zero_grad()``, the clean gradient set,
``stash_clean()``, the adversarial gradient set, ``step()``) and one plain foreach-SGD iteration
(``zero_grad()``, the gradient set, ``step()``) on given parameter shapes, each once to warm up
(layouts, momentum buffers) and once under :class:`~benchmarks._ops.OpCounter`. Setting a
gradient is an attribute write (what a backward pass leaves there), so the counts are the
optimizer's alone. AGR's *own* figures are the AGR iteration's less the SGD iteration's: the inner
SGD step runs inside ``AGROptimizer.step()``.

:func:`predict` turns counts into a time: launches x :data:`LAUNCH_S` + bytes moved /
:data:`BANDWIDTH`, the two costs of an eager step on an accelerator whose kernels never overlap
and always stream from memory. A prediction, not a measurement (``benchmarks.gpu_check``
measures it on a lent GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from agr_optim import AGROptimizer

from ._ops import OpCounter

#: Seconds per kernel launch in eager mode (the issue's figure: a CUDA launch costs the host
#: about 5 us through PyTorch's dispatcher).
LAUNCH_S = 5e-6
#: An H200's HBM3e bandwidth, bytes per second (4.8 TB/s, NVIDIA's figure).
BANDWIDTH = 4.8e12

#: The fields of a count that :func:`count_step` reports (and subtracts for AGR's own).
FIELDS = ("kernels", "launches", "views", "allocations", "syncs", "bytes_read", "bytes_written")

LR, MOMENTUM, WEIGHT_DECAY, CLIP_NORM = 0.1, 0.9, 5e-4, 0.1


def _figures(counter: OpCounter) -> dict[str, int]:
    summary = counter.summary()
    return {field: summary[field] for field in FIELDS}


def _sgd(params: Sequence[torch.Tensor], groups: int) -> torch.optim.SGD:
    """The paper's SGD, foreach (what torch.optim picks on a GPU), the parameters split into
    ``groups`` param groups (each runs its own multi-tensor kernels)."""
    size = -(-len(params) // groups)
    return torch.optim.SGD([{"params": list(params[i : i + size])} for i in range(0, len(params), size)], lr=LR,
                           momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)


def _gradients(shapes: Sequence[tuple[int, ...]], device: torch.device, seed: int
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Adversarial and clean gradients; the clean ones +-0.5 the adversarial plus noise, the sign
    alternating over tensors, so that both branches of the rule run."""
    gen = torch.Generator().manual_seed(seed)
    adversarial = [torch.randn(s, generator=gen) for s in shapes]
    clean = [(0.5 if i % 2 else -0.5) * a + torch.randn(a.shape, generator=gen) for i, a in enumerate(adversarial)]
    return [a.to(device) for a in adversarial], [c.to(device) for c in clean]


def count_step(shapes: Sequence[tuple[int, ...]], *, fused: bool | str, granularity: str = "tensor",
               groups: int = 1, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """The dispatched operations of one iteration of ``AGROptimizer(SGD, fused=fused)`` and of
    plain SGD on parameters of ``shapes`` in ``groups`` param groups: ``{"sgd_step": ...,
    "agr_iteration": ..., "agr_own": ..., "agr_own_by_name": ...}``, each a dict of :data:`FIELDS`
    but the last (AGR's own operations by name)."""
    device = torch.device(device)
    adversarial, clean = _gradients(shapes, device, seed)

    def params() -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [(0.1 * torch.randn(s)).to(device).requires_grad_() for s in shapes]

    plain_params, agr_params = params(), params()
    plain = _sgd(plain_params, groups)
    agr = AGROptimizer(_sgd(agr_params, groups), clip_norm=CLIP_NORM, granularity=granularity, fused=fused)

    def sgd_iteration(counter: OpCounter | None) -> None:
        grads = [g.clone() for g in adversarial]  # fresh gradients (not counted)
        with counter if counter is not None else contextlib.nullcontext():
            plain.zero_grad()
            for p, g in zip(plain_params, grads, strict=True):
                p.grad = g
            plain.step()

    def agr_iteration(counter: OpCounter | None) -> None:
        clean_grads, adversarial_grads = [g.clone() for g in clean], [g.clone() for g in adversarial]
        with counter if counter is not None else contextlib.nullcontext():
            agr.zero_grad()
            for p, g in zip(agr_params, clean_grads, strict=True):
                p.grad = g
            agr.stash_clean()
            for p, g in zip(agr_params, adversarial_grads, strict=True):
                p.grad = g
            agr.step()

    sgd_counter, agr_counter = OpCounter(), OpCounter()
    for iteration, counter in ((sgd_iteration, sgd_counter), (agr_iteration, agr_counter)):
        iteration(None)  # warm-up: momentum buffers, the rows' layout and its index tensors
        iteration(counter)
    sgd, total = _figures(sgd_counter), _figures(agr_counter)
    own_names = agr_counter.names.copy()
    own_names.subtract(sgd_counter.names)
    return {
        "sgd_step": sgd,
        "agr_iteration": total,
        "agr_own": {field: total[field] - sgd[field] for field in FIELDS},
        "agr_own_by_name": {name: n for name, n in sorted(own_names.items()) if n},
    }


def predict(figures: dict[str, int]) -> float:
    """Predicted seconds on an H200: launches x :data:`LAUNCH_S` + bytes moved / :data:`BANDWIDTH`."""
    return figures["launches"] * LAUNCH_S + (figures["bytes_read"] + figures["bytes_written"]) / BANDWIDTH


def prediction(step: dict[str, Any]) -> dict[str, Any]:
    """The predicted H200 times of one :func:`count_step` result, and AGR's own over SGD's."""
    sgd, own = predict(step["sgd_step"]), predict(step["agr_own"])
    return {"launch_s": LAUNCH_S, "bandwidth_bytes_per_s": BANDWIDTH, "sgd_step_s": sgd, "agr_own_s": own,
            "agr_iteration_s": sgd + own, "agr_own_over_sgd_step": own / sgd,
            "agr_iteration_over_sgd_step": 1 + own / sgd, "target_agr_own_over_sgd_step": 2.0}
