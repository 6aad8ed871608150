"""GradScaler (``torch.amp``) support: the stash is unscaled and inf-checked like ``.grad``.

GradScaler looks only at ``p.grad`` for the ``p`` of ``optimizer.param_groups``, but the
gradients stashed by ``stash_clean()``/``stash_adversarial()`` sit in the wrapper. While a
stash exists, the wrapper's ``param_groups`` therefore shows GradScaler (and only GradScaler:
its ``_unscale_grads_``, which ``unscale_`` and the inf check of ``step`` call) one more group:
aliases of the parameters (``p.detach()``, no copy) whose ``.grad`` are the stashed tensors,
so ``scaler.unscale_(opt)``, GradScaler's inf check and ``scaler.update()``'s back-off see the
stash exactly as they see ``.grad``. Everything else (LR schedulers, Lightning's gradient
clipping, hand-written loops over ``param_groups``) sees the inner optimizer's groups only.
Telling the caller apart is a frame check (:func:`asked_by_grad_scaler`): GradScaler offers no
hook, and a group that every reader saw broke schedulers (``KeyError: 'lr'``).

The group ends with a one-element *sentinel* whose gradient starts at 1: after an
``unscale_`` it holds ``1/scale``. Each showing also records which gradients were current then,
so ``step()`` can tell an ``unscale_`` that ran before the stash, between the two backward
passes or under another scale from the one correct place, after both backward passes.

``AGROptimizer._step_supports_amp_scaling`` makes ``GradScaler.step`` call our ``step()``
always, with ``opt.grad_scale`` (the scale, or ``None`` when ``unscale_`` already ran) and
``opt.found_inf`` set; the step unscales both gradients itself and skips on an inf.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._distributed import is_dtensor, local_tensor

#: Marks the stash group in the ``param_groups`` that GradScaler sees.
STASH_GROUP_KEY = "agr_stash"

_NOTHING_CHANGED = "Nothing was changed; skip this iteration (opt.zero_grad(); scaler.update()) and redo it"


class ScalerRequest(NamedTuple):
    found_inf: bool  # skip the step
    inv_scale: Tensor | None  # unscale both gradients by this (None: nothing to do)


@dataclass
class ScalerView:
    """The stash as last shown to GradScaler, and what was current then."""

    group: dict[str, Any]
    sentinel: Tensor
    stash_version: int  # the wrapper's stash counter at the showing
    current: tuple[Tensor | None, ...]  # the parameters' .grad at the showing


def asked_by_grad_scaler(skip: Iterable[CodeType]) -> bool:
    """Whether the caller (past frames running ``skip`` code) is ``GradScaler._unscale_grads_``."""
    skip = tuple(skip)
    frame: FrameType | None = sys._getframe(2)  # 0: here, 1: the param_groups getter
    while frame is not None and frame.f_code in skip:
        frame = frame.f_back  # a wrapper around the wrapper (Lightning's) forwards the read
    if frame is None or frame.f_code.co_name != "_unscale_grads_":
        return False
    return isinstance(frame.f_locals.get("self"), torch.amp.GradScaler)


def show_stash(
    view: ScalerView | None,
    stashed: list[tuple[Tensor, Tensor]],
    groups: Iterable[dict[str, Any]],
    stash_version: int,
    current: tuple[Tensor | None, ...],
) -> ScalerView:
    """The view to show GradScaler now: rebuilt if the stash changed, the sentinel kept."""
    if view is None or view.stash_version != stash_version:
        aliases = []
        for p, g in stashed:
            alias = p.detach()  # shares p's storage: no allocation
            alias.grad = g
            aliases.append(alias)
        sentinel = view.sentinel if view is not None else _new_sentinel([g for _, g in stashed], groups)
        group = {"params": [*aliases, sentinel], STASH_GROUP_KEY: True}
        view = ScalerView(group, sentinel, stash_version, current)
    view.current = current
    return view


def _new_sentinel(grads: list[Tensor], groups: Iterable[dict[str, Any]]) -> Tensor:
    device = local_tensor(grads[0]).device if grads else torch.device("cpu")
    # GradScaler batches gradients by (device, dtype); a plain sentinel must not share a
    # batch with DTensor gradients (DTensor refuses mixed lists), so it takes a free dtype.
    dtype = torch.float32
    if any(is_dtensor(g) for g in grads):
        used = {p.dtype for group in groups for p in group["params"]} | {g.dtype for g in grads}
        dtype = next((d for d in (torch.float32, torch.float64, torch.bfloat16) if d not in used), torch.float32)
    sentinel = torch.zeros(1, dtype=dtype, device=device)
    sentinel.grad = torch.ones(1, dtype=dtype, device=device)
    return sentinel


def read_scaler_request(
    optimizer: object,
    view: ScalerView | None,
    has_stash: bool,
    stash_version: int,
    current: tuple[Tensor | None, ...],
) -> ScalerRequest:
    """What ``GradScaler.step`` asks of this step; raises on a stash unscaled at the wrong time.

    Reads ``found_inf`` (a host sync, as GradScaler's own skip decision is one).
    """
    attributes = vars(optimizer)
    if "found_inf" not in attributes:
        return ScalerRequest(False, None)  # a plain step(), not GradScaler's
    found_inf: Tensor = attributes["found_inf"]
    grad_scale: Tensor | None = attributes.get("grad_scale")
    values = [found_inf.detach().to(torch.float64).reshape(())]
    if view is not None:
        assert view.sentinel.grad is not None  # set by _new_sentinel, moved only by unscaling
        values.append(view.sentinel.grad.detach().to(device=found_inf.device, dtype=torch.float64).reshape(()))
    read = torch.stack(values).tolist()
    sentinel = read[1] if len(read) > 1 else 1.0
    unscaled_by = None if sentinel == 1.0 else 1.0 / sentinel
    if has_stash and grad_scale is not None and unscaled_by is not None:
        raise RuntimeError(
            f"the stashed gradient was unscaled by scaler.unscale_() under scale {unscaled_by:g}, but "
            f"GradScaler.step() reports the gradients scaled by {float(grad_scale):g}: scaler.update() ran "
            f"between unscale_() and step(). {_NOTHING_CHANGED}"
        )
    if has_stash and grad_scale is None:  # unscale_() already ran
        if view is None:  # ... and never saw the stash: it ran before the stash was taken
            raise RuntimeError(
                "scaler.unscale_(optimizer) ran before the gradient was stashed, so the stashed gradient is "
                "unscaled and the current one is still scaled (AGR mixes them). Call scaler.unscale_() once, "
                f"after both backward passes: it unscales the stash too. {_NOTHING_CHANGED}"
            )
        moved = view.stash_version != stash_version or any(
            g is not h for g, h in zip(view.current, current, strict=True)
        )
        if moved:  # a backward pass (or a stash) came after it
            raise RuntimeError(
                "scaler.unscale_(optimizer) ran between the two backward passes (gradients were produced or "
                "stashed after it), so part of the gradients is unscaled and part is still scaled (AGR mixes "
                "them; the update would be off by the scale). Call scaler.unscale_() once, after both backward "
                f"passes and every stash_clean()/stash_adversarial(). {_NOTHING_CHANGED}"
            )
    inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
    return ScalerRequest(bool(read[0]), inv_scale)


def forget_scaler_request(optimizer: object) -> None:
    """Drop GradScaler's attributes (it deletes them itself only when step() returns)."""
    attributes = vars(optimizer)
    attributes.pop("grad_scale", None)
    attributes.pop("found_inf", None)


def unscale_(grads: list[Tensor], inv_scale: Tensor) -> None:
    """Multiply ``grads`` in place by ``inv_scale``, with GradScaler's own kernel.

    The same kernel as ``GradScaler.unscale_`` (so a scaled run equals an unscaled one bit
    for bit with a power-of-two scale); DTensors are unscaled shard by shard (no collective).
    """
    batches: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for g in grads:
        local = local_tensor(g)
        batches[(local.device, local.dtype)].append(local)
    for (device, _), batch in batches.items():
        scratch = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(batch, scratch, inv_scale.to(device))
