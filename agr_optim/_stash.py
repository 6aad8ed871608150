"""The stash: the gradients an :class:`~agr_optim.AGROptimizer` keeps between the two backward passes.

One small state machine with its refusals, apart from the optimizer's delegation and checkpoints:
``take`` moves ``.grad`` into the stash (adding up under gradient accumulation), ``drop`` forgets
it, ``check`` refuses a stash whose parameters moved since, and ``interrupted`` records a step that
failed after its first write (everything is refused until ``zero_grad()``).

A kind's stash lives in one of two forms, chosen by the schedule that will read it:

- *tensors* (the CPU schedules): the gradient tensors themselves, no copy (views into a shared
  buffer, like DDP's ``gradient_as_bucket_view``, and expanded ones are copied: the next backward
  pass would overwrite them, or they cannot be added to in place);
- *rows* (the accelerator schedule, :mod:`._flat`): the gradients copied, by one multi-tensor copy,
  into the padded rows the schedule computes on, so that the step needs no second copy. Each
  parameter's entry is then a view of a row; anything irregular (a parameter set that changes
  between micro-batches) falls back to the tensor form, which the schedule gathers itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._flat import Layout, layout_for

KINDS = ("clean", "adversarial")
ACCUMULATION_RECIPE = "see 'Gradient accumulation' in docs/amp_distributed.rst"


@dataclass
class Rows:
    """A kind's stash as rows of ``layout``, whose tensors are ``params`` in order."""

    layout: Layout
    params: tuple[Tensor, ...]
    rows: list[Tensor]


@dataclass
class KindStash:
    """One kind's stashed gradients: ``tensors[p]`` for every parameter that had one, the
    gradient's (shape, dtype, device) when stashed, and the rows when kept as rows."""

    tensors: dict[Tensor, Tensor] = field(default_factory=dict)
    specs: dict[Tensor, tuple[tuple[int, ...], torch.dtype, torch.device]] = field(default_factory=dict)
    rows: Rows | None = None


def _is_view_or_overlapping(g: Tensor) -> bool:
    from ._distributed import local_tensor

    return g._is_view() or torch._debug_has_internal_overlap(local_tensor(g)) != 0


