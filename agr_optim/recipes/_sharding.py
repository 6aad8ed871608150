r"""Per-example random draws of a batch that is one process's shard of a larger batch.

A step of data-parallel training sees rows ``lo:hi`` of a global batch. For its random draws
per example (PGD's random start, AVmixup's :math:`\lambda`) not to depend on how the global
batch is split, every process draws for the *whole* batch, from a stream all processes share,
and keeps its rows: the draws, and the state the stream is left in, are then those of one
process on the whole batch, whatever the number of processes. ``agr-train`` under ``torchrun``
runs each step inside :func:`drawn_for` (``agr_optim.training.distributed``); outside it, a
draw is the plain draw for the batch at hand.

>>> import torch
>>> whole = torch.zeros(6, 2)
>>> _ = torch.manual_seed(0); full = torch.rand(6, 2)
>>> with drawn_for(whole, 2, 4):
...     _ = torch.manual_seed(0); mine = per_example(whole[2:4], torch.rand_like)
>>> torch.equal(mine, full[2:4])
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from torch import Tensor

__all__ = ["drawn_for", "per_example"]

_SHARD: ContextVar[tuple[Tensor, int, int] | None] = ContextVar("agr_optim_shard", default=None)


@contextlib.contextmanager
def drawn_for(whole: Tensor, lo: int, hi: int) -> Iterator[None]:
    """Inside the block, :func:`per_example` draws for ``whole`` (the global batch: its shape,
    dtype, device and memory format) and keeps rows ``lo:hi``."""
    if not 0 <= lo <= hi <= whole.shape[0]:
        raise ValueError(f"rows {lo}:{hi} are not a slice of a batch of {whole.shape[0]}")
    token = _SHARD.set((whole, lo, hi))
    try:
        yield
    finally:
        _SHARD.reset(token)


def per_example(x: Tensor, draw: Callable[[Tensor], Tensor]) -> Tensor:
    """``draw(x)``; inside :func:`drawn_for`, ``draw(whole)[lo:hi]``. ``draw`` makes one random
    tensor shaped by its argument's batch (``torch.rand_like``, a uniform start, ...)."""
    shard = _SHARD.get()
    if shard is None:
        return draw(x)
    whole, lo, hi = shard
    if x.shape[0] != hi - lo or x.shape[1:] != whole.shape[1:]:
        # A draw for another batch than the shard (a bug of the caller): refuse, never mis-slice.
        raise RuntimeError(
            f"a per-example draw for a batch of shape {tuple(x.shape)} inside drawn_for(rows {lo}:{hi} of "
            f"{tuple(whole.shape)})"
        )
    return draw(whole)[lo:hi]
