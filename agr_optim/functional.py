r"""Functional core of AGR: reconstruct one update from an adversarial and a clean gradient.

Tong et al., *Adversarial Training with Adaptive Gradient Reconstruction*, ACM MM 2024.

For every segment (a parameter tensor, a parameter group, or everything at once), with
:math:`a` the adversarial and :math:`c` the clean gradient, :math:`d = \langle a, c\rangle` and
:math:`\cos = d / (\lVert a\rVert\,\lVert c\rVert)` (0 when either norm is 0):

.. math::

    r = \begin{cases}
        a - \dfrac{d}{\lVert c\rVert^2}\, c & \cos \le 0 \quad\text{(Gradient Orthogonal Projection)}\\[1ex]
        \cos\cdot c + (1 - \cos)\cdot a & \cos > 0 \quad\text{(interpolation)}
    \end{cases}
    \qquad
    r \leftarrow r \cdot \min\!\Big(1, \frac{\text{clip\_norm}}{\lVert r\rVert}\Big).

A projection onto a zero clean gradient is the identity (:math:`r = a`). Sums are taken in
float32 at least (bf16/fp16 gradients are reduced in float32, float64 stays float64).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ._distributed import is_dtensor, reconstruct_dtensor, validate_dtensors
from ._fused import reconstruct_compiled, reconstruct_fused
from ._loop import _empty_stats, reconstruct_loop
from ._stats import ReconstructionStats

__all__ = ["reconstruct", "reconstruct_", "GRANULARITIES"]

#: Segmentations accepted by :func:`reconstruct`; ``AGROptimizer`` also takes ``"group"``.
GRANULARITIES = ("tensor", "global")


def reconstruct(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    clip_norm: float | None = None,
    granularity: str = "tensor",
    fused: bool | str = True,
) -> list[Tensor]:
    r"""Reconstruct the AGR update from adversarial and clean gradients.

    Args:
        adversarial: gradients of the adversarial loss, one tensor per parameter.
        clean: gradients of the clean loss, same length, each the shape, dtype and device of
            its adversarial partner; ``None`` stands for a zero gradient.
        clip_norm: clip each segment's result to this norm (> 0); ``None`` for no clipping.
        granularity: ``"tensor"`` (each tensor a segment, the paper's choice) or ``"global"``
            (all tensors one segment).
        fused: ``True`` for the fused implementation (three sums per tensor in one cache-hot
            visit, multi-tensor combine; on CPU block by block so that the combine finds the
            gradients still in the cache); ``False`` for the plain per-segment loop
            that states the math. Both give the same result up to rounding. ``"compile"``
            (opt-in): the fused path through ``torch.compile``, one pass per tensor for the
            sums and one for the combine; the first call compiles (tens of seconds on CPU),
            and out-of-range sums (norms beyond about 1e19, or below about 1e-12 where float32
            squares lose digits) are not rescued.

    Returns:
        New tensors, one per input, each with its input's shape and dtype. The inputs are
        left untouched.

    Raises:
        ValueError: on mismatched lengths, shapes, devices or dtypes, sparse or non-floating
            gradients, an unknown granularity, or a ``clip_norm`` that is not a positive number.

    Example:
        >>> import torch
        >>> from agr_optim.functional import reconstruct
        >>> a = [torch.tensor([1.0, 0.0])]          # adversarial
        >>> c = [torch.tensor([-1.0, 1.0])]         # clean: cos < 0, so a is projected
        >>> reconstruct(a, c)
        [tensor([0.5000, 0.5000])]
        >>> reconstruct([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.0])], clip_norm=1.0)
        [tensor([0.6000, 0.8000])]
    """
    results, _ = _checked_run(adversarial, clean, clip_norm, granularity, fused, inplace=False)
    return results


def reconstruct_(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    clip_norm: float | None = None,
    granularity: str = "tensor",
    fused: bool | str = True,
) -> ReconstructionStats:
    """In-place :func:`reconstruct`: overwrite ``adversarial`` with the result.

    Same arguments and checks as :func:`reconstruct`; returns the per-segment
    :class:`~agr_optim.ReconstructionStats` instead of new tensors.
    """
    _, stats = _checked_run(adversarial, clean, clip_norm, granularity, fused, inplace=True)
    return stats


def _checked_run(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    clip_norm: float | None,
    granularity: str,
    fused: bool | str,
    *,
    inplace: bool,
) -> tuple[list[Tensor], ReconstructionStats]:
    """Validate the public arguments (all of them, before anything changes), then run."""
    validate_clip_norm(clip_norm)
    validate_fused(fused)
    segment_ids, num_segments = _segments(validate_granularity(granularity, GRANULARITIES), len(adversarial))
    validate_gradients(adversarial, clean)
    out = adversarial if inplace else None
    return _run(adversarial, clean, segment_ids, num_segments, clip_norm, fused, out=out)


def _run(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    fused: bool | str,
    out: Sequence[Tensor] | None,
) -> tuple[list[Tensor], ReconstructionStats]:
    """Dispatch to the loop or the fused implementation (already validated arguments)."""
    if len(adversarial) == 0:
        return [], _empty_stats(adversarial)
    with torch.no_grad():
        # Validation (every caller's) made DTensors all-or-none: the first one tells.
        if is_dtensor(adversarial[0]):
            # Sharded gradients: global sums from local shards (see _distributed.py).
            return reconstruct_dtensor(
                adversarial,
                clean,
                segment_ids=segment_ids,
                num_segments=num_segments,
                clip_norm=None if clip_norm is None or math.isinf(clip_norm) else float(clip_norm),
                fused=fused,
                out=out,
            )
        impl = reconstruct_compiled if fused == "compile" else reconstruct_fused if fused else reconstruct_loop
        return impl(
            list(adversarial),
            list(clean),
            segment_ids=segment_ids,
            num_segments=num_segments,
            clip_norm=None if clip_norm is None or math.isinf(clip_norm) else float(clip_norm),
            out=out,
        )


def _segments(granularity: str, n: int) -> tuple[list[int], int]:
    if granularity == "global":
        return [0] * n, (1 if n else 0)
    return list(range(n)), n


def validate_granularity(granularity: object, allowed: Sequence[str]) -> str:
    if not isinstance(granularity, str) or granularity not in allowed:
        raise ValueError(f"Invalid granularity: {granularity!r}; expected one of {', '.join(map(repr, allowed))}")
    return granularity


def validate_fused(fused: object) -> None:
    if isinstance(fused, str) and fused != "compile":
        raise ValueError(f"Invalid fused: {fused!r}; expected True, False or 'compile'")


def validate_clip_norm(clip_norm: object) -> None:
    if clip_norm is None:
        return
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real):
        raise ValueError(f"Invalid clip_norm: {clip_norm!r}; expected a positive number or None")
    if math.isnan(clip_norm) or clip_norm <= 0:
        raise ValueError(f"Invalid clip_norm: {clip_norm!r}; expected a positive number or None")


def validate_gradients(adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]) -> None:
    """Check the two gradient lists pairwise; the message names the index and the culprit."""
    if isinstance(adversarial, Tensor) or isinstance(clean, Tensor):
        raise ValueError("adversarial and clean must be sequences of tensors, not a single tensor")
    if len(adversarial) != len(clean):
        raise ValueError(
            f"adversarial and clean have different lengths: {len(adversarial)} and {len(clean)}"
        )
    if all(isinstance(t, Tensor) for t in [*adversarial, *clean] if t is not None):
        validate_dtensors(adversarial, clean)  # before shapes: a DTensor/plain mix is named as such
    for i, (a, c) in enumerate(zip(adversarial, clean, strict=True)):
        if not isinstance(a, Tensor):
            raise ValueError(f"adversarial[{i}] is {type(a).__name__}, expected a Tensor")
        _check_dense_float(a, f"adversarial[{i}]")
        if c is None:
            continue
        if not isinstance(c, Tensor):
            raise ValueError(f"clean[{i}] is {type(c).__name__}, expected a Tensor or None")
        _check_dense_float(c, f"clean[{i}]")
        if a.shape != c.shape:
            raise ValueError(f"shape mismatch at index {i}: adversarial {tuple(a.shape)}, clean {tuple(c.shape)}")
        if a.device != c.device:
            raise ValueError(f"device mismatch at index {i}: adversarial on {a.device}, clean on {c.device}")
        if a.dtype != c.dtype:
            raise ValueError(f"dtype mismatch at index {i}: adversarial {a.dtype}, clean {c.dtype}")


def _check_dense_float(t: Tensor, name: str) -> None:
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{name} is a sparse gradient (layout {t.layout}); AGR supports dense gradients only")
    if not t.is_floating_point():
        raise ValueError(f"{name} has dtype {t.dtype}; expected a floating-point gradient")
