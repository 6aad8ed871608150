r"""The plain per-segment loop: the readable statement of AGR (``fused=False``).

For every segment, in float64 (float32 on devices without it):

1. scale: :math:`\hat a = a / s_a`, :math:`\hat c = c / s_c` with :math:`s_a, s_c` the largest
   magnitudes of ``a`` and ``c`` (so every square is at most 1 and none over- or underflows,
   whatever the gradients' magnitudes);
2. the three sums :math:`\langle\hat a,\hat c\rangle`, :math:`\lVert\hat a\rVert^2`,
   :math:`\lVert\hat c\rVert^2`;
3. the rule (:func:`~agr_optim._geometry.rule`): :math:`k_a` and :math:`k_c s_c`;
4. the explicit :math:`r = k_a a + k_c c`, in units of :math:`m = \max(s_a, s_c)`, and its norm;
5. clipping by that norm, then one rounding to the gradient's dtype.

It depends on the rule alone; the fused path is checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._geometry import clip_scale_of, coefficient_dtype, rule
from ._stats import NO_OUTPUT, ReconstructionStats


def _largest(tensors: Sequence[Tensor | None], acc: torch.dtype, device: torch.device) -> Tensor:
    """The largest magnitude over ``tensors``; 1 where that is 0 or not finite (a non-finite
    gradient then keeps its sums non-finite instead of having them divided away)."""
    values = [t.detach().abs().amax().to(acc) for t in tensors if t is not None and t.numel() > 0]
    largest = torch.stack(values).amax() if values else torch.zeros((), dtype=acc, device=device)
    return torch.where(torch.isfinite(largest) & (largest > 0), largest, 1.0)


def _norm(tensors: Sequence[Tensor], acc: torch.dtype, device: torch.device) -> Tensor:
    """The norm of the concatenated ``tensors``, taken of ``t / s`` with ``s`` their largest
    magnitude (no square over- or underflows)."""
    s = _largest(tensors, acc, device)
    zero = torch.zeros((), dtype=acc, device=device)
    return torch.sqrt(sum((torch.sum((t / s) ** 2) for t in tensors), zero)) * s


def reconstruct_loop(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """One segment at a time: scaled sums, coefficients, the explicit ``r``, clip by ``|r|``."""
    members: list[list[int]] = [[] for _ in range(num_segments)]
    for index, segment in enumerate(segment_ids):
        members[segment].append(index)
    results: list[Tensor] = [torch.empty(0)] * len(adversarial)
    rows = []
    for indices in members:
        device = adversarial[indices[0]].device
        acc = coefficient_dtype(device)
        a_list = [adversarial[i].detach() for i in indices]
        c_list = [clean[i] for i in indices]
        s_a, s_c = _largest(a_list, acc, device), _largest(c_list, acc, device)
        a_hat = [a.to(acc) / s_a for a in a_list]
        c_hat = [None if c is None else c.detach().to(acc) / s_c for c in c_list]
        zero = torch.zeros((), dtype=acc, device=device)
        dot = sum((torch.sum(a * c) for a, c in zip(a_hat, c_hat, strict=True) if c is not None), zero)
        sq_a = sum((torch.sum(a * a) for a in a_hat), zero)
        sq_c = sum((torch.sum(c * c) for c in c_hat if c is not None), zero)
        k = rule(dot, sq_a, sq_c, scale_a=s_a, scale_c=s_c, clip_norm=None)
        m = torch.maximum(s_a, s_c)
        r_over_m = [
            k.adversarial * (s_a / m) * a + (0.0 if c is None else (k.clean_scaled / m) * c)
            for a, c in zip(a_hat, c_hat, strict=True)
        ]
        norm = _norm(r_over_m, acc, device)  # |r| / m
        clip = torch.ones_like(norm) if clip_norm is None else clip_scale_of(norm, norm, clip_norm / m)
        rows.append((k, norm * m, clip))
        if out is NO_OUTPUT:
            continue
        for i, r in zip(indices, r_over_m, strict=True):
            r = r * (m * clip)
            # Written as soon as the segment is done (it reads only its own tensors): at most
            # one segment's float64 temporaries are alive.
            results[i] = r.to(adversarial[i].dtype) if out is None else out[i].copy_(r)
    return ([] if out is NO_OUTPUT else results), _stats(rows)


def _stats(rows: list) -> ReconstructionStats:
    if not rows:
        return empty_stats()

    def column(values: list[Tensor]) -> Tensor:
        return torch.stack(values).reshape(-1)

    return ReconstructionStats(
        cosine=column([k.cosine for k, _, _ in rows]),
        projected=column([k.projected for k, _, _ in rows]),
        norm_adversarial=column([k.norm_adversarial for k, _, _ in rows]),
        norm_clean=column([k.norm_clean for k, _, _ in rows]),
        norm_reconstructed=column([norm for _, norm, _ in rows]),
        clip_scale=column([clip for _, _, clip in rows]),
        # The loop scales every segment: no sum leaves the range (float64; float32 without it).
        out_of_range=torch.zeros(len(rows), dtype=torch.bool, device=rows[0][0].cosine.device),
    )


def empty_stats() -> ReconstructionStats:
    """The statistics of zero segments."""
    empty = torch.zeros(0, dtype=torch.float64)
    return ReconstructionStats(empty, empty.bool(), empty, empty, empty, empty, empty.bool())
