r"""Functional core of AGR: reconstruct one update from an adversarial and a clean gradient.

Tong et al., *Balancing Generalization and Robustness in Adversarial Training via Steering through
Clean and Adversarial Gradient Directions*, ACM MM 2024.

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

The implementations (``_IMPLEMENTATIONS``) share one signature and are chosen in one place,
:func:`_choose`, from explicit inputs: ``"loop"`` (``fused=False``, ``_loop.py``), ``"host"``
(``fused=True`` on eager CPU), ``"device"`` (``fused=True`` elsewhere, and ``fused="device"``: flat
rows, no host reads, ``_device.py``), ``"compiled"`` (``fused="compile"``). DTensor gradients run
``"host"`` or a per-tensor ``"device"`` schedule on their local shards with global sums
(``_distributed.py``). Tests pick one with :func:`_use_implementation` instead of patching.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ._compiled import reconstruct_compiled
from ._device import reconstruct_device, reconstruct_device_tensors
from ._distributed import is_dtensor, reconstruct_dtensor, validate_dtensors
from ._fused import reconstruct_host
from ._loop import empty_stats, reconstruct_loop
from ._stats import NO_OUTPUT, ReconstructionStats

__all__ = ["reconstruct", "reconstruct_", "statistics", "GRANULARITIES"]

#: Every segmentation: each parameter tensor (the paper), each param group (``AGROptimizer``
#: only: the functional API has no groups), or all tensors at once.
GRANULARITIES = ("tensor", "group", "global")
#: The segmentations of the functional API.
FUNCTIONAL_GRANULARITIES = ("tensor", "global")


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
        fused: ``True`` (the default) for the fused implementation: on eager CPU the host
            schedule (block by block, so that the combine finds the gradients still in the cache,
            with exact repairs of out-of-range sums), elsewhere the accelerator schedule (all
            gradients copied into flat rows, a fixed number of kernels whatever the number of
            tensors, no host synchronisation; see :doc:`/algorithm`). ``"device"``: the
            accelerator schedule on any device, CPU included (to check it, or to time it).
            ``False``: the plain per-segment loop that states the math. ``"compile"`` (opt-in):
            the accelerator schedule through ``torch.compile`` (sums and combine one pass each);
            the first call compiles (tens of seconds on CPU), and so does a call with new shapes,
            dtypes or a new ``clip_norm`` (torch.compile specialises on it). All give the same
            result up to rounding. Without host reads (accelerator schedule, ``"compile"``) a
            segment with :math:`\lVert a\rVert\lVert c\rVert` below about 1e-30 (float32) keeps
            its clipped adversarial gradient (``out_of_range`` in the statistics) and one whose
            products :math:`a_i c_i` overflow gives NaN; the host schedule reconstructs both
            exactly.

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
    results, _ = _checked_run(adversarial, clean, clip_norm, granularity, fused, out=None)
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

    Same arguments and checks as :func:`reconstruct`, and also refuses adversarial tensors
    that cannot be written in place (internally overlapping memory, e.g. from ``expand``, or
    memory shared with another gradient of the call); returns the per-segment
    :class:`~agr_optim.ReconstructionStats` instead of new tensors.
    """
    _, stats = _checked_run(adversarial, clean, clip_norm, granularity, fused, out=adversarial)
    return stats


def statistics(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    *,
    clip_norm: float | None = None,
    granularity: str = "tensor",
    fused: bool | str = True,
) -> ReconstructionStats:
    """The per-segment :class:`~agr_optim.ReconstructionStats` that :func:`reconstruct` would
    give (cosine, projection, norms, clip scale), without computing or changing any gradient.

    Same arguments and checks as :func:`reconstruct`. Costs the sums only (no combine; the
    host schedule allocates nothing gradient-sized, the accelerator schedule its rows);
    ``fused="compile"`` computes them eagerly.

    Example:
        >>> import torch
        >>> from agr_optim.functional import statistics
        >>> s = statistics([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])], clip_norm=0.1)
        >>> round(s.cosine.item(), 4), bool(s.projected.item()), round(s.clip_scale.item(), 4)
        (-0.7071, True, 0.1414)
    """
    _, stats = _checked_run(adversarial, clean, clip_norm, granularity, fused, out=NO_OUTPUT)
    return stats


def _checked_run(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    clip_norm: float | None,
    granularity: str,
    fused: bool | str,
    *,
    out: Any,
) -> tuple[list[Tensor], ReconstructionStats]:
    """Validate the public arguments (all of them, before anything changes), then run."""
    validate_clip_norm(clip_norm)
    validate_fused(fused)
    if granularity == "group":
        raise ValueError(
            "Invalid granularity: 'group' needs param groups; use AGROptimizer(granularity='group'), or "
            "'tensor' / 'global' here"
        )
    segment_ids, num_segments = _segments(validate_granularity(granularity, FUNCTIONAL_GRANULARITIES), len(adversarial))
    validate_gradients(adversarial, clean)
    if out is adversarial:
        validate_writable(adversarial, clean)
    return _run(adversarial, clean, segment_ids, num_segments, clip_norm, fused, out=out)


_IMPLEMENTATIONS = {
    "loop": reconstruct_loop,
    "host": reconstruct_host,
    "device": reconstruct_device,
    "device_tensors": reconstruct_device_tensors,
    "compiled": reconstruct_compiled,
}
#: Set by :func:`_use_implementation` (tests): the implementation to run, and its options.
_override: tuple[str, dict[str, Any]] | None = None


