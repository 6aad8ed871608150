r"""Epoch statistics of AGR for loggers: sums on the device each step, floats once at the end.

The AGR authors' ``train.py`` logs, every epoch, the mean cosine, the projection (GOP) rate, the
mean norms of both gradients, their difference and the L2 distance between them.
:class:`StatsAccumulator` gives those figures, and a few more, as a flat ``dict[str, float]``
that TensorBoard, W&B or a CSV writer takes as it is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._optimizer import AGROptimizer
from ._stats import ReconstructionStats

__all__ = ["StatsAccumulator"]

# The sums kept per segment (and per name); a segment left out (near zero) adds only to the last.
_SUMS = (
    "segments", "cosine", "projected", "norm_adversarial", "norm_clean", "l2_distance",
    "norm_reconstructed", "clipped", "near_zero",
)
#: The means :meth:`StatsAccumulator.compute` gives, in its order (per-name entries use the same).
MEANS = (
    "cosine", "projection_rate", "norm_adversarial", "norm_clean", "norm_difference", "l2_distance",
    "norm_reconstructed", "clip_rate",
)
_STATE_VERSION = 1


class StatsAccumulator:
    r"""Averages of AGR's per-segment statistics over many steps (an epoch, a logging interval).

    Call :meth:`update` after every ``opt.step()`` (with the :class:`~agr_optim.AGROptimizer`:
    it reads :attr:`~agr_optim.AGROptimizer.last_stats`) or with a
    :class:`~agr_optim.ReconstructionStats` (e.g. from :func:`agr_optim.functional.statistics`),
    then :meth:`compute` once per epoch and :meth:`reset`. :meth:`update` only runs tensor ops on
    the statistics' device (a few, on ``[num_segments]``-sized tensors): no host
    synchronisation per step. :meth:`compute` reads the sums once.

    Every mean is over the *(step, segment)* pairs counted, each pair weighing the same. With
    ``min_norm_ratio=None`` and the same segments in every step that is the AGR code's figure, the
    mean over steps of the per-step mean over parameter tensors. For a pair with clean and
    adversarial norms :math:`c_n`, :math:`a_n`, cosine :math:`\cos`, reconstructed norm
    :math:`r_n` (before clipping) and clip scale :math:`s`, :meth:`compute` gives the means of

    ========================  ==============================================================
    ``cosine``                :math:`\cos(a, c)`
    ``projection_rate``       1 if projected (:math:`\cos \le 0`), else 0
    ``norm_adversarial``      :math:`a_n = \lVert a\rVert`
    ``norm_clean``            :math:`c_n = \lVert c\rVert`
    ``norm_difference``       :math:`a_n - c_n` (the AGR code's ``norm_diff``)
    ``l2_distance``           :math:`\lVert a - c\rVert = \sqrt{(a_n - c_n)^2 + 2 a_n c_n (1 - \cos)}`
    ``norm_reconstructed``    :math:`r_n`
    ``clip_rate``             1 if clipped (:math:`s < 1`), else 0
    ========================  ==============================================================

    and the counts ``steps`` (steps counted), ``segments`` (pairs in the means) and
    ``near_zero_segments`` (pairs left out, below). The distance is computed from the norms and
    the cosine as written above, a sum of two non-negative terms (no cancellation), scaled by
    :math:`\max(a_n, c_n)` so that no square overflows.

    **Near-zero segments.** A conv bias followed by batch norm has, in exact arithmetic, a zero
    gradient; in float32 it is rounding noise (:math:`\lVert a\rVert \approx 10^{-7}` where the
    other tensors have :math:`10^{-2}` to :math:`10^{-1}`, measured on a small CNN) and its cosine
    is a coin toss, which drags the projection rate towards 0.5. So a pair whose
    :math:`\lVert a\rVert` or :math:`\lVert c\rVert` is at most ``min_norm_ratio`` times the
    largest finite one of its step is left out of every mean and counted in
    ``near_zero_segments`` (exact zeros too: the zero policy's cosine 0 is a convention, not a
    measurement). The threshold is relative so that it does not depend on the loss' scale. The
    default ``1e-4`` lies between that noise (about :math:`10^{-5}` of the largest norm at most:
    float32 rounding of a batch-sized sum) and the smallest genuine segments seen (batch-norm
    weights, a few :math:`10^{-2}` of the largest). ``min_norm_ratio=None`` counts every pair,
    as the AGR code does. A non-finite norm is never left out, so a NaN or Inf shows in the means.

    **Per-name entries.** With ``model``, every mean is also given per segment, named after the
    model's parameters (``named_parameters()``): ``"cosine/layer1.weight"``. A segment of several
    parameters (granularity ``"group"`` or ``"global"``) is named after its first one and how many
    more it holds: ``"conv1.weight+61"``.

    **No steps.** :meth:`compute` before any counted step (or when every pair was near zero)
    gives NaN for the means and 0 for the counts, with the same keys: a logger gets its usual
    columns and no made-up zeros, and nothing raises.

    Args:
        model: the module whose parameter names label the per-name entries (optional).
        min_norm_ratio: the near-zero threshold above, a number >= 0, or ``None``.

    Example:
        >>> import torch
        >>> from agr_optim import AGROptimizer, StatsAccumulator
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=0.1)
        >>> stats = StatsAccumulator(model)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     opt.stash_clean()
        ...     torch.nn.functional.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y).backward()
        ...     opt.step()
        ...     counted = stats.update(opt)
        >>> logs = stats.compute()
        >>> logs["steps"], logs["segments"], logs["near_zero_segments"]
        (3.0, 6.0, 0.0)
        >>> sorted(k for k in logs if k.startswith("cosine"))
        ['cosine', 'cosine/bias', 'cosine/weight']
        >>> -1 <= logs["cosine"] <= 1 and 0 <= logs["projection_rate"] <= 1
        True
    """

    def __init__(self, model: nn.Module | None = None, *, min_norm_ratio: float | None = 1e-4) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        _check_ratio(min_norm_ratio)
        self.model = model
        self.min_norm_ratio = None if min_norm_ratio is None else float(min_norm_ratio)
        self._param_names: dict[int, str] = {}
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self.reset()

    def __repr__(self) -> str:
        return f"StatsAccumulator(steps={self._steps}, min_norm_ratio={self.min_norm_ratio})"

    # ------------------------------------------------------------------ accumulate
    def reset(self) -> None:
        """Forget every step counted (start of an epoch)."""
        self._steps = 0
        self._totals: Tensor | None = None
        self._names: list[str] = []
        self._name_rows: dict[str, int] = {}
        self._per_name: Tensor | None = None
        self._last_seen: ReconstructionStats | None = None

    @property
    def steps(self) -> int:
        """Steps counted since the last :meth:`reset` (a Python int: no host read)."""
        return self._steps

    def update(
        self,
        source: AGROptimizer | ReconstructionStats,
        *,
        segment_params: Sequence[Sequence[Tensor]] | None = None,
    ) -> bool:
        """Add one step's statistics; returns whether a step was counted.

        Args:
            source: an :class:`~agr_optim.AGROptimizer`, whose :attr:`~agr_optim.AGROptimizer.last_stats`
                (and :attr:`~agr_optim.AGROptimizer.last_segment_params`, for the names) are read.
                A step that made no statistics is skipped: nothing yet (``last_stats`` is
                ``None``, as in a warm-start step without a clean pass), or the same
                ``last_stats`` as the one counted last (a step skipped by ``GradScaler``, or
                ``update`` called twice). Or a :class:`~agr_optim.ReconstructionStats`, always
                counted.
            segment_params: with a ``ReconstructionStats`` and a ``model``: the parameters of
                each segment, in order (what ``last_segment_params`` gives), for the names.

        Only tensor operations on the statistics' device run here; the result is a Python bool
        from host-side bookkeeping.
        """
        if isinstance(source, AGROptimizer):
            if segment_params is not None:
                raise TypeError("segment_params is for a ReconstructionStats; an AGROptimizer gives its own")
            stats = source.last_stats
            if stats is None or stats is self._last_seen:
                return False
            if self.model is not None:
                segment_params = getattr(source, "last_segment_params", None)
                if segment_params is None:
                    raise RuntimeError(
                        "StatsAccumulator(model): the optimizer gives no last_segment_params to name its "
                        "segments; use StatsAccumulator() without model"
                    )
        elif isinstance(source, ReconstructionStats):
            stats = source
            if self.model is not None and segment_params is None:
                raise TypeError(
                    "StatsAccumulator(model).update(stats) needs segment_params= (the parameters of each "
                    "segment) to name the segments; or use StatsAccumulator() without model"
                )
        else:
            raise TypeError(
                f"source must be an AGROptimizer or a ReconstructionStats, got {type(source).__name__}"
            )
        num_segments = _check_stats(stats)
        rows = None
        if self.model is not None:
            assert segment_params is not None  # refused above otherwise
            rows = self._rows(segment_params, num_segments)
        values = self._values(stats)
        if self._totals is None:
            self._totals = values.sum(0)
        else:
            self._totals = self._totals.to(values.device) + values.sum(0)
        if rows is not None:
            index = self._index(rows, values.device)
            grown = len(self._names) - (0 if self._per_name is None else self._per_name.shape[0])
            if self._per_name is None:
                self._per_name = values.new_zeros(len(self._names), len(_SUMS))
            else:
                self._per_name = self._per_name.to(values.device)
                if grown:
                    self._per_name = torch.cat([self._per_name, values.new_zeros(grown, len(_SUMS))])
            self._per_name = self._per_name.index_add(0, index, values)
        self._steps += 1
        if isinstance(source, AGROptimizer):
            self._last_seen = stats
        return True

    def _values(self, stats: ReconstructionStats) -> Tensor:
        """``[num_segments, len(_SUMS)]``: each segment's contribution to the sums."""
        device = stats.cosine.device
        # float64 sums where the device has it (MPS has not): a float32 sum of 1e6 counts is off.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        a_n = stats.norm_adversarial.to(dtype)
        c_n = stats.norm_clean.to(dtype)
        cos = stats.cosine.to(dtype)
        finite = torch.isfinite(a_n) & torch.isfinite(c_n)
        if self.min_norm_ratio is None or a_n.numel() == 0:
            near_zero = torch.zeros_like(finite)
        else:
            ratio = self.min_norm_ratio
            a_max = torch.where(finite, a_n, 0).max()
            c_max = torch.where(finite, c_n, 0).max()
            near_zero = finite & ((a_n <= ratio * a_max) | (c_n <= ratio * c_max))
        # |a - c|^2 = (a_n - c_n)^2 + 2 a_n c_n (1 - cos): two terms >= 0, scaled by max(a_n, c_n).
        big = torch.maximum(a_n, c_n)
        unit = torch.where(big > 0, big, 1)
        u, v = a_n / unit, c_n / unit
        distance = big * torch.sqrt((u - v) ** 2 + 2 * u * v * (1 - cos).clamp(min=0))
        distance = torch.where(torch.isfinite(big), distance, a_n + c_n)  # inf stays inf, NaN NaN
        columns = [
            torch.ones_like(a_n),
            cos,
            stats.projected.to(dtype),
            a_n,
            c_n,
            distance,
            stats.norm_reconstructed.to(dtype),
            (stats.clip_scale < 1).to(dtype),
        ]
        kept = [torch.where(near_zero, 0, column) for column in columns]
        return torch.stack([*kept, near_zero.to(dtype)], dim=1)

    # ------------------------------------------------------------------ names
    def _rows(self, segment_params: Sequence[Sequence[Tensor]], num_segments: int) -> tuple[int, ...]:
        if isinstance(segment_params, (str, bytes)) or not isinstance(segment_params, Sequence):
            raise TypeError("segment_params must be a sequence of sequences of parameters, one per segment")
        if len(segment_params) != num_segments:
            raise ValueError(
                f"segment_params has {len(segment_params)} segments but the statistics have {num_segments}"
            )
        rows = []
        for index, members in enumerate(segment_params):
            name = self._segment_name(index, members)
            if name not in self._name_rows:
                self._name_rows[name] = len(self._names)
                self._names.append(name)
            rows.append(self._name_rows[name])
        return tuple(rows)

    def _segment_name(self, index: int, members: Sequence[Tensor]) -> str:
        if isinstance(members, Tensor) or not isinstance(members, Sequence) or len(members) == 0:
            raise ValueError(f"segment_params[{index}] must be a non-empty sequence of parameters")
        names = []
        for p in members:
            name = self._param_names.get(id(p))
            if name is None:  # a parameter added since (add_param_group): read the names again
                assert self.model is not None
                self._param_names = {id(q): n for n, q in self.model.named_parameters()}
                name = self._param_names.get(id(p))
            if name is None:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(
                    f"segment_params[{index}] holds a parameter (shape {shape}) that is not in the model "
                    "given to StatsAccumulator: pass the model the optimizer trains"
                )
            names.append(name)
        return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"

    def _index(self, rows: tuple[int, ...], device: torch.device) -> Tensor:
        # Built once per segment layout: a host-to-device copy each step would wait for the device.
        index = self._index_cache.get(rows)
        if index is None or index.device != device:
            index = torch.tensor(rows, dtype=torch.long, device=device)
            self._index_cache[rows] = index
        return index

    # ------------------------------------------------------------------ results
    def compute(self, *, prefix: str = "") -> dict[str, float]:
        """The means and counts as a flat ``dict[str, float]`` (one host read of the sums).

        Keys: ``steps``, ``segments``, ``near_zero_segments``, then the means (``cosine``,
        ``projection_rate``, ``norm_adversarial``, ``norm_clean``, ``norm_difference``,
        ``l2_distance``, ``norm_reconstructed``, ``clip_rate``), then, with a model, each mean per
        name as ``"<mean>/<name>"``; all prefixed by ``prefix`` (e.g. ``"agr/"``). Means over no
        pairs are NaN.
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        totals = [0.0] * len(_SUMS) if self._totals is None else self._totals.tolist()
        out = {
            f"{prefix}steps": float(self._steps),
            f"{prefix}segments": float(totals[0]),
            f"{prefix}near_zero_segments": float(totals[-1]),
        }
        out.update({f"{prefix}{key}": value for key, value in _means(totals).items()})
        if self._per_name is not None:
            for name, row in zip(self._names, self._per_name.tolist(), strict=True):
                out.update({f"{prefix}{key}/{name}": value for key, value in _means(row).items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The sums so far (tensors on their device), to resume an epoch from a checkpoint."""
        return {
            "version": _STATE_VERSION,
            "min_norm_ratio": self.min_norm_ratio,
            "steps": self._steps,
            "totals": None if self._totals is None else self._totals.clone(),
            "names": list(self._names),
            "per_name": None if self._per_name is None else self._per_name.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; everything is checked before anything changes."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        expected = {"version", "min_norm_ratio", "steps", "totals", "names", "per_name"}
        if set(state_dict) != expected:
            raise ValueError(f"state_dict keys {sorted(state_dict)}; expected {sorted(expected)}")
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(f"state_dict version {state_dict['version']!r}; expected {_STATE_VERSION}")
        if state_dict["min_norm_ratio"] != self.min_norm_ratio:
            raise ValueError(
                f"state_dict was saved with min_norm_ratio={state_dict['min_norm_ratio']!r}, this accumulator "
                f"has {self.min_norm_ratio!r}: means under two thresholds do not mix"
            )
        steps, totals, names, per_name = (state_dict[k] for k in ("steps", "totals", "names", "per_name"))
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"state_dict['steps'] is {steps!r}; expected an integer >= 0")
        if totals is not None and (not isinstance(totals, Tensor) or totals.shape != (len(_SUMS),)):
            raise ValueError(f"state_dict['totals'] must be None or a tensor of shape ({len(_SUMS)},)")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) < len(names):
            raise ValueError("state_dict['names'] must be a list of distinct str")
        if per_name is None and names or per_name is not None and (
            not isinstance(per_name, Tensor) or per_name.shape != (len(names), len(_SUMS))
        ):
            raise ValueError(f"state_dict['per_name'] must be a tensor of shape (len(names), {len(_SUMS)})")
        if (totals is None) != (steps == 0):
            raise ValueError("state_dict['totals'] must be None exactly when state_dict['steps'] is 0")
        self.reset()
        self._steps = int(steps)
        self._totals = None if totals is None else totals.clone()
        self._names = list(names)
        self._name_rows = {name: row for row, name in enumerate(self._names)}
        self._per_name = None if per_name is None else per_name.clone()


