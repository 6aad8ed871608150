"""GradScaler (``torch.amp``) support: the stash is unscaled and inf-checked like ``.grad``.

GradScaler looks only at ``p.grad`` for the ``p`` of ``optimizer.param_groups``, but the
gradient of the first backward pass sits in the wrapper's stash. While a stash exists, the
wrapper's ``param_groups`` therefore lists one more group (never the inner optimizer's list):
aliases of the parameters (``p.detach()``, no copy) whose ``.grad`` are the stashed tensors,
so ``scaler.unscale_(opt)`` unscales the stash and GradScaler's inf check, and so
``scaler.update()``'s back-off, see it exactly as they see ``.grad``.

The group ends with a one-element *sentinel* whose gradient starts at 1: after an
``unscale_`` it holds ``1/scale``. ``step()`` reads it to tell whether the stash was unscaled
together with the current gradients, and refuses a stash unscaled under another scale.

``AGROptimizer._step_supports_amp_scaling`` makes ``GradScaler.step`` call our ``step()``
always, with ``opt.grad_scale`` (the scale, or ``None`` when ``unscale_`` already ran) and
``opt.found_inf`` set; the step unscales both gradients itself and skips on an inf.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._distributed import is_dtensor, local_tensor

#: Marks the stash group in ``param_groups`` (for code that iterates the groups itself).
STASH_GROUP_KEY = "agr_stash"


class ScalerRequest(NamedTuple):
    found_inf: bool  # skip the step
    inv_scale: Tensor | None  # unscale both gradients by this (None: nothing to do)


def stash_group(stash: Mapping[Tensor, Tensor | None], groups: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The extra param group that shows the stashed gradients to GradScaler."""
    aliases = []
    for p, g in stash.items():
        if g is not None:
            alias = p.detach()  # shares p's storage: no allocation
            alias.grad = g
            aliases.append(alias)
    grads = [a.grad for a in aliases]
    device = local_tensor(grads[0]).device if grads else torch.device("cpu")
    # GradScaler batches gradients by (device, dtype); a plain sentinel must not share a
    # batch with DTensor gradients (DTensor refuses mixed lists), so it takes a free dtype.
    dtype = torch.float32
    if any(is_dtensor(g) for g in grads):
        used = {p.dtype for group in groups for p in group["params"]} | {g.dtype for g in grads}
        dtype = next((d for d in (torch.float32, torch.float64, torch.bfloat16) if d not in used), torch.float32)
    sentinel = torch.zeros(1, dtype=dtype, device=device)
    sentinel.grad = torch.ones(1, dtype=dtype, device=device)
    return {"params": [*aliases, sentinel], STASH_GROUP_KEY: True}


def read_scaler_request(optimizer: object, group: dict[str, Any] | None, has_stash: bool) -> ScalerRequest:
    """What ``GradScaler.step`` asks of this step; raises on a stash under another scale.

    Reads ``found_inf`` (a host sync, as GradScaler's own skip decision is one).
    """
    attributes = vars(optimizer)
    if "found_inf" not in attributes:
        return ScalerRequest(False, None)  # a plain step(), not GradScaler's
    found_inf: Tensor = attributes["found_inf"]
    grad_scale: Tensor | None = attributes.get("grad_scale")
    values = [found_inf.detach().to(torch.float64).reshape(())]
    if group is not None:
        values.append(group["params"][-1].grad.detach().to(device=found_inf.device, dtype=torch.float64).reshape(()))
    read = torch.stack(values).tolist()
    sentinel = read[1] if len(read) > 1 else 1.0
    unscaled_by = None if sentinel == 1.0 else 1.0 / sentinel
    if has_stash and grad_scale is not None and unscaled_by is not None:
        raise RuntimeError(
            f"the stashed gradient was unscaled by scaler.unscale_() under scale {unscaled_by:g}, but "
            f"GradScaler.step() reports the gradients scaled by {float(grad_scale):g}: scaler.update() ran "
            "between unscale_() and step(). Nothing was changed; skip this iteration (opt.zero_grad(); "
            "scaler.update()) and redo it"
        )
    # unscale_() already ran (grad_scale is None) but never saw the stash group: it ran before
    # the stash. (A sentinel still at 1 with the group shown means a scale of exactly 1.)
    if has_stash and grad_scale is None and group is None:
        raise RuntimeError(
            "scaler.unscale_(optimizer) ran before the gradient was stashed, so the stashed gradient is "
            "unscaled and the current one is still scaled (AGR mixes them). Call scaler.unscale_() once, "
            "after both backward passes: it unscales the stash too. Nothing was changed; skip this "
            "iteration (opt.zero_grad(); scaler.update()) and redo it"
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