@contextlib.contextmanager
def _use_implementation(name: str, **options: Any) -> Iterator[None]:
    """Run ``name`` (a key of ``_IMPLEMENTATIONS``) whatever the inputs, with ``options``
    (e.g. ``block=5`` for ``"host"``); for tests, which reach every path this way."""
    global _override
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; expected one of {sorted(_IMPLEMENTATIONS)}")
    previous, _override = _override, (name, options)
    try:
        yield
    finally:
        _override = previous


def _choose(fused: bool | str, device: torch.device, statistics_only: bool) -> tuple[str, dict[str, Any]]:
    """The one dispatch: which implementation runs, from the explicit inputs."""
    if _override is not None:
        return _override
    if fused is False:
        return "loop", {}
    if torch.compiler.is_compiling():
        # Traced into the caller's graph: the per-tensor form (no layout objects to build while
        # tracing; inductor fuses its operations anyway), whatever fused says.
        return "device_tensors", {}
    if fused == "compile":  # its statistics without compiling: the same schedule, eagerly
        return ("device" if statistics_only else "compiled"), {}
    if fused == "device":  # the accelerator schedule on any device (e.g. to check it on CPU)
        return "device", {}
    return ("host" if device.type == "cpu" else "device"), {}


def _run(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    segment_ids: Sequence[int],
    num_segments: int,
    clip_norm: float | None,
    fused: bool | str,
    out: Any,
) -> tuple[list[Tensor], ReconstructionStats]:
    """Dispatch already validated arguments. ``out``: ``None`` (new tensors), the adversarial
    tensors (in place) or ``NO_OUTPUT`` (statistics only)."""
    if len(adversarial) == 0:
        return [], empty_stats()
    clip = None if clip_norm is None or math.isinf(clip_norm) else float(clip_norm)
    with torch.no_grad():
        # Validation (every caller's) made DTensors all-or-none: the first one tells.
        if is_dtensor(adversarial[0]):
            # Shards run the fused schedules whatever ``fused`` says: the host one where host
            # reads are free (CPU, eager), unless a test forces the device one.
            local_device = adversarial[0].to_local().device  # type: ignore[attr-defined]
            host_reads = local_device.type == "cpu" and not torch.compiler.is_compiling()
            if _override is not None and _override[0] == "device":
                host_reads = False
            return reconstruct_dtensor(adversarial, clean, segment_ids=segment_ids, num_segments=num_segments,
                                       clip_norm=clip, out=out, host_reads=host_reads)
        name, options = _choose(fused, adversarial[0].device, out is NO_OUTPUT)
        return _IMPLEMENTATIONS[name](list(adversarial), list(clean), segment_ids=segment_ids,
                                      num_segments=num_segments, clip_norm=clip, out=out, **options)


def _segments(granularity: str, n: int) -> tuple[list[int], int]:
    if granularity == "global":
        return [0] * n, (1 if n else 0)
    return list(range(n)), n


def validate_granularity(granularity: object, allowed: Sequence[str]) -> str:
    if not isinstance(granularity, str) or granularity not in allowed:
        raise ValueError(f"Invalid granularity: {granularity!r}; expected one of {', '.join(map(repr, allowed))}")
    return granularity


#: The named ``fused`` settings (besides ``True`` and ``False``).
FUSED_SETTINGS = ("compile", "device")
FUSED_CHOICES = "True, False, 'device' or 'compile'"


def validate_fused(fused: object) -> None:
    if isinstance(fused, str) and fused not in FUSED_SETTINGS:
        raise ValueError(f"Invalid fused: {fused!r}; expected {FUSED_CHOICES}")


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


def validate_writable(adversarial: Sequence[Tensor], clean: Sequence[Tensor | None]) -> None:
    """In-place reconstruction writes into ``adversarial``: each must be writable element by
    element, and share memory with no other gradient of the call (it would be read after
    being overwritten)."""
    spans: list[tuple[int, int, str]] = []
    for name, tensors in (("adversarial", adversarial), ("clean", clean)):
        for i, t in enumerate(tensors):
            if t is not None and is_dtensor(t):
                t = t.to_local()  # type: ignore[attr-defined]
            if t is None or t.numel() == 0:
                continue
            if name == "adversarial" and torch._debug_has_internal_overlap(t) == 1:
                raise ValueError(
                    f"adversarial[{i}] (shape {tuple(t.shape)}, strides {t.stride()}) has internally overlapping "
                    "memory (e.g. from expand()), so it cannot be written in place; pass a dense copy "
                    "(.contiguous()) or use reconstruct()"
                )
            start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
            extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
            spans.append((int(start), int(start + (extent + 1) * t.element_size()), f"{name}[{i}]"))
    spans.sort()
    active: list[tuple[int, str]] = []  # (end, name) of the spans that reach past the current start
    for start, end, name in spans:
        active = [(e, n) for e, n in active if e > start]
        for _, other in active:
            if "adversarial" in name + other:
                raise ValueError(
                    f"{other} and {name} share memory, so reconstructing in place would read values it has "
                    "already overwritten; pass separate tensors (e.g. .clone() one of them) or use reconstruct()"
                )
        active.append((end, name))


def _check_dense_float(t: Tensor, name: str) -> None:
    if t.is_sparse or t.layout != torch.strided:
        raise ValueError(f"{name} is a sparse gradient (layout {t.layout}); AGR supports dense gradients only")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"{name} has dtype {t.dtype}; expected a floating-point gradient of dtype float16, bfloat16, float32 "
            "or float64"
        )
