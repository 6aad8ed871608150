"""Counting what a piece of code dispatches to ATen: kernels, views, host synchronisations.

On a GPU every ATen operation that computes something launches at least one kernel (about 5 us
each in eager mode), while views only build metadata; operations that read a value back to the
host (``.item()``, ``bool(tensor)``, ``nonzero``, a tensor made from Python data) stall the host
until the device catches up. :class:`OpCounter` sorts every dispatched operation into these
classes, on any device: the CPU counts are those a GPU would see, since the dispatch is the same.

Used by ``benchmarks.reconstruct`` (ops per step beside the times), ``benchmarks.gpu_check`` (host
syncs per step on CUDA) and ``tests/test_device.py`` (the budgets as tests).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operations that read device memory back to the host (or copy Python data to the device):
#: each synchronises the host with a GPU.
SYNCING = frozenset({
    "aten._local_scalar_dense",  # .item(), float(t), bool(t)
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.equal",
    "aten.lift_fresh",  # torch.tensor(python data): a host-to-device copy off CPU
    "aten._assert_async",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.repeat_interleave",  # without output_size it reads the total back
})
#: Allocations without a kernel (``torch.empty``): metadata and the caching allocator only.
ALLOCATING = frozenset({"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty"})


def _name(func: Any) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched inside the ``with`` block, by class.

    ``kernels``: operations that compute (each at least one kernel launch on a GPU); ``views``:
    aliasing operations (no kernel); ``allocations``: ``empty`` and friends (no kernel);
    ``syncs``: the host-synchronising operations of :data:`SYNCING` (also counted as kernels or
    views as they are); ``other``: the profiler's markers. ``names`` holds every operation's
    count by name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()
        self.kernels = self.views = self.allocations = self.syncs = self.other = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = _name(func)
        self.names[name] += 1
        if name in SYNCING:
            self.syncs += 1
        if getattr(func, "is_view", False) or torch.Tag.inplace_view in getattr(func, "tags", ()):
            self.views += 1
        elif name in ALLOCATING:
            self.allocations += 1
        elif name.startswith("profiler."):  # Optimizer.step's record_function: no kernel
            self.other += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.names.values())

    def summary(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "views": self.views, "allocations": self.allocations, "syncs": self.syncs,
                "total": self.total, "by_name": dict(sorted(self.names.items()))}
