"""What an :class:`~agr_optim.AGROptimizer` saves in a state dict, and reading it back strictly.

The wrapper's own state (its step count and settings) is saved under :data:`STATE_KEY` inside
every saved param group, so tools that keep only ``"state"`` and ``"param_groups"``
(``torch.distributed.checkpoint``) keep it too. Everything is plain Python: ``torch.load(...,
weights_only=True)`` reads it. Reading validates every entry before anything changes, and names
the entry and the problem.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from .functional import FUSED_CHOICES, FUSED_SETTINGS, GRANULARITIES, validate_clip_norm, validate_granularity

__all__ = ["STATE_KEY", "SETTINGS", "strip_agr_state", "read_agr_state", "validate_count"]

#: The key of the wrapper's entry in every saved param group.
STATE_KEY = "agr"
#: The wrapper's settings, saved beside its step count.
SETTINGS = ("clip_norm", "start_step", "granularity", "fused")


def strip_agr_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an :class:`AGROptimizer` state dict without the wrapper's ``"agr"`` entries.

    Loads into the plain inner optimizer (``torch.optim.SGD.load_state_dict`` would otherwise
    keep ``"agr"`` as one more key of every param group). Only the dict and its groups are new;
    the state tensors are shared. A state dict without the entries comes back equal.

    Example:
        >>> import torch
        >>> from agr_optim import AGROptimizer, strip_agr_state
        >>> params = torch.nn.Linear(2, 1).parameters()
        >>> saved = AGROptimizer(torch.optim.SGD(params, lr=0.1)).state_dict()
        >>> "agr" in saved["param_groups"][0], "agr" in strip_agr_state(saved)["param_groups"][0]
        (True, False)
    """
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("state_dict must be a dict with a 'param_groups' list (an optimizer's state_dict())")
    groups = state_dict["param_groups"]
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            raise ValueError(f"state_dict's param_groups[{index}] is a {type(group).__name__}; expected a dict")
    return {**state_dict, "param_groups": [{k: v for k, v in g.items() if k != STATE_KEY} for g in groups]}


def read_agr_state(state_dict: object) -> dict[str, Any] | None:
    """The wrapper entry of a saved state dict, validated; ``None`` if there is none."""
    strip_agr_state(state_dict)  # type: ignore[arg-type]  # the container checks
    groups: list[dict[str, Any]] = state_dict["param_groups"]  # type: ignore[index]
    present = [i for i, g in enumerate(groups) if STATE_KEY in g]
    if not present:
        return None
    if len(present) != len(groups):
        missing = sorted(set(range(len(groups))) - set(present))
        raise ValueError(
            f"state_dict's param groups {missing} lack the {STATE_KEY!r} entry that the others carry "
            "(AGROptimizer.state_dict() writes it into every group)"
        )
    entries = [_read_entry(groups[i][STATE_KEY], f"param_groups[{i}][{STATE_KEY!r}]") for i in present]
    if any(e != entries[0] for e in entries):
        raise ValueError(f"state_dict's param groups carry different {STATE_KEY!r} entries: {entries}")
    return entries[0]


def _read_entry(entry: object, name: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"state_dict's {name} entry must be a dict, got {type(entry).__name__}")
    expected = {"step", *SETTINGS}
    if set(entry) != expected:
        raise ValueError(f"state_dict's {name} entry has keys {sorted(entry)}; expected {sorted(expected)}")
    try:
        step, start_step = _integer(entry["step"], "step"), _integer(entry["start_step"], "start_step")
        validate_clip_norm(entry["clip_norm"])
        granularity = validate_granularity(entry["granularity"], GRANULARITIES)
        fused = entry["fused"]
        if not (isinstance(fused, bool) or (isinstance(fused, str) and fused in FUSED_SETTINGS)):
            raise ValueError(f"Invalid fused: {fused!r}; expected {FUSED_CHOICES}")
    except ValueError as error:
        raise ValueError(f"state_dict's {name} entry: {error}") from None
    # Plain Python again (a checkpoint written with numpy settings would pass them on to the next).
    clip_norm = None if entry["clip_norm"] is None else float(entry["clip_norm"])
    fused = str(fused) if isinstance(fused, str) else bool(fused)
    return {"step": step, "clip_norm": clip_norm, "start_step": start_step, "granularity": str(granularity),
            "fused": fused}


def validate_count(value: object, name: str = "start_step") -> None:
    """An integer >= 0 (``bool`` refused), named in the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 0")


def _integer(value: object, key: str) -> int:
    """An int >= 0, or a one-element tensor of an integer dtype holding one (never truncated)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"Invalid {key}: {value!r}; expected an integer >= 0 (an int or a one-element integer "
                             "tensor)")
        value = int(value.item())
    validate_count(value, key)
    return int(value)  # type: ignore[call-overload]