def _means(sums: Sequence[float]) -> dict[str, float]:
    count = sums[0]
    mean = {key: (sums[i] / count if count > 0 else math.nan) for i, key in enumerate(_SUMS) if i > 0}
    return {
        "cosine": mean["cosine"],
        "projection_rate": mean["projected"],
        "norm_adversarial": mean["norm_adversarial"],
        "norm_clean": mean["norm_clean"],
        "norm_difference": mean["norm_adversarial"] - mean["norm_clean"],
        "l2_distance": mean["l2_distance"],
        "norm_reconstructed": mean["norm_reconstructed"],
        "clip_rate": mean["clipped"],
    }


def _check_ratio(ratio: object) -> None:
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"Invalid min_norm_ratio: {ratio!r}; expected a finite number >= 0, or None")


def _check_stats(stats: ReconstructionStats) -> int:
    """The statistics' fields are 1-D tensors of one length on one device (metadata only)."""
    fields = ("cosine", "projected", "norm_adversarial", "norm_clean", "norm_reconstructed", "clip_scale")
    tensors = [getattr(stats, name) for name in fields]
    for name, t in zip(fields, tensors, strict=True):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"ReconstructionStats.{name} must be a 1-D tensor")
    n, device = tensors[0].numel(), tensors[0].device
    for name, t in zip(fields, tensors, strict=True):
        if t.numel() != n or t.device != device:
            raise ValueError(
                f"ReconstructionStats.{name} has {t.numel()} entries on {t.device}; cosine has {n} on {device}"
            )
    return n
