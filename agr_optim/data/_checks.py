"""Argument checks shared by the transforms and the loader, and how a refusal describes a value."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def describe(value: object) -> str:
    """A value as a refusal names it: dtype and shape of a tensor or array, else its type."""
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_generator(generator: object, x: Tensor) -> torch.Generator:
    """``generator`` if it is a :class:`torch.Generator` on ``x``'s device (draws stay there)."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator on the batch's device ({x.device}), got {generator!r}")
    device = generator.device
    if device.type != x.device.type or (
        device.index is not None and x.device.index is not None and device.index != x.device.index
    ):
        raise ValueError(
            f"generator is on {device} but the batch is on {x.device}: create it with "
            f"torch.Generator(device={str(x.device)!r}) (draws stay on the device, no host sync)"
        )
    return generator
