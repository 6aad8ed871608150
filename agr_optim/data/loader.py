"""Mini-batches of tensors already on the device, in an order drawn on that device.

>>> import torch
>>> from agr_optim.data import batches
>>> x, y = torch.arange(10.0)[:, None], torch.arange(10)
>>> [len(yb) for _, yb in batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(0))]
[4, 4, 2]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ._checks import check_generator, check_int, describe

__all__ = ["batches"]


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches ``(x[idx], y[idx])`` of tensors already on the device.

    With ``shuffle``, the order is ``torch.randperm(N, generator=generator)`` drawn on ``x``'s
    device when this function is called (not at the first ``next``); without, the batches are
    consecutive slices (views) and ``generator`` may be ``None``. The last batch is smaller
    unless ``drop_last``.

    Args:
        x, y: tensors with the same first dimension ``N``, on the same device.
        batch_size: >= 1.
        shuffle: draw a random order.
        generator: a :class:`torch.Generator` on ``x``'s device (required with ``shuffle``).
        drop_last: drop a last batch smaller than ``batch_size``.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"x and y must be tensors with a batch dimension, got {describe(x)} and {describe(y)}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}: one label per image")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}: move both to the same device")
    check_int(batch_size, "batch_size", 1)
    if not isinstance(shuffle, bool) or not isinstance(drop_last, bool):
        raise ValueError(f"shuffle and drop_last must be True or False, got {shuffle!r} and {drop_last!r}")
    n = len(x)
    order = None
    if shuffle:
        check_generator(generator, x)
        order = torch.randperm(n, generator=generator, device=x.device)
    elif generator is not None:
        check_generator(generator, x)
    stop = n - n % batch_size if drop_last else n

    def iterate() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, stop, batch_size):
            if order is None:
                yield x[start : start + batch_size], y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]

    return iterate()