class Stash:
    """The stash of one optimizer (see the module docstring)."""

    def __init__(self) -> None:
        self.kinds: dict[str, KindStash] = {}
        self.passes: dict[str, int] = {}  # kind -> stash calls since the last step
        self.version = 0  # bumped by every change: GradScaler's view of the stash is keyed on it
        self.scaler_view: object | None = None  # _amp.ScalerView of the current stash
        self.interrupted: str | None = None  # why step() and the stash are refused until zero_grad()
        self.dropped: tuple[str, ...] = ()  # the kinds the last zero_grad() dropped (for step()'s message)
        # The .grad that backward(clean=None) calls since the last step left, by parameter: they add
        # up; anything else found in .grad (the last update, an attack's pass) is not theirs.
        self.unstashed: dict[Tensor, Tensor] = {}

    # ------------------------------------------------------------------ reading
    def __bool__(self) -> bool:
        return bool(self.kinds)

    def __contains__(self, kind: str) -> bool:
        return kind in self.kinds

    def __getitem__(self, kind: str) -> dict[Tensor, Tensor]:
        """The stashed gradients of ``kind``, by parameter (views of the rows in the row form)."""
        return self.kinds[kind].tensors

    def rows_for(self, kind: str, params: Sequence[Tensor], layout: Layout) -> list[Tensor] | None:
        """``kind``'s rows when they hold exactly ``params`` in this order laid out as ``layout``
        (a parameter whose strides changed since the stash, e.g. ``model.to(memory_format=...)``,
        has another layout: its rows would pair other elements), else ``None``."""
        record = self.kinds.get(kind)
        rows = None if record is None else record.rows
        if rows is None or len(rows.params) != len(params) or rows.layout.key != layout.key:
            return None
        if any(p is not q for p, q in zip(rows.params, params, strict=True)):
            return None
        return rows.rows

    def items(self) -> list[tuple[Tensor, Tensor]]:
        """Every stashed (parameter, gradient), both kinds, clean first."""
        return [(p, g) for kind in KINDS if kind in self.kinds for p, g in self.kinds[kind].tensors.items()]

    # ------------------------------------------------------------------ refusals
    def refuse_if_interrupted(self, what: str) -> None:
        if self.interrupted is not None:
            raise RuntimeError(
                f"{what} refused: the previous step() was interrupted ({self.interrupted}) after the gradients "
                "were reconstructed in place, so .grad holds the update, not a fresh gradient (and the inner "
                "optimizer may have moved some parameters); retrying would reconstruct it twice. Call "
                "zero_grad() and redo both backward passes"
            )

    def check(self) -> None:
        """A stash whose parameter moved (device, dtype or shape) since it was taken."""
        for kind, record in self.kinds.items():
            for index, (p, g) in enumerate(record.tensors.items()):
                # The dtype stashed (rows of bf16/fp16 gradients are float32), where it is now.
                shape, dtype, device = tuple(g.shape), record.specs[p][1], g.device
                if device != p.device or dtype != p.dtype or shape != tuple(p.shape):
                    raise RuntimeError(
                        f"the stashed {kind} gradient of parameter {index} (shape {shape}, {dtype}, on {device}) no "
                        f"longer matches the parameter (shape {tuple(p.shape)}, {p.dtype}, on {p.device}): the model "
                        f"was moved or cast after stash_{kind}(); call zero_grad() and redo both backward passes"
                    )

    # ------------------------------------------------------------------ writing
    def drop(self, *, by_zero_grad: bool = False) -> None:
        """Forget the stash; ``by_zero_grad``: remember what was dropped, so that a ``step()``
        missing it can say where it went."""
        # A zero_grad() with nothing stashed keeps the note: a loss function's zero_grad() often
        # follows the one that dropped the stash. A refusal that reports it clears it.
        if not by_zero_grad or self.kinds:
            self.dropped = tuple(self.kinds) if by_zero_grad else ()
        self.kinds, self.passes, self.scaler_view, self.unstashed = {}, {}, None, {}
        self.version += 1

    def dropped_note(self) -> str:
        """What the last ``zero_grad()`` dropped, as a sentence for a refusal ('' if nothing)."""
        if not self.dropped:
            return ""
        kinds = " and ".join(f"stash_{kind}()" for kind in self.dropped)
        self.dropped = ()  # said once
        return (
            f" A gradient was stashed ({kinds}) and then dropped by zero_grad(), which forgets the stash: "
            "call zero_grad() before the first backward pass of the step only (reference loss functions such as "
            "MART's and TRADES' call optimizer.zero_grad() inside: give them the inner optimizer, opt.optimizer, "
            "or use opt.backward(clean=..., adversarial=...) after them)."
        )

    def take(self, kind: str, params: Sequence[Tensor], *, rows: bool) -> None:
        """Move every ``p.grad`` of ``params`` into ``kind``'s stash (added to what is there) and
        set it to ``None``; ``rows``: keep them as rows (the accelerator schedule will read them).
        Everything is checked before anything changes."""
        self.refuse_if_interrupted(f"stash_{kind}()")
        other = KINDS[1 - KINDS.index(kind)]
        if self.passes.get(kind, 0) > self.passes.get(other, 0):
            raise RuntimeError(
                f"a {kind} gradient is already stashed for this step, and no {other} gradient was stashed "
                f"after it. With gradient accumulation (accelerator.accumulate, or calling step() every k "
                f"micro-batches), stash both gradients in every micro-batch: clean backward, stash_clean(), "
                f"adversarial backward, stash_adversarial(); then step() ({ACCUMULATION_RECIPE}). Otherwise call "
                f"step() or zero_grad() before stash_{kind}() again. Nothing was changed"
            )
        record = self.kinds.get(kind, KindStash())
        if all(p.grad is None for p in params):
            raise RuntimeError(
                f"stash_{kind}() found no gradient on any parameter: call it after the {kind} backward pass "
                "(it moves .grad into the stash). Nothing was changed"
            )
        self.refuse_unfit(kind, params, [p.grad for p in params])
        with_grad = [p for p in params if p.grad is not None]
        grads: list[Tensor] = [p.grad for p in with_grad]  # type: ignore[misc]
        if rows and not record.tensors:
            layout = layout_for(with_grad)
            stored, views = layout.gather_views(grads)
            record.rows = Rows(layout, tuple(with_grad), stored)
            record.tensors = dict(zip(with_grad, views, strict=True))
        elif record.rows is not None and self.rows_for(kind, with_grad, layout_for(with_grad)) is not None:
            record.rows.layout.gather(grads, add_to=record.rows.rows)  # the same parameters: one add
        else:
            record.rows = None  # another parameter set, or the tensor form: per tensor
            for p, g in zip(with_grad, grads, strict=True):
                stashed = record.tensors.get(p)
                if stashed is None:
                    # A view into a shared buffer (DDP's gradient_as_bucket_view) would be
                    # overwritten by the next backward pass, and an expanded gradient cannot be
                    # added to in place: only those are copied.
                    record.tensors[p] = g.clone() if _is_view_or_overlapping(g) else g
                else:
                    stashed.add_(g)
        for p, g in zip(with_grad, grads, strict=True):
            record.specs.setdefault(p, (tuple(g.shape), g.dtype, g.device))
            p.grad = None
        self.kinds[kind] = record
        self.passes[kind] = self.passes.get(kind, 0) + 1
        self.version += 1
        # A note on another kind stays: stash_clean(), zero_grad() (a loss function's), a backward
        # pass and stash_adversarial() still miss the clean gradient the zero_grad() dropped.
        self.dropped = tuple(k for k in self.dropped if k != kind)
        self.unstashed = {}

    def refuse_unfit(self, kind: str, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Refuse gradients (of ``params``; ``None``: none) that :meth:`take` cannot add to ``kind``'s
        stash: sparse ones, and ones of another shape, dtype or device than the stash holds."""
        record = self.kinds.get(kind, KindStash())
        for index, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise ValueError(
                    f"parameter {index} (shape {tuple(p.shape)}) has a sparse gradient; AGR supports dense gradients "
                    "only"
                )
            spec = record.specs.get(p)
            if spec is not None and spec != (tuple(g.shape), g.dtype, g.device):
                shape, dtype, device = spec
                raise RuntimeError(
                    f"the gradient of parameter {index} (shape {tuple(g.shape)}, {g.dtype}, on {g.device}) does not "
                    f"match its stashed {kind} gradient (shape {shape}, {dtype}, on {device}): the model was moved "
                    "or cast between micro-batches; call zero_grad() and redo them"
                )
